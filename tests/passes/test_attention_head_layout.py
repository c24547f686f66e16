"""attention_head_layout: ONNX Attention takes its [batch, seq, heads * head] projections as they are;
the rewrite is exact, leaves other layouts alone and says why."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec.passes import AttentionHeadLayout
from sparsec.passes.attention_head_layout import attention_head_layout
from tests.helpers import apply_rewrite as _apply
from tests.helpers import run_ort as _run

B, S, H, D = 2, 5, 3, 4
E = H * D


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
