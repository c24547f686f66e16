"""The ONNX op `sparsec::Attention` (domain "sparsec", version 1): ONNX's Attention (opset 23) on
[batch, seq, heads * head] projections, computed by sparsec's kernel (sparsec/runtime/kernel/
attention.cc), with ONNX's Attention itself as its function body so that stock onnxruntime runs the
file unchanged.

    Y = sparsec::Attention <q_num_heads, kv_num_heads, scale?, is_causal?, compute> (Q, K, V, attn_mask?)

Q [B, Sq, Hq * D], K [B, Skv, Hkv * D], V [B, Skv, Hkv * Dv], attn_mask bool (False masks a key) or
float (added to the scores), broadcastable to [B, Hq, Sq, Skv]; Y [B, Sq, Hq * Dv]. With
`packed_qkv = [NQ, NK, NV]` (ints), Q, K and V are each [B, S, NQ + NK + NV] and the node takes
Q's columns [0, NQ), K's [NQ, NQ + NK) and V's [NQ + NK, ...): the fuse_qkv pass feeds it one
BlockSparseLinear's output three times, which the kernel reads in place (row strides) and the
function body splits. `compute`:
- "fp32": the kernel's AVX-512 fp32 path (onnxruntime's results within float rounding);
- "bf16": Q, K, V and the softmax weights rounded to bf16 for the two products, sums and softmax
  in fp32, on AMX tiles (Intel Sapphire Rapids and later), else with AVX512-BF16's dot products
  (AMD Zen 4 and 5, Intel Cooper Lake); where the CPU has neither, the fp32 path.
  About 2e-4 of BERT-base's output scale against fp32 (random weights).
The function body ignores `compute`: on stock onnxruntime the node is its Attention in fp32.

The kernel keeps onnxruntime's Attention's results where they matter to a user: a row whose scores
hold a NaN (or +inf) is NaN, a row with every key masked is 0 (NaN where a value is NaN or
infinite), a masked key weighs exactly 0 (tests/test_attention_kernel.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper

from sparsec.lowering.custom_ops import DOMAIN, DOMAIN_VERSION, IR_VERSION, ONNX_OPSET, attach_overloads, nodes_of

OP = "Attention"
COMPUTES = ("fp32", "bf16")
# the attributes the body passes on to ONNX's Attention, with their types
FORWARDED = {"q_num_heads": AttributeProto.INT, "kv_num_heads": AttributeProto.INT,
             "scale": AttributeProto.FLOAT, "is_causal": AttributeProto.INT}
INPUTS = ("Q", "K", "V", "attn_mask")


PACKED = "packed_qkv"   # the attribute of a node whose Q, K and V are columns of one tensor


@dataclass(frozen=True)
class Variant:
    """Whether a node has the mask input and reads Q, K, V packed; names its function overload."""

    mask: bool = False
    packed: bool = False

    @property
    def overload(self) -> str:
        return ("qkv_" if self.packed else "") + ("mask" if self.mask else "nomask")

    @classmethod
    def parse(cls, name: str) -> "Variant":
        packed = name.startswith("qkv_")
        rest = name[4:] if packed else name
        if rest not in ("mask", "nomask"):
            raise ValueError(f"unknown {OP} overload {name!r}")
        return cls(rest == "mask", packed)

    @classmethod
    def of(cls, node: onnx.NodeProto | ir.Node) -> "Variant":
        if isinstance(node, onnx.NodeProto):
            return cls(len(node.input) > 3 and node.input[3] != "", any(a.name == PACKED for a in node.attribute))
        return cls(len(node.inputs) > 3 and node.inputs[3] is not None, PACKED in node.attributes)

    def inputs(self) -> list[str]:
        return list(INPUTS[:4 if self.mask else 3])


def _reference(name: str, kind: int, to: str) -> AttributeProto:
    """An attribute `name` of a body node that takes the function's attribute `to`."""
    ref = AttributeProto()
    ref.name, ref.type, ref.ref_attr_name = name, kind, to
    return ref


