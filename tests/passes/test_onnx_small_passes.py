"""The ONNX passes that do not rewrite patterns: pin_input_dims, record_example_inputs,
attach_functions and compact_padding."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import pack, random_keep
from sparsec.lowering.onnx_graph import METADATA_INPUTS
from sparsec.passes import AttachFunctions, CompactPadding, PinInputDims, RecordExampleInputs
from tests.helpers import run_onnx_pass, run_ort


def _identity_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _dims(model: onnx.ModelProto) -> list:
    return [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]


def test_pin_input_dims_fixes_what_capture_specialized_only():
    modified, model = run_onnx_pass(PinInputDims(static=(("x", (1, None, 4)),)), _identity_model())
    assert modified and _dims(model) == [1, "s", 4]
    modified, model = run_onnx_pass(PinInputDims(static=(("other", (1, None, 4)),)), _identity_model())
    assert not modified and _dims(model) == ["b", "s", 4]


def test_record_example_inputs_writes_shapes_and_dtypes():
    _, model = run_onnx_pass(RecordExampleInputs(inputs=(((2, 8, 4), "float32"),)), _identity_model())
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[METADATA_INPUTS]) == {"x": {"shape": [2, 8, 4], "dtype": "float32"}}


def _sparse_model(balanced: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x @ W^T, W [32, 48] in 8x8 blocks: 4 block rows of 6, 3 blocks each when balanced."""
    keep = random_keep(32, 48, (8, 8), 0.5 if balanced else 0.4, seed=3, balanced=balanced)
    w = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32)
    packed = pack(w, keep, (8, 8))
    inits = [numpy_helper.from_array(packed.values, "W.values"), numpy_helper.from_array(packed.block_cols, "W.cols"),
             numpy_helper.from_array(packed.row_nnz, "W.nnz")]
    node = onnx_op.make_node("x", "W.values", "W.cols", "W.nnz", "y", 32, 48)
    node.overload = ""  # as torch.onnx writes it: attach_functions names the variant
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("sparsec", 1)])
    model.ir_version = onnx_op.IR_VERSION
    return model, (w * np.repeat(np.repeat(keep, 8, 0), 8, 1)[:32, :48])


def test_attach_functions_names_the_variant_and_adds_its_body():
    model, w = _sparse_model(balanced=False)
    modified, model = run_onnx_pass(AttachFunctions(), model)
    assert modified
    assert model.graph.node[0].overload == "fp32"
    assert [(f.name, f.overload) for f in model.functions] == [("BlockSparseLinear", "fp32")]
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_compact_padding_stores_only_kept_blocks_and_keeps_outputs():
    model, w = _sparse_model(balanced=False)
    _, model = run_onnx_pass(AttachFunctions(), model)
    modified, compact = run_onnx_pass(CompactPadding(), model, facts=("exported", "functions_attached"))
    assert modified
    assert [n.op_type for n in compact.graph.node] == ["Gather", "BlockSparseLinear"]
    assert {i.name for i in compact.graph.initializer} >= {"W.values.kept", "W.values.slots"}
    assert compact.ByteSize() < model.ByteSize()
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(compact, {"x": x})[0], run_ort(model, {"x": x})[0])


def test_compact_padding_leaves_balanced_rows_alone():
    model, _ = _sparse_model(balanced=True)
    _, model = run_onnx_pass(AttachFunctions(), model)
    modified, _ = run_onnx_pass(CompactPadding(), model, facts=("exported", "functions_attached"))
    assert not modified
