"""lower_attention: run ONNX's Attention on sparsec's attention kernel (sparsec.lowering.attention_op).

before: y = Attention <q_num_heads=H, kv_num_heads=Hkv, scale?, is_causal?> (q, k, v, mask?)
after:  y = sparsec::Attention <the same, compute="bf16" | "fp32"> (q, k, v, mask?), whose function
        body is that Attention (stock onnxruntime still runs the file)
Only Attentions the kernel computes as onnxruntime does: 3-D inputs (attention_head_layout made
them), no past key/value, no output but the first read, softcap 0, and with `max_head` a head size
known to be at most that. `compute` and `max_head` come from the [export] table's `attention`
(ExportOptions.attention_lowering); an empty `compute` leaves the file as it is.
requires: attention_3d.  ensures: attention_lowered.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from sparsec.lowering import attention_op
from sparsec.lowering import onnx_graph as g
from sparsec.lowering.custom_ops import DOMAIN, DOMAIN_VERSION
from sparsec.pipeline import PassResult, RulePass


class AttentionOnKernel(RewriteRuleClassBase):
    """Attention(q, k, v, [mask]) on 3-D projections -> sparsec::Attention(q, k, v, [mask])."""

    def __init__(self, compute: str, max_head: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.compute = compute
        self.max_head = max_head

    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, q, k, v, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        if any(x is not None for x in node.inputs[4:]):
            return result.fail("Attention has past key/value inputs")
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return result.fail("Attention's present key/value or QK outputs are read")
        if g.attr(node, "q_num_heads") is None or g.attr(node, "kv_num_heads") is None:
            return result.fail("Attention takes 4-D inputs (attention_head_layout left it)")
        if g.attr(node, "softcap", 0.0) != 0.0:
            return result.fail("Attention has a softcap")
        for label, value in zip("qkv", (q, k, v)):
            dims = g.dims(value)
            if dims is not None and len(dims) != 3:
                return result.fail(f"{label} is not 3-D")
        if self.max_head:
            dims, heads = g.dims(q), g.attr(node, "q_num_heads")
            width = dims[2] if dims is not None and len(dims) == 3 else None
            if not isinstance(width, int) or width % heads != 0 or width // heads > self.max_head:
                return result.fail(f"head size not known to be at most {self.max_head} (onnxruntime's own "
                                   f"Attention is as fast on larger heads)")
        return result

    def rewrite(self, op, q, k, v, y, **_):
        node = y.producer()
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attrs = {name: node.attributes[name].value for name in attention_op.FORWARDED if name in node.attributes}
        out = op.Attention(q, k, v, mask, _domain=DOMAIN, _version=DOMAIN_VERSION, compute=self.compute, **attrs)
        out.shape, out.dtype = y.shape, y.dtype
        return out


@dataclass(frozen=True)
class LowerAttention(RulePass):
    name = "lower_attention"
    requires = ("attention_3d",)
    ensures = ("attention_lowered",)
    compute: str = ""
    max_head: int = 0   # lower only heads up to this size (0: any)

    def run(self, model: ir.Model) -> PassResult:
        if not self.compute:
            return PassResult(model, modified=False)
        if self.compute not in attention_op.COMPUTES:
            raise ValueError(f"lower_attention: compute {self.compute!r} is not one of {attention_op.COMPUTES}")
        rule = AttentionOnKernel.rule(self.compute, self.max_head, name="attention_on_kernel")
        rewritten = g.apply_rules(model, (rule,))
        if rewritten:
            attention_op.attach_functions(model)
        return PassResult(model, modified=rewritten > 0)

    def explain(self, model: ir.Model) -> list[str]:
        rule = AttentionOnKernel.rule(self.compute or "fp32", self.max_head, name="attention_on_kernel")
        return g.explain_rules(model, (rule,))
