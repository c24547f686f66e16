"""The block-sparse convolution op: `sparsec::block_sparse_conv2d` (PyTorch) and
`sparsec::BlockSparseConv` (ONNX), with its standard-op function body.

The weight [N, C, kh, kw] is the matrix [N, K = C*kh*kw] (F.unfold's column order: channel-major,
then kernel row and column) in the padded blocked-ELL layout of sparsec.lowering.block_format.

    inputs   0 X float [B, C, H, W]     1 values float [R, S, BR, BC] (int8 with scales)
             2 block_cols int64 [R, S]  3 row_nnz int64 [R]
             4 bias float [N] (optional, "" when absent)   5 scales float [R, S] (optional: int8
             values, dequantized; the arithmetic is fp32)   6 residual float [B, N, Ho, Wo] (optional)
    attrs    N, K (ints); kernel_shape [kh, kw]; strides [sh, sw]; pads [top, left, bottom, right];
             dilations [dh, dw] (ONNX Conv's); activation (string, optional): "relu"
    output   Y float [B, N, Ho, Wo] = activation(conv2d(X, W) + bias + residual)

The residual comes before the activation, as a ResNet block ends: relu(bn(conv(x)) + shortcut)
(BlockSparseLinear's epilogue adds it after). The fuse_epilogues pass folds the BatchNormalization,
the residual Add and the Relu into the node.

sparsec's kernel computes it directly on the image (sparsec/runtime/kernel/block_sparse_conv.cc).
The function body, for stock onnxruntime, scatters the blocks back into the dense weight with a
one-hot MatMul (block_cols == column index, so padding slots, whose values are zero, add nothing)
and runs onnxruntime's own Conv; every input of the scatter is a constant, so onnxruntime folds it
when the session loads: the file stays small and the model runs exactly as fast as the dense one.
One overload per variant: "conv_" + fp32|int8 + "_bias"? + "_residual"? + "_relu"?.

Non-finite inputs: the kernel skips pruned weights, so a NaN or Inf pixel reaches only the outputs
of its kept weights; the function body's dense Conv multiplies it by the zeros too (NaN everywhere
its receptive field reaches). The PyTorch op reads only the kept blocks' columns, as the kernel.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from sparsec.lowering.block_format import PackedBlocks
from sparsec.lowering.custom_ops import (DOMAIN, IR_VERSION, ONNX_OPSET, attach_overloads, nodes_of, onnxscript_op,
                                         packed_schema)
from sparsec.lowering.onnx_op import weight_initializers
from sparsec.lowering.torch_op import gathered_product, dequantize

OP = "BlockSparseConv"
OP_NAME = "sparsec::block_sparse_conv2d"
INPUTS = ("X", "values", "block_cols", "row_nnz", "bias", "scales", "residual")
ACTIVATIONS = ("relu",)
# geometry = [kh, kw, sh, sw, pt, pl, pb, pr, dh, dw]


def output_size(geometry: list[int] | tuple[int, ...], h: int, w: int) -> tuple[int, int]:
    """(Ho, Wo) of an input [.., H, W]; ValueError when the padded input is smaller than the
    dilated kernel."""
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw = geometry
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{OP}: the padded input is smaller than the dilated {kh}x{kw} kernel")
    return ho, wo


# --------------------------------------------------------------------------------- PyTorch op
@torch.library.custom_op(OP_NAME, mutates_args=())
def block_sparse_conv2d(x: torch.Tensor, values: torch.Tensor, block_cols: torch.Tensor, row_nnz: torch.Tensor,
                        bias: torch.Tensor | None, scales: torch.Tensor | None, n: int, k: int,
                        geometry: list[int], activation: str = "") -> torch.Tensor:
    """Y [B, n, Ho, Wo] = act(conv2d(X, W) + bias), W [n, k] in padded blocked-ELL: the input's
    patches (F.unfold) times the kept blocks, as the kernel computes it."""
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw = geometry
    batch = x.shape[0]
    ho, wo = output_size(geometry, x.shape[2], x.shape[3])
    padded = torch.nn.functional.pad(x.to(torch.float32), (pl, pr, pt, pb))
    patches = torch.nn.functional.unfold(padded, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # [B, k, L]
    rows = patches.transpose(1, 2).reshape(-1, k)
    y = gathered_product(rows, dequantize(values, scales), block_cols, n, k, row_nnz)       # [B*L, n]
    y = y.reshape(batch, ho * wo, n).transpose(1, 2).reshape(batch, n, ho, wo)
    if bias is not None:
        y = y + bias[None, :, None, None]
    if activation == "relu":
        y = torch.relu(y)
    elif activation:
        raise ValueError(f"{OP}: unknown activation {activation!r} (allowed: relu)")
    return y.to(x.dtype).contiguous()


@block_sparse_conv2d.register_fake
def _(x, values, block_cols, row_nnz, bias, scales, n, k, geometry, activation=""):
    ho, wo = output_size(geometry, x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], n, ho, wo))


def torch_op() -> torch._ops.OpOverload:
    """The registered overload, as it appears in an FX graph (`call_function` target)."""
    return torch.ops.sparsec.block_sparse_conv2d.default


# ------------------------------------------------------------------------------------ ONNX op
@dataclass(frozen=True)
class Variant:
    """Which optional inputs and epilogue one node uses; names its function overload."""

    int8: bool = False
    bias: bool = False
    relu: bool = False
    residual: bool = False

    @property
    def overload(self) -> str:
        return "conv_" + ("int8" if self.int8 else "fp32") + ("_bias" if self.bias else "") + \
            ("_residual" if self.residual else "") + ("_relu" if self.relu else "")

    @classmethod
    def parse(cls, name: str) -> "Variant":
        match = re.fullmatch(r"conv_(fp32|int8)(_bias)?(_residual)?(_relu)?", name)
        if match is None:
            raise ValueError(f"unknown {OP} overload {name!r}")
        return cls(match[1] == "int8", bool(match[2]), bool(match[4]), bool(match[3]))

    @classmethod
    def of(cls, node: ir.Node) -> "Variant":
        present = [i < len(node.inputs) and node.inputs[i] is not None for i in range(len(INPUTS))]
        attr = node.attributes.get("activation")
        activation = attr.as_string() if attr is not None else ""
        if activation not in ("", "none", *ACTIVATIONS):
            raise ValueError(f"unknown {OP} activation {activation!r} (allowed: relu)")
        return cls(present[5], present[4], activation == "relu", present[6])

    def inputs(self) -> list[str]:
        """The function's formal inputs: positional, so earlier optional slots stay ("" when absent)."""
        used = [True] * 4 + [self.bias, self.int8, self.residual]
        return list(INPUTS[:max(i for i, u in enumerate(used) if u) + 1])


