"""drop_softmax_nan_guards: the NaN guard after a decomposed attention softmax goes exactly where
the mask bias is finite, and stays (with the reason) where a whole row can be masked."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsec.passes import DropSoftmaxNanGuards
from tests.helpers import run_onnx_pass


def _guarded_attention(fill: float) -> onnx.ModelProto:
    """Softmax(q @ k + Where(mask, 0, fill)) followed by torch.onnx's NaN guard."""
    nodes = [helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
             helper.make_node("MatMul", ["q", "k"], ["scores"]),
             helper.make_node("Add", ["scores", "bias"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "p"], ["p_safe"]),
             helper.make_node("Identity", ["p_safe"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [4, 8]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [8, 4]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.array(fill, np.float32), "fill")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_guard_dropped_for_a_finite_mask_bias_and_outputs_unchanged():
    finite = _guarded_attention(float(np.finfo(np.float32).min))
    before = finite.SerializeToString()
    modified, finite = run_onnx_pass(DropSoftmaxNanGuards(), finite)
    assert modified
    assert [n.op_type for n in finite.graph.node] == ["Where", "MatMul", "Add", "Softmax", "Identity"]
    onnx.checker.check_model(finite, full_check=True)
    rng = np.random.default_rng(0)
    mask = rng.random((4, 4)) < 0.5
    mask[1] = False  # a fully masked row: uniform weights in both graphs, no NaN
    feed = {"q": rng.standard_normal((4, 8)).astype(np.float32),
            "k": rng.standard_normal((8, 4)).astype(np.float32), "mask": mask}
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_array_equal(run(finite.SerializeToString()), run(before))


def test_guard_stays_for_a_minus_inf_bias_and_says_why():
    minus_inf = _guarded_attention(-np.inf)  # a whole row can become NaN: the guard stays
    modified, after = run_onnx_pass(DropSoftmaxNanGuards(), minus_inf)
    assert not modified
    assert "IsNaN" in [n.op_type for n in after.graph.node]
    reasons = DropSoftmaxNanGuards().explain(ir.from_proto(minus_inf))
    assert any("the guard stays" in reason for reason in reasons)
