"""The ONNX passes' rewrite rules (attention_head_layout, fuse_epilogues) keep outputs exact, touch
only the patterns they are for, and say why where they do not apply."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import pack, random_keep
import onnx_ir as ir

from sparsec.passes import AttentionHeadLayout, FuseEpilogues
from sparsec.passes.attention_head_layout import attention_head_layout
from sparsec.passes.fuse_epilogues import fuse_epilogues


def _apply(rewrite, model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    """Run a rewrite (a function of an onnx_ir model returning a count) on a ModelProto."""
    converted = ir.from_proto(model)
    count = rewrite(converted)
    return count, ir.to_proto(converted)

B, S, H, D = 2, 5, 3, 4
E = H * D


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _attention_graph(k_perm=(0, 2, 1, 3), reader: str = "Reshape", dynamic_target: bool = False) -> onnx.ModelProto:
    """Attention over Q/K/V = Transpose(Reshape(x_i, [B, S, H, D])), output transposed back and read
    by `reader` (Reshape to [B, S, E], or Identity: the 4-D tensor is the graph output)."""
    nodes, inits = [], [numpy_helper.from_array(np.array([B, S, E], np.int64), "shape3")]
    if dynamic_target:  # [Shape(x)[0], Shape(x)[1], -1, D] computed at run time, as torch.onnx writes it
        inits += [numpy_helper.from_array(np.array([-1, D], np.int64), "tail")]
        nodes += [helper.make_node("Shape", ["q_in"], ["lead"], start=0, end=2),
                  helper.make_node("Concat", ["lead", "tail"], ["shape4"], axis=0)]
    else:
        inits.append(numpy_helper.from_array(np.array([B, S, H, D], np.int64), "shape4"))
    for name, perm in (("q", (0, 2, 1, 3)), ("k", k_perm), ("v", (0, 2, 1, 3))):
        nodes += [helper.make_node("Reshape", [f"{name}_in", "shape4"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=list(perm))]
    nodes.append(helper.make_node("Attention", ["qt", "kt", "vt"], ["att"], scale=0.5))
    nodes.append(helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]))
    if reader == "Reshape":
        nodes.append(helper.make_node("Reshape", ["att_t", "shape3"], ["y"]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])
    else:
        nodes.append(helper.make_node("Identity", ["att_t"], ["y"]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H, D])
    inputs = [helper.make_tensor_value_info(f"{n}_in", TensorProto.FLOAT, [B, S, E]) for n in "qkv"]
    graph = helper.make_graph(nodes, "attention", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return onnx.shape_inference.infer_shapes(model)


def _qkv() -> dict:
    rng = np.random.default_rng(0)
    return {f"{n}_in": rng.standard_normal((B, S, E)).astype(np.float32) for n in "qkv"}


@pytest.mark.parametrize("reader", ["Reshape", "Identity"])
@pytest.mark.parametrize("dynamic_target", [False, True], ids=["constant-shape", "computed-shape"])
def test_attention_takes_3d_projections_and_matches(reader, dynamic_target):
    model = _attention_graph(reader=reader, dynamic_target=dynamic_target)
    want = _run(model, _qkv())[0]
    count, model = _apply(attention_head_layout, model)
    assert count == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "Transpose" not in ops
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["q_num_heads"] == attrs["kv_num_heads"] == H and attrs["scale"] == 0.5
    np.testing.assert_allclose(_run(model, _qkv())[0], want, rtol=1e-6, atol=1e-6)


def test_attention_with_another_layout_is_left_alone():
    model = _attention_graph(k_perm=(0, 2, 3, 1))  # K already transposed for Q @ K: not this pattern
    before = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    count, after = _apply(attention_head_layout, model)
    assert count == 0
    assert [(n.op_type, list(n.input), list(n.output)) for n in after.graph.node] == before
    reasons = AttentionHeadLayout().explain(ir.from_proto(model))
    assert any("k is not Transpose(Reshape" in reason for reason in reasons)


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
