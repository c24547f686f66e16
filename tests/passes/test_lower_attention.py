"""lower_attention: ONNX Attention on 3-D projections becomes sparsec::Attention (its function body the
same Attention, so stock onnxruntime's results do not change); other Attentions stay, with the reason."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from sparsec.lowering import attention_op
from sparsec.passes import LowerAttention
from tests.helpers import run_ort

B, S, H, D = 2, 5, 2, 8
E = H * D


def graph(mask: bool = False, four_d: bool = False, softcap: float = 0.0, extra_output: bool = False,
          head: int = D) -> onnx.ModelProto:
    width = H * head
    shape = [B, H, S, head] if four_d else [B, S, width]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    names = ["q", "k", "v"]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, S, S]))
        names.append("mask")
    attrs = {} if four_d else {"q_num_heads": H, "kv_num_heads": H}
    if softcap:
        attrs["softcap"] = softcap
    outs = ["y", "present_k"] if extra_output else ["y"]
    node = helper.make_node("Attention", names, outs, scale=0.3, **attrs)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, S, head] if four_d else [B, S, width])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("present_k", TensorProto.FLOAT, [B, H, S, head]))
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def lowered_(model: onnx.ModelProto, **kw) -> tuple[bool, onnx.ModelProto, list[str]]:
    converted = ir.from_proto(model)
    pass_ = LowerAttention(**kw)
    reasons = pass_.explain(ir.from_proto(model))
    result = pass_.run(converted)
    return result.modified, ir.to_proto(converted), reasons


def feeds(mask: bool, head: int = D) -> dict:
    rng = np.random.default_rng(0)
    f = {n: rng.standard_normal((B, S, H * head)).astype(np.float32) for n in "qkv"}
    if mask:
        f["mask"] = rng.random((B, 1, S, S)) > 0.3
    return f


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("mask", [False, True])
def test_attention_becomes_sparsecs_with_the_same_results_on_stock_onnxruntime(compute, mask):
    model = graph(mask)
    want = run_ort(model, feeds(mask))[0]
    modified, out, _ = lowered_(model, compute=compute)
    assert modified
    onnx.checker.check_model(out)
    (node,) = out.graph.node
    assert (node.domain, node.op_type, node.overload) == ("sparsec", "Attention", "mask" if mask else "nomask")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"q_num_heads": H, "kv_num_heads": H, "scale": pytest.approx(0.3), "compute": compute.encode()}
    assert {(f.domain, f.name, f.overload) for f in out.functions} == {("sparsec", "Attention", node.overload)}
    np.testing.assert_array_equal(run_ort(out, feeds(mask))[0], want)


@pytest.mark.parametrize("kw,reason", [
    ({"four_d": True}, "4-D inputs"),
    ({"softcap": 2.0}, "softcap"),
    ({"extra_output": True}, None),   # a pattern of one output: the node is not even a match
])
def test_attentions_the_kernel_does_not_compute_stay_and_say_why(kw, reason):
    modified, out, reasons = lowered_(graph(**kw), compute="fp32")
    assert not modified
    assert [n.domain for n in out.graph.node] == [""]
    assert reason is None or any(reason in line for line in reasons), reasons


def test_max_head_keeps_larger_heads_on_onnxruntime():
    modified, _, reasons = lowered_(graph(head=128), compute="fp32", max_head=64)
    assert not modified and any("at most 64" in line for line in reasons)
    modified, out, _ = lowered_(graph(head=64), compute="fp32", max_head=64)
    assert modified and attention_op.attention_nodes(out)


def test_no_compute_leaves_the_file_alone():
    modified, out, _ = lowered_(graph(), compute="")
    assert not modified and out.graph.node[0].domain == ""


@pytest.mark.parametrize("speedup,lowered", [(2.0, True), (1.0, False)])
def test_measured_nodes_move_only_where_faster_and_say_what_was_measured(monkeypatch, speedup, lowered):
    from sparsec.lowering import calibrate
    from sparsec.passes.lower_attention import MEASURED

    cases = []

    def fake(case):
        cases.append(case)
        return calibrate.Measurement(1.0, 1.0 / speedup, "sparsec kernel", 10)

    monkeypatch.setattr(calibrate, "measure_attention", fake)
    modified, out, reasons = lowered_(graph(mask=True), compute="fp32", measure=True, threads=2)
    assert modified == lowered
    assert cases and cases[0] == calibrate.AttentionCase((1, S, S, H, H, D, D), "fp32", "bool", False, 2)
    if lowered:
        (node,) = out.graph.node
        props = {p.key: p.value for p in node.metadata_props}
        assert props[MEASURED].startswith("measured 2.00x onnxruntime's Attention")
    else:
        assert out.graph.node[0].domain == "" and any("measured 1.00x" in r and "as fast" in r for r in reasons)


def test_unmeasurable_nodes_fall_back_to_the_head_size_rule(monkeypatch):
    from sparsec.lowering import calibrate

    def unavailable(case):
        raise RuntimeError("sparsec's kernel is not available (test)")

    monkeypatch.setattr(calibrate, "measure_attention", unavailable)
    assert lowered_(graph(head=64), compute="fp32", measure=True, max_head=64)[0]
    assert not lowered_(graph(head=128), compute="fp32", measure=True, max_head=64)[0]


def test_a_real_measurement_is_cached_and_decides():
    """On this machine, with the kernel: the pass's choice is the cached measurement's."""
    from sparsec import runtime
    from sparsec.lowering import calibrate
    from sparsec.passes.lower_attention import MIN_SPEEDUP

    if not runtime.kernel_available():
        pytest.skip("native kernel not available")
    modified, _, _ = lowered_(graph(), compute="fp32", measure=True, threads=1)
    case = calibrate.AttentionCase((1, S, S, H, H, D, D), "fp32", "", False, 1)
    assert calibrate.cache_path(case).is_file()
    assert modified == (calibrate.measure_attention(case).speedup >= MIN_SPEEDUP)
