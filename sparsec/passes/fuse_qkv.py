"""fuse_qkv: compute an attention's Q, K and V projections as one BlockSparseLinear node.

before: q = BlockSparseLinear(x, Wq ...);  k = BlockSparseLinear(x, Wk ...);  v = BlockSparseLinear(x, Wv ...)
        y = sparsec::Attention(q, k, v, mask?)
after:  qkv = BlockSparseLinear <N = Nq + Nk + Nv> (x, [Wq; Wk; Wv] ...)
        y = sparsec::Attention <packed_qkv = [Nq, Nk, Nv]> (qkv, qkv, qkv, mask?)
The three weights' block rows are stacked (values, block_cols and per-row INT8 scales concatenated,
each weight's rows padded with empty slots to the longest), the biases concatenated (zeros for a
projection without one), so the fused node computes exactly what the three did, row for row. The
kernel then quantizes x once instead of three times (INT8 compute), runs one larger parallel loop,
and the Attention reads Q, K and V in place from the fused output (row stride Nq + Nk + Nv,
sparsec.lowering.attention_op); on stock onnxruntime the function bodies compute the same.
With `split` (the pipeline sets it for `[export] target = "stock"`, where the Attention stays
ONNX's), an ONNX Attention's three projections fuse the same way, followed by one Split: stock
onnxruntime then runs one function body (one Gather, one batched MatMul; in INT8 one quantization
of x) instead of three, at the price of copying the three parts out.
Only where it is exact and simple: the three nodes read the same x, are distinct, have no epilogue
(activation, residual, LayerNorm), the same precision, block shape, K and constant weights; Q's and
K's widths are whole block rows (their stacked rows must not share a block); each output feeds only
this Attention. Cross-attention (K and V from another input) keeps its three nodes.
requires: attention_lowered.  ensures: qkv_fused.  Runs before attach_functions (variants change).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from sparsec.lowering import attention_op
from sparsec.lowering import onnx_graph as g
from sparsec.lowering.onnx_op import DOMAIN, DOMAIN_VERSION, INPUTS, Variant
from sparsec.pipeline import PassResult, RulePass

_VALUES, _COLS, _NNZ, _BIAS, _SCALES = (INPUTS.index(name) for name in
                                       ("values", "block_cols", "row_nnz", "bias", "scales"))


def _projection(op, x, name: str):
    return op.BlockSparseLinear(x, _domain=DOMAIN, _allow_other_inputs=True, _allow_other_attributes=True,
                                _outputs=[name])


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _stack(arrays: list[np.ndarray], slots: int, fill: float | int = 0) -> np.ndarray:
    """Arrays [R_i, S_i, ...] padded along axis 1 to `slots` with `fill`, then stacked along axis 0."""
    padded = []
    for a in arrays:
        widths = [(0, 0), (0, slots - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        padded.append(np.pad(a, widths, constant_values=fill))
    return np.concatenate(padded, axis=0)


def _fused_name(names: list[str]) -> str:
    """'a.self.query.w', 'a.self.key.w', 'a.self.value.w' -> 'a.self.query+key+value.w'."""
    head = os.path.commonprefix(names)
    head = head[:head.rfind(".") + 1]
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1]
    tail = tail[tail.find("."):] if "." in tail else ""
    middles = [n[len(head):len(n) - len(tail)] for n in names]
    return head + "+".join(middles) + tail


def _fusable(result: MatchResult, q: ir.Value, k: ir.Value, v: ir.Value) -> MatchResult:
    """`result`, failed with the reason unless the projections q, k and v (of one input) can be one node."""
    nodes = [value.producer() for value in (q, k, v)]
    if len({id(n) for n in nodes}) != 3:
        return result.fail("Q, K and V are not three distinct projections")
    variants = [Variant.of(n) for n in nodes]
    if any(v_.activation or v_.residual or v_.layer_norm for v_ in variants):
        return result.fail("a projection has an epilogue (activation, residual or LayerNorm)")
    if len({(v_.int8, v_.int8_compute) for v_ in variants}) != 1:
        return result.fail("the projections differ in precision")
    if len({(g.attr(n, "K"), g.attr(n, "compute", "fp32")) for n in nodes}) != 1:
        return result.fail("the projections differ in K or compute")
    shapes = set()
    for n in nodes:
        for index in (_VALUES, _COLS, _NNZ, _BIAS, _SCALES):
            value = _input(n, index)
            if value is not None and g.constant(value) is None:
                return result.fail(f"{n.name}: input {INPUTS[index]} is not a constant")
        shapes.add(g.constant(n.inputs[_VALUES]).shape[2:] + (g.constant(n.inputs[_VALUES]).dtype,))
    if len(shapes) != 1:
        return result.fail("the projections differ in block shape or value type")
    br = next(iter(shapes))[0]
    for n in nodes[:2]:
        if g.attr(n, "N") % br:
            return result.fail(f"{n.name}: N={g.attr(n, 'N')} is not whole block rows of {br}")
    for value in (q, k, v):
        if len(value.uses()) != 1 or value.is_graph_output():
            return result.fail(f"{value.name} is read by more than the Attention")
    return result


def _fused_projection(op, x: ir.Value, q: ir.Value, k: ir.Value, v: ir.Value) -> tuple[ir.Value, list[int], str]:
    """The one BlockSparseLinear computing q, k and v side by side (its output), their widths and the
    stem of its tensors' names ("...self.query+key+value.weight_")."""
    nodes = [value.producer() for value in (q, k, v)]
    first = nodes[0]
    values = [g.constant(n.inputs[_VALUES]) for n in nodes]
    slots = max(a.shape[1] for a in values)
    widths = [int(g.attr(n, "N")) for n in nodes]
    inputs: list[ir.Value | None] = [x]
    stacked = {
        _VALUES: _stack(values, slots),
        _COLS: _stack([g.constant(n.inputs[_COLS]) for n in nodes], slots),
        _NNZ: np.concatenate([g.constant(n.inputs[_NNZ]) for n in nodes]),
    }
    if any(_input(n, _BIAS) is not None for n in nodes):
        stacked[_BIAS] = np.concatenate([g.constant(_input(n, _BIAS)) if _input(n, _BIAS) is not None
                                         else np.zeros(width, np.float32) for n, width in zip(nodes, widths)])
    if _input(first, _SCALES) is not None:
        scales = [g.constant(n.inputs[_SCALES]) for n in nodes]
        # INT8 compute: one scale per output row [N]; int8 storage: one per block slot [R, S]
        stacked[_SCALES] = np.concatenate(scales) if scales[0].ndim == 1 else _stack(scales, slots)
    values_name = _fused_name([n.inputs[_VALUES].name or "values" for n in nodes])
    for index in range(1, _SCALES + 1):
        if index not in stacked:
            inputs.append(None)
            continue
        names = [n.inputs[index].name or "" for n in nodes if _input(n, index) is not None]
        if len(set(names)) == len(nodes):   # each site's own tensors: their names, fused
            name = _fused_name(names)
        else:                                # shared (a deduplicated zero bias) or absent in some
            name = f"{values_name.removesuffix('values')}{INPUTS[index]}"
        inputs.append(op.initializer(ir.tensor(np.ascontiguousarray(stacked[index])), name=name))
    while inputs[-1] is None:
        inputs.pop()
    attrs = {name: a.value for name, a in first.attributes.items()}
    attrs["N"] = sum(widths)
    qkv = op.BlockSparseLinear(*inputs, _domain=DOMAIN, _version=DOMAIN_VERSION, **attrs)
    qkv.dtype = q.dtype
    if q.shape is not None:
        qkv.shape = ir.Shape([*q.shape[:-1], sum(widths)])
    return qkv, widths, values_name.removesuffix("values")


