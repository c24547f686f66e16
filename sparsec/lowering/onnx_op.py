"""The `sparsec::BlockSparseLinear` ONNX op and its standard-op function body.

Node (domain "sparsec", op "BlockSparseLinear", domain version 1), weight W [N, K] in padded
blocked-ELL (see block_format):

    inputs   0 X float [..., K]          1 values float [R, S, BR, BC] (int8 with scales)
             2 block_cols int64 [R, S]   3 row_nnz int64 [R]
             4 bias float [N] (optional, "" when absent)   5 scales float [R, S] (optional: INT8)
             6 residual float [..., N], the shape of Y (optional)
             7 ln_scale float [N], 8 ln_bias float [N] (optional, together)
    attrs    N, K (ints); activation (string, optional): "gelu" (erf) or "gelu_tanh";
             epsilon (float, with ln_scale); compute (string, optional): "int8" for INT8 compute,
             with int8 values and scales float [N] (one per output row)
    output   Y float [..., N] = Z = activation(X @ W^T + bias) + residual,
             or LayerNormalization(Z, ln_scale, ln_bias, axis=-1, epsilon) with ln_scale

The activation, the residual and the LayerNorm are the layer's epilogue: the kernel applies the
first two to each output tile as it stores it and normalises each row once all its tiles are
written (the fuse_epilogues pass folds Gelu, residual Adds and LayerNormalization into the node).
The node comes from torch.onnx's translation of `sparsec::block_sparse_linear` (`translate`, with
the schema `_schema`); the lowering target that uses it is sparsec.lowering.targets.linear.

Every model that uses the op carries a model-local FunctionProto of the same domain and name, so
stock onnxruntime inlines it where sparsec's kernel is not registered. ONNX allows one function per
(domain, name, overload); each variant (fp32/int8, bias, activation, residual; `Variant`) is one
overload, named like "fp32_bias_gelu", and each node names its variant in `NodeProto.overload`
(`make_node` sets it, `attach_functions` adds the functions a graph needs).

The body gathers input column blocks per block row and runs one batched MatMul:
X -> [M, NBc, BC] (K padded to NBc*BC only when BC does not divide K)
-> Gather(block_cols, axis 1) -> [M, R, S*BC] -> Transpose -> [R, M, S*BC];
values -> [R, S*BC, BR] (constant-folded by onnxruntime); MatMul -> [R, M, BR] -> Transpose
-> [M, R, BR] (columns [:N] only when BR does not divide N) -> [..., N] -> + bias -> Gelu -> + residual.
onnxruntime fuses the input Transpose into the MatMul (FusedMatMul, transBatchA), folds the two
If nodes (their conditions depend on constants only) and every shape computed from attributes and
the values' shape, so for divisible shapes no Pad or Slice runs and only the output's leading dims
are read at run time. Padding slots have zero values, so row_nnz is not needed. No ScatterND (its
reduction="add" is wrong with 2 threads in onnxruntime 1.32).

INT8 compute (overloads "int8dq_...", attribute compute="int8") does in standard ops what the kernel
does (sparsec/runtime/kernel/block_sparse.h): X [M, K] quantized per row to uint8 with a zero
point (the formula of DynamicQuantizeLinear, per row: ReduceMin/ReduceMax, Round, Clip, Cast),
the same gather, MatMulInteger(uint8, uint8: the int8 weights shifted by 128, zero point 128, as
onnxruntime's uint8 x int8 GEMM saturates on x86 without VNNI) -> int32 [R, M, BR], minus zero
point x the weights' column sums (ReduceSum of the int8 values) in int32, then Cast and the two scales in float32.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from sparsec.lowering.block_format import PackedBlocks
from sparsec.lowering.custom_ops import (DOMAIN, DOMAIN_VERSION, IR_VERSION, ONNX_OPSET, attach_overloads,  # noqa: F401
                                         nodes_of, onnxscript_op, packed_schema)

OP = "BlockSparseLinear"
OP_TYPE = OP
INPUTS = ("X", "values", "block_cols", "row_nnz", "bias", "scales", "residual", "ln_scale", "ln_bias")


ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # activation attribute -> Gelu's approximate


@dataclass(frozen=True)
class Variant:
    """Which optional inputs and epilogue one node uses; names its function overload."""

    int8: bool = False             # int8 values (per-block scales: dequantized, fp32 math)
    bias: bool = False
    activation: str = ""           # "" | "gelu" | "gelu_tanh"
    residual: bool = False
    layer_norm: bool = False       # LayerNorm over the last axis, with ln_scale and ln_bias
    int8_compute: bool = False     # int8 values, per-row scales, activations quantized per row

    def __post_init__(self) -> None:
        if self.int8_compute and not self.int8:
            raise ValueError(f"{OP} INT8 compute needs int8 values")
        if self.activation and self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown {OP} activation {self.activation!r} (allowed: {', '.join(ACTIVATIONS)})")

    @property
    def overload(self) -> str:
        precision = "int8dq" if self.int8_compute else "int8" if self.int8 else "fp32"
        return precision + ("_bias" if self.bias else "") + \
            (f"_{self.activation}" if self.activation else "") + ("_residual" if self.residual else "") + \
            ("_ln" if self.layer_norm else "")

    @classmethod
    def parse(cls, name: str) -> "Variant":
        match = re.fullmatch(r"(fp32|int8dq|int8)(_bias)?(?:_(gelu_tanh|gelu))?(_residual)?(_ln)?", name)
        if match is None:
            raise ValueError(f"unknown {OP} overload {name!r}")
        return cls(match[1] != "fp32", bool(match[2]), match[3] or "", bool(match[4]), bool(match[5]),
                   match[1] == "int8dq")

    @classmethod
    def of(cls, node: onnx.NodeProto | ir.Node) -> "Variant":
        """The variant a node uses, from which optional inputs it has (a NodeProto or an onnx_ir Node)."""
        if isinstance(node, onnx.NodeProto):
            present = [i < len(node.input) and node.input[i] != "" for i in range(len(INPUTS))]
            strings = {a.name: helper.get_attribute_value(a).decode() for a in node.attribute
                       if a.name in ("activation", "compute")}
            activation, compute = strings.get("activation", ""), strings.get("compute", "")
        else:
            present = [i < len(node.inputs) and node.inputs[i] is not None for i in range(len(INPUTS))]
            attr, mode = node.attributes.get("activation"), node.attributes.get("compute")
            activation = attr.as_string() if attr is not None else ""
            compute = mode.as_string() if mode is not None else ""
        if compute not in ("", "fp32", "int8"):
            raise ValueError(f"unknown {OP} compute {compute!r} (allowed: fp32, int8)")
        return cls(present[5], present[4], activation if activation != "none" else "", present[6], present[7],
                   compute == "int8")

    def inputs(self) -> list[str]:
        """The function's formal inputs: positional, so earlier optional slots stay ("" when absent)."""
        used = [True] * 4 + [self.bias, self.int8, self.residual, self.layer_norm, self.layer_norm]
        last = max(i for i, u in enumerate(used) if u)
        return list(INPUTS[:last + 1])


