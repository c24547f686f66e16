"""fuse_epilogues: fold what follows a BlockSparseLinear or a BlockSparseConv into the node.

before: h = BlockSparseLinear(x, ...);  a = Gelu(h)         |  s = Add(h, r)  |  y = LayerNormalization(s', scale, bias)
after:  a = BlockSparseLinear(x, ..., activation="gelu")   |  s = BlockSparseLinear(x, ..., r)  |  y = BlockSparseLinear(x, ..., r, scale, bias, epsilon)
Three rules: `fold_gelu` (erf or tanh Gelu into `activation`), `fold_residual` (a same-shape Add of
the result and another tensor into the `residual` input, either operand order) and
`fold_layer_norm` (a LayerNormalization over the last axis of a node that already has its
residual, scale and bias of shape [N], float32 statistics, only its normalised output read, into
`ln_scale` / `ln_bias` / `epsilon`). Convolutions: `fold_conv_batch_norm` (an inference
BatchNormalization whose four inputs are constants, into the fp32 blocks and the bias:
W'[o] = W[o] * s[o], b' = (b - mean) * s + beta, s = gamma / sqrt(var + epsilon), as onnxruntime
does for its own Conv; int8 blocks are quantized again with new per-block scales), `fold_conv_residual` (a same-shape Add, before any activation: the node adds
its residual before the activation, as a ResNet block ends relu(bn(conv(x)) + shortcut)) and
`fold_conv_relu` (a Relu into `activation`). The kernel applies the first two where it stores each output
tile and normalises each row once written; the function body does the same in standard ops
(sparsec.lowering.onnx_op). The node's output must have no other reader; the fused node takes the
place of what it absorbs, where every input it reads is available.
requires: exported.  ensures: epilogues_fused.  Run before attach_functions (variants change).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

import numpy as np

from sparsec.lowering import block_format, conv_op
from sparsec.lowering import onnx_graph as g
from sparsec.lowering.onnx_op import ACTIVATIONS, DOMAIN, DOMAIN_VERSION, INPUTS, Variant
from sparsec.pipeline import PassResult, RulePass

_BY_APPROXIMATE = {approximate: name for name, approximate in ACTIVATIONS.items()}


def _sparse(op, x):
    """A BlockSparseLinear node reading x (any other inputs and attributes), output `h`."""
    return op.BlockSparseLinear(x, _domain=DOMAIN, _allow_other_inputs=True,
                                _allow_other_attributes=True, _outputs=["h"])


def _rebuild(op, node: ir.Node, replaced: ir.Value, *, activation: str | None = None,
             residual: ir.Value | None = None, layer_norm: tuple[ir.Value, ir.Value, float] | None = None
             ) -> ir.Value:
    """The node again with an epilogue added; its output takes `replaced`'s type and shape."""
    inputs = list(node.inputs) + [None] * (len(INPUTS) - len(node.inputs))
    attrs = {name: a.value for name, a in node.attributes.items()}
    if activation:
        attrs["activation"] = activation
    if residual is not None:
        inputs[INPUTS.index("residual")] = residual
    if layer_norm is not None:
        inputs[INPUTS.index("ln_scale")], inputs[INPUTS.index("ln_bias")] = layer_norm[:2]
        attrs["epsilon"] = float(layer_norm[2])
    while inputs and inputs[-1] is None:
        inputs.pop()
    out = op.BlockSparseLinear(*inputs, _domain=DOMAIN, _version=DOMAIN_VERSION, **attrs)
    out.type, out.shape = replaced.type, replaced.shape
    return out


