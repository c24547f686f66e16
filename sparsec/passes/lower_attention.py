"""lower_attention: run ONNX's Attention on sparsec's attention kernel (sparsec.lowering.attention_op).

before: y = Attention <q_num_heads=H, kv_num_heads=Hkv, scale?, is_causal?> (q, k, v, mask?)
after:  y = sparsec::Attention <the same, compute="bf16" | "fp32"> (q, k, v, mask?), whose function
        body is that Attention (stock onnxruntime still runs the file)
Only Attentions the kernel computes as onnxruntime does: 3-D inputs (attention_head_layout made
them; the pattern is a node of one output), no past key/value, softcap 0. With `measure` (`attention =
"auto"` and `[export] measure`), each node's shape is timed on this machine (batch 1, its static
sequence lengths or 128; cached like the layers' measurements, sparsec.lowering.calibrate) and
moves only where the kernel is at least MIN_SPEEDUP faster; the node records what was measured.
Unmeasured, `max_head` keeps heads above that size on onnxruntime's Attention (this project's
measurements). `compute`, `max_head`, `measure` and `threads` come from the [export] table
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


MIN_SPEEDUP = 1.05          # measured speedup a node needs to move to the kernel (beyond timing noise)
MEASURED = "sparsec.measured"   # the new node's metadata: what the measurement found


class AttentionOnKernel(RewriteRuleClassBase):
    """Attention(q, k, v, [mask]) on 3-D projections -> sparsec::Attention(q, k, v, [mask])."""

    def __init__(self, compute: str, max_head: int = 0, measure: bool = False, threads: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.compute = compute
        self.max_head = max_head
        self.measure = measure
        self.threads = threads
        self._note = ""   # what the measurement of the node in hand found, for its rewrite

    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, q, k, v, y, **_) -> MatchResult:
        result = MatchResult()
        node = y.producer()
        self._note = ""
        if any(x is not None for x in node.inputs[4:]):
            return result.fail("Attention has past key/value inputs")
        if g.attr(node, "q_num_heads") is None or g.attr(node, "kv_num_heads") is None:
            return result.fail("Attention takes 4-D inputs (attention_head_layout left it)")
        if g.attr(node, "softcap", 0.0) != 0.0:
            return result.fail("Attention has a softcap")
        for label, value in zip("qkv", (q, k, v)):
            dims = g.dims(value)
            if dims is not None and len(dims) != 3:
                return result.fail(f"{label} is not 3-D")
        if self.measure:
            verdict = self._measure(node, q, k, v)
            if verdict is not None:
                speedup, text = verdict
                if speedup < MIN_SPEEDUP:
                    return result.fail(f"{text}: onnxruntime's own Attention is as fast (needs {MIN_SPEEDUP}x)")
                self._note = text
                return result
        if self.max_head:   # not measured: the measurement on the development machine decides
            dims, heads = g.dims(q), g.attr(node, "q_num_heads")
            width = dims[2] if dims is not None and len(dims) == 3 else None
            if not isinstance(width, int) or width % heads != 0 or width // heads > self.max_head:
                return result.fail(f"head size not known to be at most {self.max_head} (onnxruntime's own "
                                   f"Attention is as fast on larger heads)")
        return result

    def _measure(self, node, q, k, v) -> tuple[float, str] | None:
        """(speedup, what was measured) of the kernel against onnxruntime's Attention on this
        node's heads and head sizes, with its sequence lengths where they are static (else 128) and
        batch 1; None when it cannot be measured (unknown head sizes, no kernel here)."""
        from sparsec.lowering import calibrate

        dq, dk, dv = g.dims(q), g.dims(k), g.dims(v)
        hq, hkv = g.attr(node, "q_num_heads"), g.attr(node, "kv_num_heads")
        if dq is None or dk is None or dv is None or not all(isinstance(d[2], int) for d in (dq, dk, dv)):
            return None
        if dq[2] % hq or dk[2] % hkv or dv[2] % hkv:
            return None
        sq = dq[1] if isinstance(dq[1], int) else 128
        skv = dk[1] if isinstance(dk[1], int) else sq
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        kind = "" if mask is None else "bool" if mask.dtype == ir.DataType.BOOL else "float"
        case = calibrate.AttentionCase((1, sq, skv, hq, hkv, dq[2] // hq, dv[2] // hkv), self.compute, kind,
                                       bool(g.attr(node, "is_causal", 0)), self.threads)
        try:
            m = calibrate.measure_attention(case)
        except RuntimeError:
            return None
        return m.speedup, (f"measured {m.speedup:.2f}x onnxruntime's Attention ({m.dense_ms:.3f} -> "
                           f"{m.sparse_ms:.3f} ms, {sq} x {skv} tokens, {hq} heads of {dq[2] // hq})")

    def rewrite(self, op, q, k, v, y, **_):
        node = y.producer()
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attrs = {name: node.attributes[name].value for name in attention_op.FORWARDED if name in node.attributes}
        out = op.Attention(q, k, v, mask, _domain=DOMAIN, _version=DOMAIN_VERSION, compute=self.compute, **attrs)
        out.shape, out.dtype = y.shape, y.dtype
        if self._note:
            out.producer().metadata_props[MEASURED] = self._note
        return out


@dataclass(frozen=True)
class LowerAttention(RulePass):
    name = "lower_attention"
    requires = ("attention_3d",)
    ensures = ("attention_lowered",)
    compute: str = ""
    max_head: int = 0   # lower only heads up to this size (0: any), where not measured
    measure: bool = False   # time each node's shape on this machine and lower it where faster
    threads: int = 0

    def run(self, model: ir.Model) -> PassResult:
        if not self.compute:
            return PassResult(model, modified=False)
        if self.compute not in attention_op.COMPUTES:
            raise ValueError(f"lower_attention: compute {self.compute!r} is not one of {attention_op.COMPUTES}")
        rule = AttentionOnKernel.rule(self.compute, self.max_head, self.measure, self.threads,
                                      name="attention_on_kernel")
        rewritten = g.apply_rules(model, (rule,))
        if rewritten:
            attention_op.attach_functions(model)
        return PassResult(model, modified=rewritten > 0)

    def explain(self, model: ir.Model) -> list[str]:
        rule = AttentionOnKernel.rule(self.compute or "fp32", self.max_head, self.measure, self.threads,
                                      name="attention_on_kernel")
        return g.explain_rules(model, (rule,))
