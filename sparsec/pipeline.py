"""Passes and the pass runner, for both IRs sparsec rewrites.

A pass is a frozen dataclass (its fields are its options) in its own file under sparsec/passes/.
It declares the facts it requires and ensures, and whether it mutates its module in place; the
runner checks both promises, runs the IR's verifier after every pass and provides the instruments
(--print-after, --time-passes, --debug's explanations, IR snapshots) so passes never print.

Two kinds of module go through the same runner:
- `fx`: the torch.fx GraphModule (capture, select, rewrite and lower stages); its facts live in
  `ir.graph_info(gm).facts`, its text is `ir.format_ir`, its verifier `sparsec.verify`;
- `onnx`: the exported model as an `onnx_ir.Model` (the onnx stage); its facts live in
  `model.meta`, its text and verifier are in `sparsec.lowering.onnx_graph`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, TextIO

import torch.fx as fx

from sparsec.errors import PassError
from sparsec.ir import format_ir, graph_info, source_line

# --stop-after stages, in order; each pass belongs to one (the onnx passes to `lower`).
STAGES = ("capture", "select", "rewrite", "train", "lower")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the module (the same object for in-place passes) and whether it changed."""

    module: Any
    modified: bool


class Pass:
    """Base of every pass; subclasses are frozen dataclasses.

    name      the name used by --print-after, --print-pipeline and the ir/ snapshots
    kind      "fx" (a torch.fx GraphModule) or "onnx" (an onnx_ir.Model)
    stage     the --stop-after stage the pass belongs to
    requires  facts that must hold before it runs
    ensures   facts that hold after it ran
    in_place  True: mutates and returns the same module; False: returns a new one
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "fx"
    stage: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    in_place: ClassVar[bool] = True

    def run(self, module: Any) -> PassResult:
        raise NotImplementedError

    def explain(self, module: Any) -> list[str]:
        """Why the pass's rewrite rules did not apply where they almost did (shown by --debug)."""
        return []

    def error(self, message: str, node: fx.Node | None = None) -> PassError:
        """A PassError naming this pass, the node and the user's source line when known."""
        where = ""
        if node is not None:
            where = f" at node {node.name!r}"
            source = source_line(node)
            if source:
                where += f" ({source})"
        return PassError(f"pass {self.name}{where}: {message}")

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={_short(getattr(self, f.name))}" for f in fields(self))  # type: ignore[arg-type]
        return f"{self.name}({opts})" if opts else self.name


class OnnxPass(Pass):
    """A pass over the exported ONNX model (an `onnx_ir.Model`), in the lower stage."""

    kind: ClassVar[str] = "onnx"
    stage: ClassVar[str] = "lower"
    requires: ClassVar[tuple[str, ...]] = ("exported",)


class RulePass(OnnxPass):
    """An ONNX pass made of onnxscript rewrite rules (pattern, check with a reason, rewrite):
    `run` applies them until none applies, `explain` says why they did not apply where they
    matched the pattern but failed the check."""

    rules: ClassVar[tuple[Any, ...]] = ()

    def active_rules(self) -> tuple[Any, ...]:
        """The rules this instance applies (`rules`, unless its options choose among them)."""
        return self.rules

    def run(self, model: Any) -> PassResult:
        from sparsec.lowering.onnx_graph import apply_rules

        return PassResult(model, modified=apply_rules(model, self.active_rules()) > 0)

    def explain(self, model: Any) -> list[str]:
        from sparsec.lowering.onnx_graph import explain_rules

        return explain_rules(model, self.active_rules())


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Snapshot:
    """The IR as text right after one pass (or capture / export): a file of OUT's ir/ folder."""

    name: str
    kind: str      # fx | onnx
    text: str

    @property
    def suffix(self) -> str:
        return ".py.txt" if self.kind == "fx" else ".onnx.txt"