class FoldGelu(RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Gelu(_sparse(op, x), _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, h, y, **_) -> MatchResult:
        result = MatchResult()
        variant = Variant.of(h.producer())
        if variant.activation or variant.residual or variant.layer_norm:
            return result.fail(f"the node already has an epilogue ({variant.overload})")
        if g.attr(y.producer(), "approximate", "none") not in _BY_APPROXIMATE:
            return result.fail("Gelu's approximate is neither 'none' nor 'tanh'")
        return result

    def rewrite(self, op, x, h, y, **_):
        activation = _BY_APPROXIMATE[g.attr(y.producer(), "approximate", "none")]
        return _rebuild(op, h.producer(), y, activation=activation)


def _residual_fits(result: MatchResult, r: ir.Value, h: ir.Value, y: ir.Value) -> MatchResult:
    """`result`, failed unless r can be the residual of the node whose output h the Add y = h + r
    reads: another value, of provably the same shape (no broadcasting)."""
    if r is h:
        return result.fail("the Add adds the node's output to itself")
    if not (g.same_shape(r, h) and g.same_shape(r, y)):
        return result.fail(f"the residual's shape {g.dims(r)} is not provably the output's {g.dims(h)}")
    return result


class FoldResidual(RewriteRuleClassBase):
    def pattern(self, op, x, r):
        return op.Add(_sparse(op, x), r, _outputs=["y"])

    def check(self, context, x, r, h, y, **_) -> MatchResult:
        result = MatchResult()
        variant = Variant.of(h.producer())
        if variant.residual or variant.layer_norm:
            return result.fail(f"the node already has a residual ({variant.overload})")
        return _residual_fits(result, r, h, y)

    def rewrite(self, op, x, r, h, y, **_):
        return _rebuild(op, h.producer(), y, residual=r)


class FoldLayerNorm(RewriteRuleClassBase):
    def pattern(self, op, x, scale, bias):
        return op.LayerNormalization(_sparse(op, x), scale, bias, _allow_other_attributes=True,
                                     _outputs=["y"])

    def check(self, context, x, scale, bias, h, y, **_) -> MatchResult:
        result = MatchResult()
        node, norm = h.producer(), y.producer()
        variant = Variant.of(node)
        if not variant.residual or variant.layer_norm:
            return result.fail(f"the node must have its residual and no LayerNorm yet ({variant.overload})")
        if any(o.uses() or o.is_graph_output() for o in norm.outputs[1:]):
            return result.fail("LayerNormalization's mean or inverse std is read")
        if g.attr(norm, "stash_type", 1) != 1:
            return result.fail("LayerNormalization's statistics are not float32 (stash_type)")
        dims = g.dims(h)
        if dims is None or g.attr(norm, "axis", -1) not in (-1, len(dims) - 1):
            return result.fail("LayerNormalization is not over the last axis")
        n = g.attr(node, "N")
        for value in (scale, bias):
            shape = g.dims(value) or (list(value.const_value.shape) if value.const_value is not None else None)
            if shape != [n]:
                return result.fail(f"scale or bias is not of shape [{n}]")
        return result

    def rewrite(self, op, x, scale, bias, h, y, **_):
        epsilon = g.attr(y.producer(), "epsilon", 1e-5)
        return _rebuild(op, h.producer(), y, layer_norm=(scale, bias, epsilon))


def _conv(op, x):
    """A BlockSparseConv node reading x (any other inputs and attributes), output `h`."""
    return op.BlockSparseConv(x, _domain=DOMAIN, _allow_other_inputs=True, _allow_other_attributes=True,
                              _outputs=["h"])


def _rebuild_conv(op, node: ir.Node, replaced: ir.Value, inputs: list[ir.Value | None] | None = None,
                  activation: str = "", residual: ir.Value | None = None) -> ir.Value:
    inputs = list(node.inputs) if inputs is None else inputs
    if residual is not None:
        inputs += [None] * (len(conv_op.INPUTS) - len(inputs))
        inputs[conv_op.INPUTS.index("residual")] = residual
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = {name: a.value for name, a in node.attributes.items()}
    if activation:
        attrs["activation"] = activation
    out = op.BlockSparseConv(*inputs, _domain=DOMAIN, _version=DOMAIN_VERSION, **attrs)
    out.type, out.shape = replaced.type, replaced.shape
    return out


class FoldConvRelu(RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Relu(_conv(op, x), _outputs=["y"])

    def check(self, context, x, h, y, **_) -> MatchResult:
        result = MatchResult()
        if conv_op.Variant.of(h.producer()).relu:
            return result.fail("the node already has its activation")
        return result

    def rewrite(self, op, x, h, y, **_):
        return _rebuild_conv(op, h.producer(), y, activation="relu")


class FoldConvResidual(RewriteRuleClassBase):
    def pattern(self, op, x, r):
        return op.Add(_conv(op, x), r, _outputs=["y"])

    def check(self, context, x, r, h, y, **_) -> MatchResult:
        result = MatchResult()
        variant = conv_op.Variant.of(h.producer())
        if variant.relu or variant.residual:
            return result.fail(f"the node already has its activation or residual ({variant.overload})")
        return _residual_fits(result, r, h, y)

    def rewrite(self, op, x, r, h, y, **_):
        return _rebuild_conv(op, h.producer(), y, residual=r)


class FoldConvBatchNorm(RewriteRuleClassBase):
    def pattern(self, op, x, scale, beta, mean, var):
        return op.BatchNormalization(_conv(op, x), scale, beta, mean, var, _allow_other_attributes=True,
                                     _outputs=["y"])

    def check(self, context, x, scale, beta, mean, var, h, y, **_) -> MatchResult:
        result = MatchResult()
        node, norm = h.producer(), y.producer()
        variant = conv_op.Variant.of(node)
        if variant.relu or variant.residual:
            return result.fail("the node already has an activation or a residual: the normalisation comes after")
        if g.attr(norm, "training_mode", 0) or len(norm.outputs) > 1 and any(o.uses() for o in norm.outputs[1:]):
            return result.fail("BatchNormalization in training mode")
        n = g.attr(node, "N")
        for value in (scale, beta, mean, var):
            found = g.constant(value)
            if found is None or found.shape != (n,):
                return result.fail(f"a BatchNormalization input is not a constant of shape [{n}]")
        values, bias = node.inputs[1], node.inputs[4] if len(node.inputs) > 4 else None
        scales = node.inputs[5] if variant.int8 else None
        if (g.constant(values) is None or (bias is not None and g.constant(bias) is None)
                or (variant.int8 and g.constant(scales) is None)):
            return result.fail("the node's blocks, scales or bias are not constants")
        return result

    def rewrite(self, op, x, scale, beta, mean, var, h, y, **_):
        node = h.producer()
        epsilon = g.attr(y.producer(), "epsilon", 1e-5)
        gamma, b0, mu, sigma2 = (g.constant(v).astype(np.float64) for v in (scale, beta, mean, var))
        factor = gamma / np.sqrt(sigma2 + epsilon)
        values = g.constant(node.inputs[1]).astype(np.float64)
        int8 = conv_op.Variant.of(node).int8
        if int8:   # int8 blocks: dequantized, rescaled, quantized again with new per-block scales
            values = values * g.constant(node.inputs[5]).astype(np.float64)[:, :, None, None]
        r, _, br, _ = values.shape
        padded = np.ones(r * br)
        padded[:factor.shape[0]] = factor
        folded = (values * padded.reshape(r, 1, br, 1)).astype(np.float32)
        bias = g.constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else 0.0
        new_bias = ((np.asarray(bias, np.float64) - mu) * factor + b0).astype(np.float32)
        inputs = list(node.inputs) + [None] * (len(conv_op.INPUTS) - len(node.inputs))
        if int8:
            folded, scales = block_format.quantize_blocks(folded)
            inputs[5] = op.initializer(ir.tensor(scales), name=f"{node.inputs[5].name}.bn")
        inputs[1] = op.initializer(ir.tensor(folded), name=f"{node.inputs[1].name}.bn")
        inputs[4] = op.initializer(ir.tensor(new_bias), name=f"{node.inputs[1].name}.bn_bias")
        return _rebuild_conv(op, node, y, inputs)


@dataclass(frozen=True)
class FuseEpilogues(RulePass):
    name = "fuse_epilogues"
    ensures = ("epilogues_fused",)
    rules = (FoldGelu.rule(name="fold_gelu"),
             *FoldResidual.rule(name="fold_residual").commute(),
             FoldLayerNorm.rule(name="fold_layer_norm"),
             FoldConvBatchNorm.rule(name="fold_conv_batch_norm"),
             *FoldConvResidual.rule(name="fold_conv_residual").commute(),
             FoldConvRelu.rule(name="fold_conv_relu"))

    def run(self, model: ir.Model) -> PassResult:
        if "functions_attached" in g.facts(model):
            raise self.error("runs before attach_functions: fusing changes the nodes' variants")
        return super().run(model)


def fuse_epilogues(model: ir.Model) -> int:
    """Apply the pass's rules to `model` in place; returns how many epilogue steps were folded."""
    return g.apply_rules(model, FuseEpilogues.rules)

