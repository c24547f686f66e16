"""torch.onnx's custom translation of `sparsec::block_sparse_linear`: one
`sparsec::BlockSparseLinear` node per lowered layer.

`custom_translation_table()` is passed to `torch.onnx.export(..., dynamo=True)`. The node's
schema is declared here (not registered globally) so onnxscript can build the node; the model-local
FunctionProto that lets stock onnxruntime run the node (sparsec.lowering.onnx_op.function_proto)
is attached afterwards by `attach_functions`.
"""
from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema

DOMAIN = "sparsec"
OP_TYPE = "BlockSparseLinear"
VERSION = 1


@functools.lru_cache(maxsize=1)
def _schema() -> OpSchema:
    """The inputs translation writes; the epilogue's (residual, ln_scale, ln_bias) and its
    attributes are added afterwards by sparsec.lowering.onnx_fusions (see onnx_op for all)."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc="Y[..., N] = X[..., K] @ W^T + bias, W [N, K] as padded blocked-ELL blocks.",
        inputs=[param("X", "T"), param("values", "V"), param("block_cols", "tensor(int64)"),
                param("row_nnz", "tensor(int64)"), param("bias", "T", param_option=optional),
                param("scales", "T", param_option=optional)],
        outputs=[param("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"),
                          ("V", ["tensor(float)", "tensor(int8)"], "fp32 or int8 blocks")],
        attributes=[OpSchema.Attribute("N", OpSchema.AttrType.INT, "output features"),
                    OpSchema.Attribute("K", OpSchema.AttrType.INT, "input features")])


@functools.lru_cache(maxsize=1)
def _op():
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, VERSION), OP_TYPE, _schema())


def translate_block_sparse_linear(x, values, block_cols, row_nnz, bias=None, scales=None,
                                  n: int = 0, k: int = 0):
    """The ONNX form of one block_sparse_linear call: a single custom-domain node."""
    return _op()(x, values, block_cols, row_nnz, bias, scales, N=n, K=k)


def custom_translation_table() -> dict:
    from sparsec.lowering.torch_op import op

    return {op(): translate_block_sparse_linear}


def sparse_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def attach_functions(model: onnx.ModelProto) -> None:
    """Name each sparsec node's variant (NodeProto.overload) and add the model-local FunctionProto
    overloads that give them a standard-op body (sparsec.lowering.onnx_op)."""
    from sparsec.lowering import onnx_op

    for node in sparse_nodes(model):
        variant = onnx_op.Variant.of(node)
        del node.input[len(variant.inputs()):]   # no trailing absent optional inputs
        node.overload = variant.overload
    onnx_op.attach_functions(model)
