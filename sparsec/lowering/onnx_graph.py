"""The ONNX stage's IR: an `onnx_ir.Model` as torch.onnx exports it, with what the ONNX passes need.

- `facts`, `verify`, `format_model`: the runner's view of an ONNX model (sparsec.pipeline): the
  facts established by the passes so far (kept in `model.meta`), the verifier run after every
  pass, and the text `--print-after` prints and OUT's ir/ folder keeps (ONNX textual syntax,
  initializers named but not listed).
- shape helpers for the rewrite rules' checks: what the graph proves statically about a value's
  dims (`dims`, `same_shape`) and about the entries of a shape tensor (`shape_entries`).
- `apply_rules`: run onnxscript rewrite rules, and `explain_rules`: the reasons they did not
  apply where they nearly did (shown by `--debug`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from sparsec.errors import PassError

FACTS_KEY = "sparsec.facts"
METADATA_INPUTS = "sparsec.example_inputs"  # metadata_props key: the example inputs' shapes and dtypes
STANDARD_DOMAINS = ("", "ai.onnx")


# ----------------------------------------------------------------------------- the runner's view
def facts(model: ir.Model) -> set[str]:
    """The postconditions the ONNX passes have established on `model` (created empty)."""
    found = model.meta.get(FACTS_KEY)
    if found is None:
        found = set()
        model.meta[FACTS_KEY] = found
    return found


def format_model(model: ir.Model, title: str = "") -> str:
    """The model as ONNX text (initializers declared with their shapes, values left out)."""
    header = f"# sparsec ONNX IR{(' after ' + title) if title else ''}\n"
    if facts(model):
        header += "# facts: " + ", ".join(sorted(facts(model))) + "\n"
    return header + "\n" + ir.to_onnx_text(model, exclude_initializers=True) + "\n"


def verify(model: ir.Model) -> None:
    """Structural checks after every ONNX pass (onnx.checker and onnxruntime run once at the end):
    nodes in topological order, every input defined before use (a graph input, an initializer or
    an earlier node's output), every value produced once, graph outputs produced, and every node
    of a custom domain has a function body or is sparsec's (whose bodies are attached last)."""
    graph = model.graph
    defined: set[int] = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is None or id(value) in defined:
                continue
            if value.producer() is None and value.const_value is None:
                raise PassError(f"ONNX node {node.name!r} ({node.op_type}) reads {value.name!r}, "
                                f"which nothing defines")
            raise PassError(f"ONNX node {node.name!r} ({node.op_type}) reads {value.name!r} before "
                            f"it is computed (nodes out of order)")
        for value in node.outputs:
            if id(value) in defined:
                raise PassError(f"ONNX value {value.name!r} is produced twice")
            defined.add(id(value))
    for value in graph.outputs:
        if id(value) not in defined:
            raise PassError(f"ONNX graph output {value.name!r} is not computed")
    from sparsec.lowering import targets

    attached = "functions_attached" in facts(model)
    ours = {id(n): t for t in targets.all_targets() for n in t.onnx_nodes(model)}
    known = {(f.domain, f.name) for f in model.functions.values()}
    for node in graph:
        target = ours.get(id(node))
        if target is not None:
            problem = target.check_onnx(node, attached)
            if not problem and attached and node.overload and (node.domain, node.op_type, node.overload) not in model.functions:
                problem = f"no function body for overload {node.overload!r}"
            if problem:
                raise PassError(f"ONNX node {node.name!r} ({node.op_type}): {problem}")
        elif node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in known:
            raise PassError(f"ONNX node {node.name!r} is of domain {node.domain!r} ({node.op_type}), which "
                            f"no runtime or function body provides")


# --------------------------------------------------------------------------------- shape helpers
def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """The value of a node's attribute (a str for strings), or `default`."""
    found = node.attributes.get(name)
    if found is None:
        return default
    value = found.value
    return value.decode() if isinstance(value, bytes) else value


def is_standard(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in STANDARD_DOMAINS


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when the graph makes it a constant (initializer or Constant node)."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def dims(value: ir.Value | None) -> list[int | str] | None:
    """The value's dims as the graph states them: ints, or symbolic names ('?' when unnamed);
    None when the shape is unknown."""
    if value is None or value.shape is None:
        return None
    out: list[int | str] = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(getattr(d, "value", None), str) and d.value else "?")
    return out


def same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether a and b provably have the same shape: every dim the same number or the same named
    symbol (an unknown dim, or an unknown shape, is not provably the same)."""
    da, db = dims(a), dims(b)
    return (da is not None and db is not None and len(da) == len(db)
            and all(x == y and x not in (0, "?", "") for x, y in zip(da, db)))


def shape_entries(value: ir.Value | None) -> list[int | str | None] | None:
    """The entries of a 1-D shape tensor, as far as the graph says them statically: ints for
    constants, dim names for dims read with Shape from values of known shape, None for unknown
    entries; None when even the length is unknown."""
    known = constant(value)
    if known is not None:
        return [int(v) for v in np.asarray(known).reshape(-1)] if known.ndim <= 1 else None
    node = value.producer() if value is not None else None
    if node is None or node.domain not in STANDARD_DOMAINS:
        return None
    if node.op_type == "Shape":
        source = dims(node.inputs[0])
        if source is None:
            return None
        start, end = attr(node, "start", 0), attr(node, "end", len(source))
        return [d if d not in (0, "?", "") else None for d in source[slice(start, end)]]
    if node.op_type == "Concat" and attr(node, "axis", 0) == 0:
        parts = [shape_entries(i) for i in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]  # type: ignore[union-attr]
    return None


def only_user(value: ir.Value) -> ir.Node | None:
    """The one node reading `value` (None when it has several readers or is a graph output)."""
    users = {id(node): node for node, _ in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


# -------------------------------------------------------------------------------- rewrite rules
def apply_rules(model: ir.Model, rules: Sequence[Any]) -> int:
    """Apply onnxscript rewrite rules until none applies; returns how many rewrites were made.
    Nodes a rewrite left unused (a pattern's inputs that only it read) are removed."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter import RewriteRuleSet

    rule_set = RewriteRuleSet(list(rules))
    total = 0
    while True:
        count = rule_set.apply_to_model(model)
        total += count
        if not count:
            break
    if total:
        RemoveUnusedNodesPass()(model)
    return total


def explain_rules(model: ir.Model, rules: Sequence[Any]) -> list[str]:
    """For each rule, why it did not apply where it matched the pattern but failed its check
    (the node, and the check's reason). The model is not changed."""
    from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRuleSet

    class _Reasons(MatchingTracer):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def log(self, rule, container, node, match_result, status) -> None:  # noqa: ANN001
            if status == MatchStatus.CONDITION_FAILED:
                reason = match_result.reason or "its check failed"
                self.lines.append(f"rule {rule.name or type(rule).__name__} did not apply at "
                                  f"{node.op_type} node {node.name!r}: {reason}")

    tracer = _Reasons()
    RewriteRuleSet(list(rules)).apply_to_model(model, tracer=tracer)
    return tracer.lines
