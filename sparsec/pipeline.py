"""Passes and the pass runner.

A pass is a frozen dataclass (its fields are its options) in its own file under
sparsec/passes/. It declares the facts it requires and ensures, and whether it mutates the
GraphModule in place; the runner checks both promises, runs the verifier after every pass and
provides the instruments (--print-after, --time-passes, IR snapshots) so passes never print.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, TextIO

import torch.fx as fx

from sparsec.errors import PassError
from sparsec.ir import format_ir, graph_info, node_info


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the module (the same object for in-place passes) and whether it changed."""

    module: fx.GraphModule
    modified: bool
    notes: tuple[str, ...] = ()


class Pass:
    """Base of every pass; subclasses are frozen dataclasses.

    name      the name used by --print-after and the pipeline listing
    stage     the --stop-after stage the pass belongs to
    requires  facts that must hold before it runs
    ensures   facts that hold after it ran
    in_place  True: mutates and returns the same GraphModule; False: returns a new one
    """

    name: ClassVar[str]
    stage: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    in_place: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

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


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def source_line(node: fx.Node) -> str:
    """`file:line` of the user code that produced `node`, from the capture's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    # innermost frame outside torch: the model's line, not torch.nn.Linear.forward's
    user = [ln for ln in lines if "/torch/" not in ln]
    last = (user or lines)[-1]  # File "x.py", line 12, in forward
    try:
        filename = last.split('"')[1]
        lineno = last.split("line ")[1].split(",")[0]
    except IndexError:
        return ""
    return f"{filename}:{lineno}"


@dataclass
class Instruments:
    """Debugging instruments around the passes (never inside them)."""

    print_after: frozenset[str] = frozenset()   # pass names, or {"all"}
    time_passes: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    snapshots: dict[str, str] | None = None       # pass name -> IR text after it, when a dict is given
    timings: dict[str, float] = field(default_factory=dict)
    on_pass: Callable[[str], None] | None = None

    def wants_print(self, name: str) -> bool:
        return "all" in self.print_after or name in self.print_after


def run_pipeline(gm: fx.GraphModule, passes: list[Pass], instruments: Instruments | None = None,
                 verifier: Callable[[fx.GraphModule], None] | None = None) -> fx.GraphModule:
    """Run `passes` in order, verifying the IR after each one."""
    from sparsec.verify import verify  # late: verify imports pass-level knowledge

    verifier = verifier or verify
    inst = instruments or Instruments()
    for p in passes:
        info = graph_info(gm)
        missing = [fact for fact in p.requires if fact not in info.facts]
        if missing:
            raise PassError(f"pass {p.name}: requires {', '.join(missing)}, which no earlier pass "
                            f"established (pipeline order is wrong)")
        start = time.perf_counter()
        result = p.run(gm)
        inst.timings[p.name] = inst.timings.get(p.name, 0.0) + time.perf_counter() - start
        if p.in_place and result.module is not gm:
            raise PassError(f"pass {p.name}: declared in-place but returned a new module")
        if not p.in_place and result.module is gm:
            raise PassError(f"pass {p.name}: declared to return a new module but mutated in place")
        gm = result.module
        graph_info(gm).facts.update(p.ensures)
        if result.modified:
            gm.recompile()
        try:
            verifier(gm)
        except PassError as exc:
            raise PassError(f"verifier failed after pass {p.name}: {exc}") from exc
        if inst.on_pass is not None:
            inst.on_pass(p.name)
        if inst.snapshots is not None or inst.wants_print(p.name):
            text = format_ir(gm, p.name)
            if inst.snapshots is not None:
                inst.snapshots[p.name] = text
            if inst.wants_print(p.name):
                inst.stream.write(text + "\n")
    if inst.time_passes:
        for name, seconds in inst.timings.items():
            inst.stream.write(f"{name:24s} {seconds * 1000:9.1f} ms\n")
    return gm


def roles_of(gm: fx.GraphModule) -> dict[str, str]:
    """node name -> role, for tests and inspection."""
    return {n.name: info.role for n in gm.graph.nodes if (info := node_info(n)) is not None}