def function_proto(variant: Variant, opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The body: one ONNX Attention node with the node's attributes (an absent `scale` or
    `is_causal` stays absent: Attention's defaults); a packed node first splits Q, K and V by
    `packed_qkv` and keeps its own part of each (onnxruntime merges the three identical Splits of one
    tensor, common subexpression elimination)."""
    if opset < 23:
        raise ValueError(f"{OP} needs ONNX opset >= 23 (Attention), not {opset}")
    nodes, inputs = [], variant.inputs()
    if variant.packed:
        sizes = helper.make_node("Constant", [], ["qkv_sizes"])
        sizes.attribute.append(_reference("value_ints", AttributeProto.INTS, PACKED))
        nodes.append(sizes)
        for i, name in enumerate(INPUTS[:3]):
            parts = [f"{name}_part{j}" for j in range(3)]
            nodes.append(helper.make_node("Split", [name, "qkv_sizes"], parts, axis=-1))
            inputs[i] = parts[i]
    node = helper.make_node("Attention", inputs, ["Y"])
    for name, kind in FORWARDED.items():
        node.attribute.append(_reference(name, kind, name))
    nodes.append(node)
    fn = helper.make_function(DOMAIN, OP, variant.inputs(), ["Y"], nodes, [helper.make_opsetid("", opset)],
                              attributes=[*FORWARDED, "compute"] + ([PACKED] if variant.packed else []),
                              doc_string=f"{OP} ({variant.overload}): ONNX Attention on 3-D projections "
                                         f"{'packed in one tensor ' if variant.packed else ''}"
                                         "(compute is the kernel's business)")
    fn.overload = variant.overload
    return fn


def attach_functions(model: onnx.ModelProto | ir.Model) -> Any:
    """Name each sparsec::Attention node's overload and add the function bodies it uses; in place."""
    return attach_overloads(model, OP, Variant, function_proto)


def attention_nodes(model: onnx.ModelProto | ir.Model | ir.Graph) -> list[Any]:
    """The sparsec::Attention nodes of a model's main graph."""
    return nodes_of(model, OP)


def single_node_model(shape: tuple[int, ...], compute: str = "", mask: str = "",
                      mask_shape: tuple[int, ...] = (), packed: bool = False, **attributes: Any) -> onnx.ModelProto:
    """One attention node on 3-D inputs q, k, v (and `mask`: "bool" | "float"), output y: ONNX's
    Attention (`compute` empty) or sparsec's with its function body. `shape` is (B, Sq, Skv, Hq,
    Hkv, D, Dv); `attributes` are scale / is_causal (q_num_heads and kv_num_heads come from it).
    `packed` (sparsec's, Sq == Skv): one input qkv [B, S, Hq * D + Hkv * D + Hkv * Dv] read three
    times, with packed_qkv."""
    B, Sq, Skv, Hq, Hkv, D, Dv = shape
    if packed:
        if not compute or Sq != Skv:
            raise ValueError("a packed node is sparsec's (compute set) with Sq == Skv")
        widths = [Hq * D, Hkv * D, Hkv * Dv]
        inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [B, Sq, sum(widths)])]
        names = ["qkv"] * 3
        attributes = {**attributes, PACKED: widths}
    else:
        inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, Sq, Hq * D]),
                  helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, Skv, Hkv * D]),
                  helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, Skv, Hkv * Dv])]
        names = ["q", "k", "v"]
    if mask:
        kind = TensorProto.BOOL if mask == "bool" else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info("mask", kind, list(mask_shape)))
        names.append("mask")
    extra = {"domain": DOMAIN, "compute": compute} if compute else {}
    node = helper.make_node("Attention", names, ["y"], q_num_heads=Hq, kv_num_heads=Hkv,
                            **attributes, **extra)
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, Sq, Hq * Dv])])
    opsets = [helper.make_opsetid("", ONNX_OPSET)] + ([helper.make_opsetid(DOMAIN, DOMAIN_VERSION)] if compute else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sparsec")
    model.ir_version = IR_VERSION
    return attach_functions(model) if compute else model
