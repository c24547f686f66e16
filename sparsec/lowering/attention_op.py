"""The ONNX op `sparsec::Attention` (domain "sparsec", version 1): ONNX's Attention (opset 23) on
[batch, seq, heads * head] projections, computed by sparsec's kernel (sparsec/runtime/kernel/
attention.cc), with ONNX's Attention itself as its function body so that stock onnxruntime runs the
file unchanged.

    Y = sparsec::Attention <q_num_heads, kv_num_heads, scale?, is_causal?, compute> (Q, K, V, attn_mask?)

Q [B, Sq, Hq * D], K [B, Skv, Hkv * D], V [B, Skv, Hkv * Dv], attn_mask bool (False masks a key) or
float (added to the scores), broadcastable to [B, Hq, Sq, Skv]; Y [B, Sq, Hq * Dv]. `compute`:
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


@dataclass(frozen=True)
class Variant:
    """Whether a node has the mask input; names its function overload."""

    mask: bool = False

    @property
    def overload(self) -> str:
        return "mask" if self.mask else "nomask"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        if name not in ("mask", "nomask"):
            raise ValueError(f"unknown {OP} overload {name!r}")
        return cls(name == "mask")

    @classmethod
    def of(cls, node: onnx.NodeProto | ir.Node) -> "Variant":
        if isinstance(node, onnx.NodeProto):
            return cls(len(node.input) > 3 and node.input[3] != "")
        return cls(len(node.inputs) > 3 and node.inputs[3] is not None)

    def inputs(self) -> list[str]:
        return list(INPUTS[:4 if self.mask else 3])


def function_proto(variant: Variant, opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The body: one ONNX Attention node with the node's attributes (an absent `scale` or
    `is_causal` stays absent: Attention's defaults)."""
    if opset < 23:
        raise ValueError(f"{OP} needs ONNX opset >= 23 (Attention), not {opset}")
    node = helper.make_node("Attention", variant.inputs(), ["Y"])
    for name, kind in FORWARDED.items():
        ref = AttributeProto()
        ref.name, ref.type, ref.ref_attr_name = name, kind, name
        node.attribute.append(ref)
    fn = helper.make_function(DOMAIN, OP, variant.inputs(), ["Y"], [node], [helper.make_opsetid("", opset)],
                              attributes=[*FORWARDED, "compute"],
                              doc_string=f"{OP} ({variant.overload}): ONNX Attention on 3-D projections "
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
                      mask_shape: tuple[int, ...] = (), **attributes: Any) -> onnx.ModelProto:
    """One attention node on 3-D inputs q, k, v (and `mask`: "bool" | "float"), output y: ONNX's
    Attention (`compute` empty) or sparsec's with its function body. `shape` is (B, Sq, Skv, Hq,
    Hkv, D, Dv); `attributes` are scale / is_causal (q_num_heads and kv_num_heads come from it)."""
    B, Sq, Skv, Hq, Hkv, D, Dv = shape
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, Sq, Hq * D]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, Skv, Hkv * D]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, Skv, Hkv * Dv])]
    if mask:
        kind = TensorProto.BOOL if mask == "bool" else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info("mask", kind, list(mask_shape)))
    extra = {"domain": DOMAIN, "compute": compute} if compute else {}
    node = helper.make_node("Attention", [i.name for i in inputs], ["y"], q_num_heads=Hq, kv_num_heads=Hkv,
                            **attributes, **extra)
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, Sq, Hq * Dv])])
    opsets = [helper.make_opsetid("", ONNX_OPSET)] + ([helper.make_opsetid(DOMAIN, DOMAIN_VERSION)] if compute else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sparsec")
    model.ir_version = IR_VERSION
    return attach_functions(model) if compute else model