def overload(int8: bool, has_bias: bool, activation: str = "", residual: bool = False) -> str:
    """The function overload (and NodeProto.overload) naming one input variant."""
    return Variant(int8, has_bias, activation, residual).overload


class _Body:
    """Collects the nodes of a function body; each op returns its (unique) output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ints(self, values: list[int]) -> str:
        return self.op("Constant", value_ints=values)

    def attr_as_1d(self, attr: str) -> str:
        """The node's int attribute `attr` as an int64 tensor [1]."""
        out = f"{attr.lower()}_attr_{len(self.nodes)}"
        node = helper.make_node("Constant", [], [out])
        # value_ints cannot reference an INT attribute: read it as a scalar, then reshape.
        ref = AttributeProto()
        ref.name, ref.type, ref.ref_attr_name = "value_int", AttributeProto.INT, attr
        node.attribute.append(ref)
        self.nodes.append(node)
        return self.op("Reshape", out, self.ints([1]))


def _branch(name: str, nodes: list[onnx.NodeProto], output: str, dtype: int = TensorProto.FLOAT) -> onnx.GraphProto:
    """A subgraph for an If branch (reads outer-scope names, returns `output`)."""
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, dtype, None)])


def _quantize_rows(b: _Body, x2: str) -> tuple[str, str, str]:
    """X [M, K] -> (uint8 [M, K], scale float [M, 1], zero point float [M, 1]): DynamicQuantizeLinear's
    formula per row, as the kernel computes it (block_sparse.h)."""
    zero_f, one_f, top = (b.op("Constant", value_float=v) for v in (0.0, 1.0, 255.0))
    axis = b.ints([-1])
    lo = b.op("Min", b.op("ReduceMin", x2, axis, keepdims=1), zero_f)
    hi = b.op("Max", b.op("ReduceMax", x2, axis, keepdims=1), zero_f)
    scale = b.op("Div", b.op("Sub", hi, lo), top)
    scale = b.op("Where", b.op("Greater", scale, zero_f), scale, one_f)
    zp = b.op("Clip", b.op("Round", b.op("Div", b.op("Neg", lo), scale)), zero_f, top)
    q = b.op("Clip", b.op("Add", b.op("Round", b.op("Div", x2, scale)), zp), zero_f, top)
    return b.op("Cast", q, to=TensorProto.UINT8), scale, zp