def _ref(node: onnx.NodeProto, name: str, kind: int, ref: str) -> None:
    attr = AttributeProto()
    attr.name, attr.type, attr.ref_attr_name = name, kind, ref
    node.attribute.append(attr)


def function_proto(variant: Variant, opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The standard-op body of BlockSparseConv: the dense weight rebuilt from the blocks (folded
    by onnxruntime at load), then onnxruntime's Conv."""
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def attr_ints(name: str, kind: int = AttributeProto.INTS) -> str:
        out = f"{name}_attr_{len(nodes)}"
        node = helper.make_node("Constant", [], [out])
        _ref(node, "value_ints" if kind == AttributeProto.INTS else "value_int", kind, name)
        nodes.append(node)
        return out if kind == AttributeProto.INTS else op("Reshape", out, op("Constant", value_ints=[1]))

    weight = "values"
    if variant.int8:
        weight = op("Mul", op("Cast", "values", to=TensorProto.FLOAT), op("Unsqueeze", "scales", op(
            "Constant", value_ints=[2, 3])))
    n, k = attr_ints("N", AttributeProto.INT), attr_ints("K", AttributeProto.INT)
    one, minus_one = op("Constant", value_ints=[1]), op("Constant", value_ints=[-1])
    rows, slots = op("Shape", "values", start=0, end=1), op("Shape", "values", start=1, end=2)
    br, bc = op("Shape", "values", start=2, end=3), op("Shape", "values", start=3, end=4)
    col_blocks = op("Div", op("Sub", op("Add", k, bc), one), bc)
    columns = op("Range", op("Constant", value_int=0), op("Squeeze", col_blocks), op("Constant", value_int=1))
    onehot = op("Cast", op("Equal", op("Unsqueeze", "block_cols", op("Constant", value_ints=[2])), columns),
                to=TensorProto.FLOAT)                                                   # [R, S, NBc]
    flat = op("Reshape", weight, op("Concat", rows, slots, minus_one, axis=0))          # [R, S, BR*BC]
    dense = op("MatMul", op("Transpose", onehot, perm=[0, 2, 1]), flat)                # [R, NBc, BR*BC]
    dense = op("Reshape", dense, op("Concat", rows, col_blocks, br, bc, axis=0))
    dense = op("Transpose", dense, perm=[0, 2, 1, 3])                                  # [R, BR, NBc, BC]
    dense = op("Reshape", dense, op("Concat", op("Mul", rows, br), op("Mul", col_blocks, bc), axis=0))
    zeros = op("Constant", value_ints=[0, 0])
    dense = op("Slice", dense, zeros, op("Concat", n, k, axis=0), op("Constant", value_ints=[0, 1]))
    dense = op("Reshape", dense, op("Concat", n, minus_one, attr_ints("kernel_shape"), axis=0))  # [N, C, kh, kw]
    conv = helper.make_node("Conv", ["X", dense] + (["bias"] if variant.bias else []), ["conv_out"])
    for name in ("strides", "pads", "dilations"):
        _ref(conv, name, AttributeProto.INTS, name)
    nodes.append(conv)
    y = "conv_out"
    if variant.residual:
        y = op("Add", y, "residual")
    if variant.relu:
        y = op("Relu", y)
    nodes[-1].output[0] = "Y"  # the last node computed y
    attributes = ["N", "K", "kernel_shape", "strides", "pads", "dilations"] + (["activation"] if variant.relu else [])
    fn = helper.make_function(DOMAIN, OP, variant.inputs(), ["Y"], nodes, [helper.make_opsetid("", opset)],
                              attributes=attributes,
                              doc_string=f"{OP} ({variant.overload}): Y = act(conv2d(X, W) + bias + residual), W [N, C*kh*kw] "
                                         "in padded blocked-ELL, rebuilt dense (constant-folded)")
    fn.overload = variant.overload
    return fn


def geometry_attributes(geometry: list[int] | tuple[int, ...]) -> dict[str, list[int]]:
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw = geometry
    return {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [pt, pl, pb, pr], "dilations": [dh, dw]}


def make_node(x: str, values: str, block_cols: str, row_nnz: str, output: str, n: int, k: int,
              geometry: list[int] | tuple[int, ...], *, bias: str | None = None, scales: str | None = None,
              activation: str = "", residual: str | None = None, name: str | None = None) -> onnx.NodeProto:
    """A BlockSparseConv node; its overload follows from which optional inputs are given."""
    variant = Variant(bool(scales), bool(bias), activation == "relu", bool(residual))
    inputs = [x, values, block_cols, row_nnz, bias or "", scales or "", residual or ""][:len(variant.inputs())]
    attrs: dict[str, Any] = geometry_attributes(geometry)
    if activation:
        attrs["activation"] = activation
    node = helper.make_node(OP, inputs, [output], name=name, domain=DOMAIN, N=int(n), K=int(k), **attrs)
    node.overload = variant.overload
    return node


def conv_nodes(model: onnx.ModelProto | ir.Model | ir.Graph) -> list[Any]:
    """The BlockSparseConv nodes of a model's main graph (NodeProtos or onnx_ir Nodes)."""
    return nodes_of(model, OP)


def attach_functions(model: onnx.ModelProto | ir.Model) -> Any:
    """Name each BlockSparseConv node's variant and add the function overloads the graph uses."""
    return attach_overloads(model, OP, Variant, function_proto)


# ------------------------------------------------------------------------ torch.onnx translation
@functools.lru_cache(maxsize=1)
def _schema() -> OpSchema:
    ints = OpSchema.AttrType.INTS
    return packed_schema(OP, "Y [B, N, Ho, Wo] = conv2d(X, W) + bias, W [N, C*kh*kw] as padded blocked-ELL blocks.",
                         ("output channels", "input channels x kh x kw"),
                         [OpSchema.Attribute("kernel_shape", ints, "[kh, kw]"),
                          OpSchema.Attribute("strides", ints, "[sh, sw]"),
                          OpSchema.Attribute("pads", ints, "[top, left, bottom, right]"),
                          OpSchema.Attribute("dilations", ints, "[dh, dw]"),
                          OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "relu", required=False)])


