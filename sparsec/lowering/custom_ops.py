"""What every sparsec ONNX op shares (BlockSparseLinear in sparsec.lowering.onnx_op,
BlockSparseConv in sparsec.lowering.conv_op): the domain and the ONNX versions, the lookup of an
op's nodes, the attachment of its function overloads, its schema's common part and the onnxscript
op torch.onnx's translations call.
"""
from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
from onnx.defs import OpSchema

DOMAIN = "sparsec"
DOMAIN_VERSION = 1
# Opset 23 has `Attention` (scaled_dot_product_attention exports as one node, onnxruntime's fused CPU
# kernel); Gelu in the activation epilogue needs 20. The one place sparsec names its ONNX opset.
ONNX_OPSET = 23
IR_VERSION = 10  # function overloads need IR >= 10


def nodes_of(model: onnx.ModelProto | ir.Model | ir.Graph, op_type: str) -> list[Any]:
    """The nodes of sparsec's op `op_type` in a model's main graph (NodeProtos or onnx_ir Nodes)."""
    if isinstance(model, onnx.ModelProto):
        return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op_type]
    graph = model.graph if isinstance(model, ir.Model) else model
    return [n for n in graph if n.domain == DOMAIN and n.op_type == op_type]


def attach_overloads(model: onnx.ModelProto | ir.Model, op_type: str, variant: Any, body: Any) -> Any:
    """attach_functions for any of sparsec's ops: `variant` reads a node's variant (`of`) and names
    it (`overload`, `parse`, `inputs`); `body(variant, opset)` is its FunctionProto."""
    if isinstance(model, onnx.ModelProto):
        converted = ir.from_proto(model)
        attach_overloads(converted, op_type, variant, body)
        model.CopyFrom(ir.to_proto(converted))
        return model
    opset = model.opset_imports.get("", ONNX_OPSET)
    needed = set()
    for node in nodes_of(model, op_type):
        found = variant.of(node)
        node.resize_inputs(len(found.inputs()))
        node.overload = found.overload
        needed.add(found.overload)
    for name in sorted(needed):
        if (DOMAIN, op_type, name) not in model.functions:
            function = ir.serde.deserialize_function(body(variant.parse(name), opset=opset))
            model.functions[function.identifier()] = function
    if needed:
        model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
        model.ir_version = max(model.ir_version or 0, IR_VERSION)
    return model


def packed_schema(op_type: str, doc: str, n_and_k: tuple[str, str], attributes: list[Any]) -> OpSchema:
    """The schema of one of sparsec's ops on packed blocks: inputs X, values, block_cols, row_nnz,
    bias and scales (the last two optional), output Y, attributes N and K (described by `n_and_k`)
    and `attributes`."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        op_type, DOMAIN, DOMAIN_VERSION, doc=doc,
        inputs=[param("X", "T"), param("values", "V"), param("block_cols", "tensor(int64)"),
                param("row_nnz", "tensor(int64)"), param("bias", "T", param_option=optional),
                param("scales", "T", param_option=optional)],
        outputs=[param("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"),
                          ("V", ["tensor(float)", "tensor(int8)"], "fp32 or int8 blocks")],
        attributes=[OpSchema.Attribute("N", OpSchema.AttrType.INT, n_and_k[0]),
                    OpSchema.Attribute("K", OpSchema.AttrType.INT, n_and_k[1]), *attributes])


def onnxscript_op(schema: OpSchema) -> Any:
    """The onnxscript Op that torch.onnx's translations call for one of sparsec's ops."""
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), schema.name, schema)
