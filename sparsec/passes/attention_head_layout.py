"""attention_head_layout: feed each ONNX Attention its projections as [batch, seq, heads * head].

before: q4 = Transpose(Reshape(q, [d0, d1, H, D]), perm=[0, 2, 1, 3])   (the same for k and v)
        y = Transpose(Attention(q4, k4, v4, mask), perm=[0, 2, 1, 3]);  z = Reshape(y, [d0, d1, -1])
after:  y3 = Attention(q, k, v, mask, q_num_heads=H, kv_num_heads=Hkv);   z = y3
`scaled_dot_product_attention` exports (opset 23) as `Attention` on [batch, heads, seq, head]
inputs made by a Reshape and a Transpose of each projection, and its output is transposed back.
Attention also takes [batch, seq, heads * head] inputs (with `q_num_heads` / `kv_num_heads`) and
then returns [batch, seq, heads * head]: the four Transposes per layer go, and so do the Reshapes
around them where the graph proves they are identities. Three rules, each exact:

- `attention_on_projections`: the rewrite above; the old 4-D output is `Reshape(y3, [0, 0, H, -1])`
  so every reader still sees the same tensor;
- `reshape_of_heads_view`: `Reshape(Reshape(y3, [0, 0, H, -1]), target)` -> `Reshape(y3, target)`
  when no entry of `target` after the second copies a dim (0 without allowzero);
- `identity_reshape`: `Reshape(x, target)` -> x when the graph proves `target` is x's shape.
A projection that is already [d0, d1, H * D] is used as it is; otherwise it gets one Reshape with
the 4-D target's own two leading entries. Patterns that differ (another perm, extra Attention
inputs or outputs, unknown head size) are left alone; `--debug` says why.
requires: exported.  ensures: attention_3d.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from sparsec.lowering import onnx_graph as g
from sparsec.pipeline import PassResult, RulePass

HEADS_PERM = [0, 2, 1, 3]


def _heads_view(q4: ir.Value) -> dict | None:
    """When `q4` = Transpose(Reshape(a, [d0, d1, H, D]), perm [0, 2, 1, 3]) with D (and H, or a
    known width of `a` that D divides) static: the Reshape, H, the width H * D and whether `a` is
    already [d0, d1, H * D] (`identity`); else None."""
    transpose = q4.producer()
    if not g.is_standard(transpose, "Transpose") or list(g.attr(transpose, "perm", [])) != HEADS_PERM:
        return None
    reshape = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
    if not g.is_standard(reshape, "Reshape"):
        return None
    entries = g.shape_entries(reshape.inputs[1])
    if entries is None or len(entries) != 4 or not isinstance(entries[3], int) or entries[3] <= 0:
        return None
    source = g.dims(reshape.inputs[0])
    allowzero = g.attr(reshape, "allowzero", 0)
    width = source[2] if source is not None and len(source) == 3 else None
    identity = False
    if isinstance(width, int) and width > 0:
        lead = entries[:2]
        matched = [e is not None and (e == d or (e == 0 and not allowzero)) for e, d in zip(lead, source)]  # type: ignore[arg-type]
        identity = all(matched) or (sum(matched) == 1 and lead.count(-1) == 1 and isinstance(entries[2], int)
                                    and entries[2] > 0 and entries[2] * entries[3] == width)
    heads = entries[2]
    if heads == -1 and identity and width % entries[3] == 0:  # type: ignore[operator]
        heads = width // entries[3]  # type: ignore[operator]
    if not isinstance(heads, int) or heads <= 0 or (identity and heads * entries[3] != width):
        return None
    return {"reshape": reshape, "heads": heads, "width": heads * entries[3], "identity": identity,
            "source": reshape.inputs[0]}


class AttentionOnProjections(RewriteRuleClassBase):
    """Transpose(Attention(heads views of q, k, v, [mask])) -> Reshape(3-D Attention, [0, 0, H, -1])."""

    def pattern(self, op, q4, k4, v4):
        y = op.Attention(q4, k4, v4, _allow_other_inputs=True, _allow_other_attributes=True,
                         _outputs=["y"])
        return op.Transpose(y, perm=HEADS_PERM)

    def check(self, context, q4, k4, v4, y, **_) -> MatchResult:
        result = MatchResult()
        attention = y.producer()
        if any(v is not None for v in attention.inputs[4:]):
            return result.fail("Attention has past key/value inputs")
        if any(o.uses() or o.is_graph_output() for o in attention.outputs[1:]):
            return result.fail("Attention's present key/value outputs are read")
        if g.attr(attention, "q_num_heads") is not None:
            return result.fail("Attention already takes 3-D inputs")
        views = [_heads_view(v) for v in (q4, k4, v4)]
        for label, view in zip("qkv", views):
            if view is None:
                return result.fail(f"{label} is not Transpose(Reshape(x, [d0, d1, H, D]), [0, 2, 1, 3]) "
                                   f"with a static head size")
        if views[1]["heads"] != views[2]["heads"]:  # type: ignore[index]
            return result.fail("k and v have different head counts")
        self._views = views
        return result

    def rewrite(self, op, y, **_):
        attention = y.producer()
        q, k, v = self._views
        inputs = [self._three_d(op, view) for view in self._views]
        mask = attention.inputs[3] if len(attention.inputs) > 3 else None
        attrs = {name: a.value for name, a in attention.attributes.items()
                 if name not in ("q_num_heads", "kv_num_heads")}
        y3 = op.Attention(*inputs, mask, q_num_heads=q["heads"], kv_num_heads=k["heads"], **attrs)
        source = g.dims(q["source"])
        if q["identity"] and source is not None and v["width"] % v["heads"] == 0:
            y3.shape = ir.Shape([_dim(source[0]), _dim(source[1]), q["heads"] * (v["width"] // v["heads"])])
            y3.dtype = y.dtype
        return op.Reshape(y3, op.Constant(value_ints=[0, 0, q["heads"], -1]))

    @staticmethod
    def _three_d(op, view: dict) -> ir.Value:
        """The projection as [d0, d1, H * D]: itself when it already is, else a Reshape with the
        4-D target's own leading entries (the same rows the 4-D Reshape made)."""
        if view["identity"]:
            return view["source"]
        reshape = view["reshape"]
        lead = op.Slice(reshape.inputs[1], op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
        target = op.Concat(lead, op.Constant(value_ints=[view["width"]]), axis=0)
        return op.Reshape(view["source"], target, allowzero=g.attr(reshape, "allowzero", 0))


def _dim(d: int | str) -> int | ir.SymbolicDim:
    return d if isinstance(d, int) else ir.SymbolicDim(None if d == "?" else d)


class ReshapeOfHeadsView(RewriteRuleClassBase):
    """Reshape(Reshape(y3, [0, 0, H, -1]), target) -> Reshape(y3, target)."""

    def pattern(self, op, y3, heads_shape, target):
        return op.Reshape(op.Reshape(y3, heads_shape), target, _allow_other_attributes=True,
                          _outputs=["z"])

    def check(self, context, y3, heads_shape, target, z, **_) -> MatchResult:
        result = MatchResult()
        inner = g.constant(heads_shape)
        if inner is None or len(inner) != 4 or list(inner[:2]) != [0, 0] or inner[3] != -1:
            return result.fail("the inner Reshape is not the [0, 0, H, -1] view of attention_on_projections")
        entries = g.shape_entries(target)
        if entries is None:
            return result.fail("the target shape is not known statically")
        allowzero = g.attr(z.producer(), "allowzero", 0)
        if not allowzero and any(e is None or e == 0 for e in entries[2:]):
            return result.fail("the target copies a dim after the second (0 entry) or has an unknown entry")
        return result

    def rewrite(self, op, y3, target, z, **_):
        return op.Reshape(y3, target, allowzero=g.attr(z.producer(), "allowzero", 0))


class IdentityReshape(RewriteRuleClassBase):
    """Reshape(x, target) -> x when the graph proves `target` equals x's shape."""

    def pattern(self, op, x, target):
        return op.Reshape(x, target, _allow_other_attributes=True, _outputs=["z"])

    def check(self, context, x, target, z, **_) -> MatchResult:
        result = MatchResult()
        if z.is_graph_output():
            return result.fail("the Reshape's output is a graph output")
        source, entries = g.dims(x), g.shape_entries(target)
        if source is None or entries is None or len(source) != len(entries):
            return result.fail("the input's shape or the target is not known statically")
        allowzero = g.attr(z.producer(), "allowzero", 0)
        known = [isinstance(d, int) and d > 0 or (isinstance(d, str) and d not in ("", "?")) for d in source]
        matched = [k and (e == d or (e == 0 and not allowzero)) for e, d, k in zip(entries, source, known)]
        unmatched = [e for e, m in zip(entries, matched) if not m]
        if not all(known) or (unmatched and unmatched != [-1]):
            return result.fail(f"target {entries} is not provably the input's shape {source}")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


@dataclass(frozen=True)
class AttentionHeadLayout(RulePass):
    name = "attention_head_layout"
    ensures = ("attention_3d",)
    rules = (AttentionOnProjections.rule(name="attention_on_projections"),
             ReshapeOfHeadsView.rule(name="reshape_of_heads_view"))

    def run(self, model: ir.Model) -> PassResult:
        result = super().run(model)
        if result.modified:  # the Reshapes the rewrite made identities
            g.apply_rules(model, (IdentityReshape.rule(name="identity_reshape"),))
            IdentityEliminationPass()(model)
        return result


def attention_head_layout(model: ir.Model) -> int:
    """Apply the pass's rules to `model` in place; returns how many attentions were rewritten."""
    before = sum(1 for n in model.graph if n.op_type == "Attention" and g.attr(n, "q_num_heads") is None)
    AttentionHeadLayout().run(model)
    after = sum(1 for n in model.graph if n.op_type == "Attention" and g.attr(n, "q_num_heads") is None)
    return before - after