@dataclass
class Instruments:
    """Debugging instruments around the passes (never inside them)."""

    print_after: frozenset[str] = frozenset()   # pass names, or {"all"}
    time_passes: bool = False
    explain: bool = False                       # print why rules did not apply (--debug)
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    snapshots: list[Snapshot] | None = None     # the IR after every pass, when a list is given
    timings: dict[str, float] = field(default_factory=dict)
    stages: Any = None                          # a sparsec.progress.StageLine shown while stages run

    def wants_print(self, name: str) -> bool:
        return "all" in self.print_after or name in self.print_after

    def record(self, name: str, kind: str, render: Callable[[], str]) -> None:
        """Snapshot and/or print the IR after `name` (rendered only when someone wants it)."""
        if self.snapshots is None and not self.wants_print(name):
            return
        text = render()
        if self.snapshots is not None:
            self.snapshots.append(Snapshot(name, kind, text))
        if self.wants_print(name):
            self.stream.write(text.rstrip("\n") + "\n")

    def timed(self, name: str) -> "_Timer":
        """`with instruments.timed("capture"): ...` adds a stage that is not a pass to the table."""
        return _Timer(self, name)

    def report_timings(self) -> None:
        """Print the time of every pass and timed stage so far (--time-passes), then forget them."""
        if self.time_passes and self.timings:
            width = max(28, *(len(name) for name in self.timings))
            self.stream.write("time per pass and stage:\n")
            for name, seconds in self.timings.items():
                self.stream.write(f"  {name:{width}s} {seconds * 1000:10.1f} ms\n")
        self.timings.clear()


class _Timer:
    def __init__(self, instruments: Instruments, name: str) -> None:
        self.instruments, self.name = instruments, name

    def __enter__(self) -> None:
        if self.instruments.stages is not None:
            self.instruments.stages.start(self.name)
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        timings = self.instruments.timings
        timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - self.start
        if self.instruments.stages is not None:
            self.instruments.stages.stop()


@dataclass(frozen=True)
class _Kind:
    """How the runner treats one kind of module."""

    facts: Callable[[Any], set[str]]
    verify: Callable[[Any], None]
    render: Callable[[Any, str], str]
    after_modified: Callable[[Any], None]


def _fx_kind() -> _Kind:
    from sparsec.verify import verify

    return _Kind(facts=lambda gm: graph_info(gm).facts, verify=verify, render=format_ir,
                 after_modified=lambda gm: gm.recompile())


def _onnx_kind() -> _Kind:
    from sparsec.lowering import onnx_graph

    return _Kind(facts=onnx_graph.facts, verify=onnx_graph.verify, render=onnx_graph.format_model,
                 after_modified=lambda model: None)


def run_pipeline(module: Any, passes: list[Pass], instruments: Instruments | None = None,
                 verifier: Callable[[Any], None] | None = None) -> Any:
    """Run `passes` in order on `module`, verifying the IR after each one; returns the module.
    All passes must be of one kind (fx or onnx)."""
    inst = instruments or Instruments()
    kinds = {p.kind for p in passes}
    if len(kinds) > 1:
        raise PassError(f"a pipeline mixes {' and '.join(sorted(kinds))} passes")
    if not passes:
        return module
    kind = _fx_kind() if passes[0].kind == "fx" else _onnx_kind()
    verify = verifier or kind.verify
    for p in passes:
        missing = [fact for fact in p.requires if fact not in kind.facts(module)]
        if missing:
            raise PassError(f"pass {p.name}: requires {', '.join(missing)}, which no earlier pass "
                            f"established (pipeline order is wrong)")
        if inst.explain:
            for reason in p.explain(module):
                inst.stream.write(f"{p.name}: {reason}\n")
        if inst.stages is not None:
            inst.stages.start(p.name)
        try:
            start = time.perf_counter()
            result = p.run(module)
            inst.timings[p.name] = inst.timings.get(p.name, 0.0) + time.perf_counter() - start
        finally:
            if inst.stages is not None:
                inst.stages.stop()
        if p.in_place and result.module is not module:
            raise PassError(f"pass {p.name}: declared in-place but returned a new module")
        if not p.in_place and result.module is module:
            raise PassError(f"pass {p.name}: declared to return a new module but mutated in place")
        module = result.module
        kind.facts(module).update(p.ensures)
        if result.modified:
            kind.after_modified(module)
        try:
            verify(module)
        except PassError as exc:
            raise PassError(f"verifier failed after pass {p.name}: {exc}") from exc
        inst.record(p.name, p.kind, lambda m=module, n=p.name: kind.render(m, n))
    return module
