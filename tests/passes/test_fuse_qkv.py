"""fuse_qkv: an attention's three projections of one input become one BlockSparseLinear whose output
the Attention reads packed; the result is unchanged (bit for bit on the kernel), in every precision,
and the pass says why where it does not apply."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsec import runtime
from sparsec.lowering import attention_op, onnx_op
from sparsec.lowering.block_format import pack, random_keep
from sparsec.passes import FuseQkvProjections
from tests.helpers import run_ort

B, S, K, HQ, HKV = 2, 5, 24, 4, 2


def _graph(precision: str = "fp32", d: int = 4, dv: int = 6, block: tuple[int, int] = (4, 4),
           q_activation: str = "", q_also_output: bool = False, onnx_attention: bool = False) -> onnx.ModelProto:
    """x [B, S, K] -> Q (bias), K (no bias), V (bias) projections -> sparsec::Attention(q, k, v, mask)
    with HQ query and HKV key/value heads of d (values dv); precision "fp32", "int8" (int8 blocks
    with a scale each) or "int8dq" (INT8 compute, a scale per output row)."""
    rng = np.random.default_rng(0)
    widths = {"q": HQ * d, "k": HKV * d, "v": HKV * dv}
    nodes, inits = [], []
    for i, (name, n) in enumerate(widths.items()):
        w = rng.standard_normal((n, K)).astype(np.float32)
        packed = pack(w, random_keep(n, K, block, 0.5, seed=i), block, int8=precision != "fp32",
                      per_row=precision == "int8dq")
        inits += [numpy_helper.from_array(packed.values, f"{name}.values"),
                  numpy_helper.from_array(packed.block_cols, f"{name}.cols"),
                  numpy_helper.from_array(packed.row_nnz, f"{name}.nnz")]
        if packed.scales is not None:
            inits.append(numpy_helper.from_array(packed.scales, f"{name}.scales"))
        if name != "k":
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{name}.bias"))
        nodes.append(onnx_op.make_node("x", f"{name}.values", f"{name}.cols", f"{name}.nnz", name, n, K,
                                       bias=None if name == "k" else f"{name}.bias",
                                       scales=f"{name}.scales" if packed.scales is not None else None,
                                       activation=q_activation if name == "q" else "",
                                       int8_compute=precision == "int8dq", name=f"proj_{name}"))
    sparsec_attention = {} if onnx_attention else {"domain": "sparsec", "compute": "fp32"}
    nodes.append(helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], q_num_heads=HQ, kv_num_heads=HKV,
                                  name="attention", **sparsec_attention))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, HQ * dv])]
    if q_also_output:
        outputs.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, S, widths["q"]]))
    graph = helper.make_graph(
        nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, K]),
                       helper.make_tensor_value_info("mask", TensorProto.BOOL, [B, 1, S, S])],
        outputs, inits,
        value_info=[helper.make_tensor_value_info(name, TensorProto.FLOAT, [B, S, n]) for name, n in widths.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("sparsec", 1)])
    model.ir_version = 10
    onnx_op.attach_functions(model)
    return attention_op.attach_functions(model)


def _feeds() -> dict:
    rng = np.random.default_rng(1)
    mask = rng.random((B, 1, S, S)) > 0.3
    mask[..., 0] = True
    return {"x": rng.standard_normal((B, S, K)).astype(np.float32), "mask": mask}


def _fuse(model: onnx.ModelProto, split: bool = False) -> tuple[bool, onnx.ModelProto, list[str]]:
    """(whether fuse_qkv changed the model, the model with its functions attached, the reasons it gives)."""
    converted = ir.from_proto(model)
    reasons = FuseQkvProjections(split=split).explain(converted)
    changed = FuseQkvProjections(split=split).run(converted).modified
    out = ir.to_proto(converted)
    onnx_op.attach_functions(out)
    return changed, out, reasons


def _kernel(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return runtime.session(model.SerializeToString(), threads=2).run(None, feeds)[0]


@pytest.mark.parametrize("block", [(4, 4), (8, 1), (1, 8), (2, 16)], ids=["4x4", "8x1", "1x8", "2x16"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "int8dq"])
def test_three_projections_become_one_node_read_packed(precision, block):
    """Every block shape: column vectors (V's 12 rows end in a partial block row of 8), row vectors
    (INT8 compute packs them as windows), blocks wider than K's 24 columns allow (a partial block
    column)."""
    model, feeds = _graph(precision, block=block), _feeds()
    changed, fused, _ = _fuse(model)
    assert changed
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["BlockSparseLinear", "Attention"]
    linear, attention = fused.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert list(attrs[attention_op.PACKED]) == [HQ * 4, HKV * 4, HKV * 6]
    assert list(attention.input[:3]) == [linear.output[0]] * 3 and attention.overload == "qkv_mask"
    assert {a.name: helper.get_attribute_value(a) for a in linear.attribute}["N"] == HQ * 4 + HKV * 4 + HKV * 6
    assert linear.overload == {"fp32": "fp32_bias", "int8": "int8_bias", "int8dq": "int8dq_bias"}[precision]
    assert {f.name + ":" + f.overload for f in fused.functions} == {"Attention:qkv_mask", f"BlockSparseLinear:{linear.overload}"}
    # stock onnxruntime runs the function bodies: the same results
    np.testing.assert_allclose(run_ort(fused, feeds)[0], run_ort(model, feeds)[0], atol=2e-6, rtol=0)
    if runtime.kernel_available():   # the kernel: the same rows, the same arithmetic, the same bits
        np.testing.assert_array_equal(_kernel(fused, feeds), _kernel(model, feeds))


@pytest.mark.parametrize("case,reason", [
    ("epilogue", "has an epilogue"),
    ("partial-block-row", "is not whole block rows of 8"),
    ("read-elsewhere", None),   # the rewriter itself keeps a pattern whose inner value is read outside it
])
def test_projections_that_cannot_fuse_stay_and_say_why(case, reason):
    model = {"epilogue": lambda: _graph(q_activation="gelu"),
             "partial-block-row": lambda: _graph(d=6, block=(8, 4)),      # K is 12 wide: a block row and a half
             "read-elsewhere": lambda: _graph(q_also_output=True)}[case]()
    changed, same, reasons = _fuse(model)
    assert not changed
    assert [n.op_type for n in same.graph.node].count("BlockSparseLinear") == 3
    assert reason is None or any(reason in r for r in reasons), reasons


def test_cross_attention_keeps_its_projections():
    """K and V projected from another input than Q: nothing to share."""
    model = _graph()
    model.graph.input.append(helper.make_tensor_value_info("memory", TensorProto.FLOAT, [B, S, K]))
    for node in model.graph.node:
        if node.name in ("proj_k", "proj_v"):
            node.input[0] = "memory"
    changed, same, _ = _fuse(model)
    assert not changed and [n.op_type for n in same.graph.node].count("BlockSparseLinear") == 3


@pytest.mark.parametrize("precision", ["fp32", "int8dq"])
def test_before_onnx_attention_the_stock_target_fuses_with_a_split(precision):
    """`split` (the stock target): ONNX's own Attention reads the fused node's output split in
    three; without it the three projections stay."""
    model, feeds = _graph(precision, onnx_attention=True), _feeds()
    assert not _fuse(model)[0]
    changed, fused, _ = _fuse(model, split=True)
    assert changed
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["BlockSparseLinear", "Split", "Attention"]
    split = fused.graph.node[1]
    sizes = next(t for t in fused.graph.initializer if t.name == split.input[1])
    assert list(numpy_helper.to_array(sizes)) == [HQ * 4, HKV * 4, HKV * 6]
    assert fused.graph.node[2].domain == "" and list(fused.graph.node[2].input[:3]) == list(split.output)
    np.testing.assert_allclose(run_ort(fused, feeds)[0], run_ort(model, feeds)[0], atol=2e-6, rtol=0)
    if runtime.kernel_available():
        np.testing.assert_array_equal(_kernel(fused, feeds), _kernel(model, feeds))
