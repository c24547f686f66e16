"""fuse_epilogues: Gelu, a residual Add and then a LayerNormalization fold into BlockSparseLinear;
the fold is exact, needs a same-shape Add and a single reader, and says why where it does not apply."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import pack, random_keep
from sparsec.passes import FuseEpilogues
from sparsec.passes.fuse_epilogues import fuse_epilogues
from tests.helpers import apply_rewrite as _apply
from tests.helpers import run_ort as _run


def _layer_then(op: str, residual_shape: tuple[int, ...] = (3, 8), second_reader: bool = False,
                layer_norm: str = "") -> onnx.ModelProto:
    """x -> BlockSparseLinear -> Gelu | Add(., r) (-> y), optionally with the layer's output also read
    elsewhere, or the Add followed by LayerNormalization ("last-axis", or "mean-read": its Mean
    output is read too)."""
    keep = random_keep(8, 16, (4, 4), 0.5, seed=0)
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    packed = pack(w, keep, (4, 4))
    inits = [numpy_helper.from_array(packed.values, "W.values"), numpy_helper.from_array(packed.block_cols, "W.cols"),
             numpy_helper.from_array(packed.row_nnz, "W.nnz"),
             numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "bias")]
    nodes = [onnx_op.make_node("x", "W.values", "W.cols", "W.nnz", "h", 8, 16, bias="bias")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])]
    if op == "Gelu":
        nodes.append(helper.make_node("Gelu", ["h"], ["y"], approximate="tanh"))
    else:
        nodes.append(helper.make_node("Add", ["h", "r"], ["s" if layer_norm else "y"]))
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(residual_shape)))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])]
    if layer_norm:
        inits += [numpy_helper.from_array(np.linspace(0.5, 2, 8).astype(np.float32), "ln.scale"),
                  numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "ln.bias")]
        ln_outputs = ["y", "mean"] if layer_norm == "mean-read" else ["y"]
        nodes.append(helper.make_node("LayerNormalization", ["s", "ln.scale", "ln.bias"], ln_outputs,
                                      axis=-1, epsilon=1e-3))
        if layer_norm == "mean-read":
            outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [3, 1]))
    if second_reader:
        nodes.append(helper.make_node("Identity", ["h"], ["h_copy"]))
        outputs.append(helper.make_tensor_value_info("h_copy", TensorProto.FLOAT, [3, 8]))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits,
                              value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 8]) for n in "hs"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return onnx_op.attach_functions(model)


def _feeds(model: onnx.ModelProto) -> dict:
    rng = np.random.default_rng(2)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def _folds_to_one_node(model: onnx.ModelProto, fused: int, overload: str, tol: float) -> onnx.NodeProto:
    """fuse_epilogues folds `fused` nodes into the layer, leaving one valid node of `overload` whose
    outputs match the original graph's within `tol`; returns that node."""
    feeds = _feeds(model)
    want = _run(model, feeds)[0]
    count, model = _apply(fuse_epilogues, model)
    assert count == fused
    onnx_op.attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["BlockSparseLinear"]
    node = model.graph.node[0]
    assert node.overload == overload
    np.testing.assert_allclose(_run(model, feeds)[0], want, rtol=tol, atol=tol)
    return node


@pytest.mark.parametrize("op", ["Gelu", "Add"])
def test_epilogue_folds_into_the_layer_and_matches(op):
    _folds_to_one_node(_layer_then(op), 1, "fp32_bias_gelu_tanh" if op == "Gelu" else "fp32_bias_residual", 1e-6)


@pytest.mark.parametrize("case", ["broadcast-add", "output-read-twice"])
def test_epilogue_needs_a_same_shape_add_and_a_single_reader(case):
    model = _layer_then("Add", residual_shape=(1, 8)) if case == "broadcast-add" else \
        _layer_then("Gelu", second_reader=True)
    assert _apply(fuse_epilogues, model)[0] == 0
    if case == "broadcast-add":
        reasons = FuseEpilogues().explain(ir.from_proto(model))
        assert any("is not provably the output's" in reason for reason in reasons)


def test_layer_norm_after_the_residual_folds_too():
    node = _folds_to_one_node(_layer_then("Add", layer_norm="last-axis"), 2, "fp32_bias_residual_ln", 1e-5)
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "epsilon")) == pytest.approx(1e-3)


def test_layer_norm_whose_statistics_are_read_stays():
    model = _layer_then("Add", layer_norm="mean-read")
    count, model = _apply(fuse_epilogues, model)
    assert count == 1  # the residual only
    assert [n.op_type for n in model.graph.node] == ["BlockSparseLinear", "LayerNormalization"]