def _attention_again(op, y: ir.Value, inputs: list[ir.Value], domain: str, **extra) -> ir.Value:
    """The Attention producing y, on new Q, K, V inputs (its mask, attributes and metadata kept)."""
    attention = y.producer()
    mask = attention.inputs[3] if len(attention.inputs) > 3 else None
    attrs = {name: a.value for name, a in attention.attributes.items()} | extra
    versions = {"_version": DOMAIN_VERSION} if domain == DOMAIN else {}
    out = op.Attention(*inputs, mask, _domain=domain, **versions, **attrs)
    out.shape, out.dtype = y.shape, y.dtype
    for key, value in attention.metadata_props.items():
        out.producer().metadata_props[key] = value
    return out


class FuseQkv(RewriteRuleClassBase):
    """sparsec::Attention(BSL(x), BSL(x), BSL(x), [mask]) -> sparsec::Attention<packed_qkv>(BSL(x)^3, [mask])."""

    def pattern(self, op, x):
        q, k, v = (_projection(op, x, name) for name in ("q", "k", "v"))
        return op.Attention(q, k, v, _domain=DOMAIN, _allow_other_inputs=True, _allow_other_attributes=True,
                            _outputs=["y"])

    def check(self, context, x, q, k, v, y, **_) -> MatchResult:
        result = MatchResult()
        if attention_op.PACKED in y.producer().attributes:
            return result.fail("the Attention already reads Q, K and V packed")
        return _fusable(result, q, k, v)

    def rewrite(self, op, x, q, k, v, y, **_):
        qkv, widths, _ = _fused_projection(op, x, q, k, v)
        return _attention_again(op, y, [qkv, qkv, qkv], DOMAIN, **{attention_op.PACKED: widths})