def function_proto(variant: Variant, opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The standard-op body of BlockSparseLinear for one variant (see the module docstring)."""
    if variant.activation and opset < 20:
        raise ValueError(f"{OP} activation {variant.activation!r} needs ONNX opset >= 20 (Gelu), not {opset}")
    b = _Body()
    zero, one, minus_one = b.ints([0]), b.ints([1]), b.ints([-1])
    k, n = b.attr_as_1d("K"), b.attr_as_1d("N")

    weight = "values"
    if variant.int8 and not variant.int8_compute:
        scale = b.op("Unsqueeze", "scales", b.ints([2, 3]))
        weight = b.op("Mul", b.op("Cast", "values", to=TensorProto.FLOAT), scale)
    # Every shape below but the last comes from attributes and the (constant) values' shape, so
    # onnxruntime folds it when the session loads; only the output's leading dims are read from X.
    rows = b.op("Shape", "values", start=0, end=1)
    slots = b.op("Shape", "values", start=1, end=2)
    br = b.op("Shape", "values", start=2, end=3)
    bc = b.op("Shape", "values", start=3, end=4)
    col_blocks = b.op("Div", b.op("Sub", b.op("Add", k, bc), one), bc)
    pad_k = b.op("Sub", b.op("Mul", col_blocks, bc), k)
    rows_br = b.op("Mul", rows, br)
    # X's last dimension must be K, or the node fails: X [2, 2K] would otherwise be read as
    # [4, K] and answer [4, N]. Shape checks alone do not hold (onnxruntime's optimizer rewrites a
    # reshape's leading dims to -1, trusting the declared shapes), so the check is a value: a
    # one-element tensor indexed by |width - K|, out of bounds (an error naming this node) unless
    # the widths agree. Its value, 0, is added to the block count that reshapes X, so no optimizer
    # drops it. Cost: four scalar ops per call where onnxruntime cannot fold X's shape.
    differs = b.op("Abs", b.op("Sub", b.op("Shape", "X", start=-1), k))
    guard = b.op("Gather", zero, differs)
    b.nodes[-1].name = "X_last_dim_must_equal_K"
    blocked = b.op("Concat", minus_one, b.op("Add", col_blocks, guard), bc, axis=0)
    x_in, x_type = "X", TensorProto.FLOAT
    if variant.int8_compute:
        x2 = b.op("Reshape", "X", b.op("Concat", minus_one, b.op("Add", k, guard), axis=0))
        x_in, x_scale, x_zero = _quantize_rows(b, x2)
        x_type = TensorProto.UINT8

    # [..., K] -> [M, NBc, BC], padding K to NBc*BC only when BC does not divide K. The condition
    # depends on constants only, so onnxruntime folds the If and keeps one branch.
    x3 = f"x_blocked_{len(b.nodes)}"
    padded = [helper.make_node("Reshape", [x_in, b.op("Concat", minus_one, b.op("Add", k, guard), axis=0)],
                               [x3 + "_2d"]),
              helper.make_node("Pad", [x3 + "_2d", b.op("Concat", zero, zero, zero, pad_k, axis=0)], [x3 + "_pad"]),
              helper.make_node("Reshape", [x3 + "_pad", blocked], [x3 + "_padded"])]
    b.nodes.append(helper.make_node(
        "If", [b.op("Equal", pad_k, zero)], [x3],
        then_branch=_branch("k_divisible", [helper.make_node("Reshape", [x_in, blocked], [x3 + "_same"])], x3 + "_same",
                            x_type),
        else_branch=_branch("k_padded", padded, x3 + "_padded", x_type)))
    xg = b.op("Gather", x3, "block_cols", axis=1)                                   # [M, R, S, BC]
    xg = b.op("Reshape", xg, b.op("Concat", minus_one, rows, b.op("Mul", slots, bc), axis=0))  # [M, R, S*BC]
    xg = b.op("Transpose", xg, perm=[1, 0, 2])                                      # [R, M, S*BC]
    wt = b.op("Transpose", weight, perm=[0, 1, 3, 2])                               # [R, S, BC, BR]
    wt = b.op("Reshape", wt, b.op("Concat", rows, minus_one, br, axis=0))           # [R, S*BC, BR]
    if variant.int8_compute:
        # uint8 x uint8: the weights shifted by 128 with zero point 128. onnxruntime's uint8 x int8
        # GEMM on x86 without VNNI (AVX2, AVX-512 BW) adds pairs of products in int16 with
        # saturation (vpmaddubsw) and answers wrongly when they pass 32767; its uint8 x uint8 GEMM
        # widens first and is exact everywhere. The shift is on constants: folded at load.
        shift = b.op("Constant", value=helper.make_tensor("shift", TensorProto.INT32, [], [128]))
        wu = b.op("Cast", b.op("Add", b.op("Cast", wt, to=TensorProto.INT32), shift), to=TensorProto.UINT8)
        w_zero = b.op("Constant", value=helper.make_tensor("w_zero", TensorProto.UINT8, [], [128]))
        yr = b.op("MatMulInteger", xg, wu, "", w_zero)                              # int32 [R, M, BR]
        colsum = b.op("ReduceSum", b.op("Cast", "values", to=TensorProto.INT32), b.ints([1, 3]), keepdims=0)
        zp = b.op("Unsqueeze", b.op("Cast", x_zero, to=TensorProto.INT32), b.ints([0]))  # [1, M, 1]
        yr = b.op("Sub", yr, b.op("Mul", zp, b.op("Unsqueeze", colsum, b.ints([1]))))  # exact, int32
        yr = b.op("Cast", yr, to=TensorProto.FLOAT)
    else:
        yr = b.op("MatMul", xg, wt)                                                 # [R, M, BR]
    y = b.op("Transpose", yr, perm=[1, 0, 2])                                       # [M, R, BR]
    # [M, R, BR] holds [M, N] when BR divides N; else the last block row's extra columns are cut.
    ys = f"y_cut_{len(b.nodes)}"
    cut = [helper.make_node("Reshape", [y, b.op("Concat", minus_one, rows_br, axis=0)], [ys + "_2d"]),
           helper.make_node("Slice", [ys + "_2d", zero, n, one], [ys + "_cut"])]
    b.nodes.append(helper.make_node(
        "If", [b.op("Equal", rows_br, n)], [ys],
        then_branch=_branch("n_divisible", [helper.make_node("Identity", [y], [ys + "_same"])], ys + "_same"),
        else_branch=_branch("n_cut", cut, ys + "_cut")))
    if variant.int8_compute:
        ys = b.op("Mul", b.op("Mul", b.op("Reshape", ys, b.op("Concat", minus_one, n, axis=0)), x_scale), "scales")
    y = b.op("Reshape", ys, b.op("Concat", b.op("Shape", "X", start=0, end=-1), n, axis=0))  # [..., N]
    if variant.bias:
        y = b.op("Add", y, "bias")
    if variant.activation:
        y = b.op("Gelu", y, approximate=ACTIVATIONS[variant.activation])
    if variant.residual:
        y = b.op("Add", y, "residual")
    if variant.layer_norm:
        node = helper.make_node("LayerNormalization", [y, "ln_scale", "ln_bias"], ["Y"], axis=-1)
        ref = AttributeProto()
        ref.name, ref.type, ref.ref_attr_name = "epsilon", AttributeProto.FLOAT, "epsilon"
        node.attribute.append(ref)
        b.nodes.append(node)
    b.nodes[-1].output[0] = "Y"  # the last node computed y

    attributes = ["N", "K"] + (["activation"] if variant.activation else []) + \
        (["epsilon"] if variant.layer_norm else []) + (["compute"] if variant.int8_compute else [])
    fn = helper.make_function(DOMAIN, OP, variant.inputs(), ["Y"], b.nodes,
                              [helper.make_opsetid("", opset)], attributes=attributes,
                              doc_string=f"{OP} ({variant.overload}): Y = LayerNorm?(act(X @ W^T + bias) + "
                                         "residual), W in padded blocked-ELL")
    fn.overload = variant.overload
    return fn


def make_node(x: str, values: str, block_cols: str, row_nnz: str, output: str, n: int, k: int, *,
              bias: str | None = None, scales: str | None = None, activation: str = "",
              residual: str | None = None, layer_norm: tuple[str, str, float] | None = None,
              name: str | None = None, int8_compute: bool = False) -> onnx.NodeProto:
    """A BlockSparseLinear node; its overload follows from which optional inputs are given.
    `layer_norm`: (ln_scale, ln_bias, epsilon) to normalise each output row. `int8_compute`: the
    scales are per output row [N] and the layer runs in INT8 (attribute compute="int8")."""
    variant = Variant(bool(scales), bool(bias), activation, bool(residual), layer_norm is not None, int8_compute)
    ln_scale, ln_bias, epsilon = layer_norm or ("", "", None)
    inputs = [x, values, block_cols, row_nnz, bias or "", scales or "", residual or "", ln_scale, ln_bias]
    attrs: dict = {"activation": activation} if activation else {}
    if int8_compute:
        attrs["compute"] = "int8"
    if layer_norm is not None:
        attrs["epsilon"] = float(epsilon)
    node = helper.make_node(OP, inputs[:len(variant.inputs())], [output], name=name, domain=DOMAIN,
                            N=int(n), K=int(k), **attrs)
    node.overload = variant.overload
    return node


def attach_functions(model: onnx.ModelProto | ir.Model) -> Any:
    """Name each BlockSparseLinear node's variant (its overload, trailing absent inputs dropped) and
    add the function overloads (and the opset import) that the graph's nodes use; in place.
    Returns the model (a ModelProto is updated through onnx_ir and copied back)."""
    return attach_overloads(model, OP, Variant, function_proto)


def sparse_nodes(model: onnx.ModelProto | ir.Model | ir.Graph) -> list[Any]:
    """The BlockSparseLinear nodes of a model's main graph (NodeProtos or onnx_ir Nodes)."""
    return nodes_of(model, OP)


def stored_values(node: ir.Node) -> tuple[tuple[int, ...], ir.DataType, int, int] | None:
    """How a sparse node's `values` are stored in the file: (padded dims [R, S, BR, BC], data type,
    bytes, blocks stored), whether as one initializer or compacted (kept blocks + slot index read
    by a Gather, see compact_values). None when the values are not constants of the file."""
    values = node.inputs[1]
    if values is None:
        return None
    if values.const_value is not None and values.is_initializer():
        dims = tuple(values.const_value.shape)
        return dims, values.const_value.dtype, values.const_value.nbytes, dims[0] * dims[1]
    producer = values.producer()
    if producer is None or producer.op_type != "Gather" or not all(
            i is not None and i.is_initializer() and i.const_value is not None for i in producer.inputs):
        return None
    kept, slots = (i.const_value for i in producer.inputs)  # type: ignore[union-attr]
    dims = (*slots.shape, *kept.shape[1:])
    return tuple(dims), kept.dtype, kept.nbytes + slots.nbytes, int(kept.shape[0]) - 1


# ------------------------------------------------------------------------ torch.onnx translation
@functools.lru_cache(maxsize=1)
def _schema() -> OpSchema:
    """The inputs translation writes; the epilogue's (residual, ln_scale, ln_bias) and its
    attributes are added afterwards by the fuse_epilogues pass (see the module doc for all)."""
    return packed_schema(OP, "Y[..., N] = X[..., K] @ W^T + bias, W [N, K] as padded blocked-ELL blocks.",
                         ("output features", "input features"),
                         [OpSchema.Attribute("compute", OpSchema.AttrType.STRING, "fp32 or int8", required=False)])


@functools.lru_cache(maxsize=1)
def _onnxscript_op():
    return onnxscript_op(_schema())


def translate(x, values, block_cols, row_nnz, bias=None, scales=None, n: int = 0, k: int = 0,
              int8_compute: bool = False):
    """torch.onnx's translation of one `sparsec::block_sparse_linear` call: a single custom-domain
    node (its function body is attached by the attach_functions pass)."""
    if int8_compute:
        return _onnxscript_op()(x, values, block_cols, row_nnz, bias, scales, N=n, K=k, compute="int8")
    return _onnxscript_op()(x, values, block_cols, row_nnz, bias, scales, N=n, K=k)


def _io(name: str, leading: int, last: int | str) -> onnx.ValueInfoProto:
    dims: list[int | str] = [f"d{i}" for i in range(leading)] + [last]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _model(nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto], k: int, n: int,
           leading: int, opset: int, name: str, residual: bool = False) -> onnx.ModelProto:
    inputs = [_io("x", leading, k)] + ([_io("r", leading, n)] if residual else [])
    graph = helper.make_graph(list(nodes), name, inputs, [_io("y", leading, n)], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sparsec")
    model.ir_version = IR_VERSION
    return model


def compact_arrays(values: np.ndarray, row_nnz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`values` without its padding slots: the kept blocks [kept + 1, BR, BC] (the last one is zero)
    and a slot index [R, S] into them, so that `kept[slots]` is `values` again."""
    used = np.arange(values.shape[1])[None, :] < row_nnz[:, None]
    kept = values[used]
    blocks = np.concatenate([kept, np.zeros((1, *values.shape[2:]), values.dtype)])
    slots = np.full(used.shape, len(kept), dtype=np.int64)
    slots[used] = np.arange(len(kept))
    return blocks, slots


def compact_values(values: np.ndarray, row_nnz: np.ndarray, values_name: str
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Store `values` without its padding slots (compact_arrays), expanded by one Gather of
    constants that onnxruntime folds when the session loads (so the kernel still sees constant
    values). Returns the nodes and initializers that produce `values_name`."""
    blocks, slots = compact_arrays(values, row_nnz)
    inits = [numpy_helper.from_array(blocks, f"{values_name}.kept"),
             numpy_helper.from_array(slots, f"{values_name}.slots")]
    node = helper.make_node("Gather", [f"{values_name}.kept", f"{values_name}.slots"], [values_name], axis=0,
                            name=f"{values_name}.expand")
    return [node], inits


def weight_initializers(packed: PackedBlocks, bias: np.ndarray | None, compact: bool
                        ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A one-node model's weight as initializers W.values (compact_values when `compact`),
    W.block_cols, W.row_nnz, W.scales (INT8) and bias: (the nodes that expand them, initializers)."""
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(packed.block_cols, "W.block_cols"),
             numpy_helper.from_array(packed.row_nnz, "W.row_nnz")]
    if compact:
        nodes, extra = compact_values(packed.values, packed.row_nnz, "W.values")
        inits += extra
    else:
        inits.append(numpy_helper.from_array(packed.values, "W.values"))
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "bias"))
    if packed.scales is not None:
        inits.append(numpy_helper.from_array(packed.scales, "W.scales"))
    return nodes, inits


def single_layer_model(packed: PackedBlocks, bias: np.ndarray | None = None, *, leading: int = 1,
                       compact: bool = True, opset: int = ONNX_OPSET, activation: str = "",
                       residual: bool = False, layer_norm: tuple[np.ndarray, np.ndarray, float] | None = None,
                       name: str = "block_sparse_linear") -> onnx.ModelProto:
    """A model y = BlockSparseLinear(x) with the weight as initializers; x is [d0.., K] with
    `leading` dynamic leading dims. `compact` stores the values without padding slots (compact_values).
    `activation` and `residual` add the epilogue; the residual is a second input "r" shaped like y;
    `layer_norm` = (scale, bias, epsilon) normalises each output row."""
    nodes, inits = weight_initializers(packed, bias, compact)
    node = make_node("x", "W.values", "W.block_cols", "W.row_nnz", "y", packed.N, packed.K,
                     bias="bias" if bias is not None else None,
                     scales="W.scales" if packed.scales is not None else None, activation=activation,
                     residual="r" if residual else None,
                     layer_norm=("ln.scale", "ln.bias", layer_norm[2]) if layer_norm is not None else None,
                     name=name, int8_compute=packed.row_scales)
    if layer_norm is not None:
        inits += [numpy_helper.from_array(np.asarray(layer_norm[0], np.float32), "ln.scale"),
                  numpy_helper.from_array(np.asarray(layer_norm[1], np.float32), "ln.bias")]
    return attach_functions(_model([*nodes, node], inits, packed.K, packed.N, leading, opset, name, residual))


def dense_layer_model(weight: np.ndarray, bias: np.ndarray | None = None, *, leading: int = 1,
                      opset: int = ONNX_OPSET, name: str = "dense_linear") -> onnx.ModelProto:
    """The dense baseline y = x @ W^T (+ bias) as MatMul (+ Add), W^T stored as the initializer."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "W_t")]
    nodes = [helper.make_node("MatMul", ["x", "W_t"], ["xw" if bias is not None else "y"], name=name)]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["xw", "bias"], ["y"]))
    return _model(nodes, inits, k, n, leading, opset, name)
