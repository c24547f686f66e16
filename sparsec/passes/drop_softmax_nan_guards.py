"""drop_softmax_nan_guards: remove the NaN guard torch.onnx puts after a decomposed attention softmax.

before: p = Softmax(scores + bias);  y = Where(IsNaN(p), 0, p)
after:  y = Softmax(scores + bias)
When scaled_dot_product_attention is decomposed (opsets before 23), torch.onnx guards its softmax
with `Where(IsNaN(P), 0, P)`. The guard goes where the mask bias is `Where(mask, a, b)` with finite
constants a and b (transformers' masks use finfo.min, not -inf), or there is no bias.

Exactness: softmax yields NaN only for a row holding a NaN or +inf, or whose entries are all -inf.
With a finite bias that needs a non-finite attention score (|score| >= ~1e31, or NaN in the
activations), which finite inputs and weights do not produce; for every other input the guard is
the identity, so the output is bit-for-bit unchanged. Removing it saves two full passes over every
[batch, heads, seq, seq] probability tensor. A bias with -inf (a boolean mask that can mask a whole
row) keeps its guard.
requires: exported.  ensures: nan_guards_dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from sparsec.lowering import onnx_graph as g
from sparsec.pipeline import RulePass


def _finite_bias(value: ir.Value | None) -> bool:
    where = value.producer() if value is not None else None
    if not g.is_standard(where, "Where"):
        return False
    values = [g.constant(i) for i in where.inputs[1:]]
    return all(v is not None and v.dtype.kind == "f" and bool(np.isfinite(v).all()) for v in values)


class UnguardedSoftmax(RewriteRuleClassBase):
    def pattern(self, op, scores, zero):
        p = op.Softmax(scores, _allow_other_attributes=True, _outputs=["p"])
        return op.Where(op.IsNaN(p), zero, p)

    def check(self, context, scores, zero, p, **_) -> MatchResult:
        result = MatchResult()
        value = g.constant(zero)
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            return result.fail("the guard's replacement is not the constant 0")
        producer = scores.producer()
        if producer is not None and producer.op_type in ("MatMul", "FusedMatMul"):
            return result  # no mask
        if g.is_standard(producer, "Add") and any(_finite_bias(i) for i in producer.inputs):
            return result
        return result.fail("the softmax's mask bias is not a Where of finite constants (it may "
                           "mask a whole row: the guard stays)")

    def rewrite(self, op, scores, p, **_):
        attrs = {name: a.value for name, a in p.producer().attributes.items()}
        return op.Softmax(scores, **attrs)


@dataclass(frozen=True)
class DropSoftmaxNanGuards(RulePass):
    name = "drop_softmax_nan_guards"
    ensures = ("nan_guards_dropped",)
    rules = (UnguardedSoftmax.rule(name="unguarded_softmax"),)