class FuseQkvSplit(RewriteRuleClassBase):
    """Attention(BSL(x), BSL(x), BSL(x), [mask]) (ONNX's, on 3-D inputs) ->
    Attention(Split(BSL(x)), [mask]): for stock onnxruntime, which then runs one function body (one
    Gather, one batched MatMul, in INT8 one quantization of x) instead of three, and one Split."""

    def pattern(self, op, x):
        q, k, v = (_projection(op, x, name) for name in ("q", "k", "v"))
        return op.Attention(q, k, v, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, q, k, v, y, **_) -> MatchResult:
        result = MatchResult()
        attention = y.producer()
        if g.attr(attention, "q_num_heads") is None or any(i is not None for i in attention.inputs[4:]):
            return result.fail("the Attention takes 4-D inputs or past key/values")
        return _fusable(result, q, k, v)

    def rewrite(self, op, x, q, k, v, y, **_):
        qkv, widths, stem = _fused_projection(op, x, q, k, v)
        sizes = op.initializer(ir.tensor(np.asarray(widths, np.int64)), name=f"{stem}split")
        parts = op.Split(qkv, sizes, axis=-1, _outputs=3)
        for part, like in zip(parts, (q, k, v)):
            part.dtype, part.shape = like.dtype, like.shape
        return _attention_again(op, y, list(parts), "")


_PACKED_RULE = FuseQkv.rule(name="fuse_qkv")
_SPLIT_RULE = FuseQkvSplit.rule(name="fuse_qkv_split")


@dataclass(frozen=True)
class FuseQkvProjections(RulePass):
    name = "fuse_qkv"
    requires = ("attention_lowered",)
    ensures = ("qkv_fused",)
    rules = (_PACKED_RULE, _SPLIT_RULE)
    split: bool = False   # also before ONNX's own Attention, with a Split (the stock target's files)

    def active_rules(self) -> tuple:
        return self.rules if self.split else (_PACKED_RULE,)

    def run(self, model: ir.Model) -> PassResult:
        if "functions_attached" in g.facts(model):
            raise self.error("runs before attach_functions: fusing changes the nodes' variants")
        fused = g.apply_rules(model, self.active_rules())
        if fused:   # the Attentions' new overloads; the bodies no node uses any more go
            attention_op.attach_functions(model)
            used = {(n.domain, n.op_type, n.overload) for n in model.graph}
            for key in [key for key in model.functions if key[0] == DOMAIN and key not in used]:
                del model.functions[key]
        return PassResult(model, modified=fused > 0)