@functools.lru_cache(maxsize=1)
def _onnxscript_op():
    return onnxscript_op(_schema())


def translate(x, values, block_cols, row_nnz, bias=None, scales=None, n: int = 0, k: int = 0,
              geometry: list[int] | tuple[int, ...] = (), activation: str = ""):
    """torch.onnx's translation of one `sparsec::block_sparse_conv2d` call: one custom-domain node."""
    attrs: dict[str, Any] = geometry_attributes(list(geometry))
    if activation:
        attrs["activation"] = activation
    return _onnxscript_op()(x, values, block_cols, row_nnz, bias, scales, N=n, K=k, **attrs)


# ------------------------------------------------------------------------------ one-node models
def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], image: tuple[int, ...] | list[int],
           name: str, residual: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(image))]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="sparsec")
    model.ir_version = IR_VERSION
    return model


def single_layer_model(packed: PackedBlocks, geometry: list[int] | tuple[int, ...], image: tuple[int, ...] | list[int],
                       bias: np.ndarray | None = None, *, activation: str = "", residual: bool = False,
                       compact: bool = True, name: str = "block_sparse_conv") -> onnx.ModelProto:
    """y = BlockSparseConv(x), x [B, C, H, W] = `image`, the weight as initializers (values stored
    without padding slots when `compact`); `residual`: a second input "r" shaped like y."""
    nodes, inits = weight_initializers(packed, bias, compact)
    node = make_node("x", "W.values", "W.block_cols", "W.row_nnz", "y", packed.N, packed.K, geometry,
                     bias="bias" if bias is not None else None,
                     scales="W.scales" if packed.scales is not None else None, activation=activation,
                     residual="r" if residual else None, name=name)
    return attach_functions(_model([*nodes, node], inits, image, name, residual))


def dense_layer_model(weight: np.ndarray, geometry: list[int] | tuple[int, ...], image: tuple[int, ...] | list[int],
                      bias: np.ndarray | None = None, name: str = "dense_conv") -> onnx.ModelProto:
    """The dense baseline: onnxruntime's Conv with `weight` [N, C*kh*kw] (or [N, C, kh, kw])."""
    kh, kw = geometry[:2]
    w = np.asarray(weight, dtype=np.float32).reshape(weight.shape[0], -1, kh, kw)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w), "W")]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "bias"))
    attrs = geometry_attributes(geometry)
    node = helper.make_node("Conv", ["x", "W"] + (["bias"] if bias is not None else []), ["y"], name=name, **attrs)
    return _model([node], inits, image, name)
