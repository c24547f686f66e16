"""ONNX export: one sparsec node per lowered layer, function bodies, checker, onnxruntime numerics
(stock and with the kernel), dynamic shapes, INT8, the negative case and transformers models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import sparsec
from sparsec import runtime
import onnx_ir as ir

from sparsec.export import ExportError
from sparsec.export.check import feeds, relative_error
from sparsec.export.onnx_export import outputs
from sparsec.lowering.onnx_op import DOMAIN, OP_TYPE, sparse_nodes, stored_values
from tests.helpers import spec_dict, zoo_inputs, zoo_model


class Odd(torch.nn.Module):
    """Shapes no block divides: 45 -> 70 -> 33."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(45, 70)
        self.fc2 = torch.nn.Linear(70, 33, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _prog(model=None, args=None, kwargs=None, density=0.3, block=(16, 16)):
    torch.manual_seed(0)
    model = model or Odd()
    args = args if args is not None else (torch.randn(4, 45),)
    spec = spec_dict(["*"], method="magnitude", density=density, scope="local", block=block)
    return sparsec.compile(model, spec, args, kwargs).eval()


def _kernel_or_skip():
    from sparsec import runtime

    if not runtime.kernel_available():
        pytest.skip(f"native kernel not available: {runtime.unavailable_reason()}")
    return runtime


def _all_ops(model: onnx.ModelProto) -> set[str]:
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    return ops


@pytest.mark.parametrize("block", [(16, 16), (32, 32)])
def test_one_node_per_layer_checker_and_stock_onnxruntime(tmp_path, block):
    prog = _prog(block=block)
    result = prog.export_onnx(tmp_path / "m.onnx", policy="always")
    model = onnx.load(result.path)
    onnx.checker.check_model(model, full_check=True)
    nodes = sparse_nodes(model)
    assert len(nodes) == 2 and result.sparse_nodes == 2
    assert {n.op_type for n in model.graph.node} >= {OP_TYPE}
    assert not any(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)
    assert {(f.domain, f.name) for f in model.functions} == {(DOMAIN, OP_TYPE)}
    assert {f.overload for f in model.functions} == {"fp32", "fp32_bias"}
    assert "ScatterND" not in _all_ops(model)
    assert result.checks[0].runtime == "onnxruntime" and result.checks[0].error < 1e-5
    assert result.error_vs_dense is not None and result.error_vs_dense < 1e-5


@pytest.mark.parametrize("block", [(32, 32), (1, 1), (1, 16)], ids=["32x32", "unstructured", "1x16"])
@pytest.mark.parametrize("rows", [1, 7, 128])
def test_dynamic_batch_on_stock_onnxruntime_and_kernel(tmp_path, rows, block):
    prog = _prog(block=block)
    path = prog.export_onnx(tmp_path / "m.onnx", policy="always").path
    x = torch.randn(rows, 45, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        want = prog(x).numpy()
    stock = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert relative_error(stock.run(None, {stock.get_inputs()[0].name: x.numpy()}), [want]) < 1e-5
    runtime = _kernel_or_skip()
    kernel = runtime.session(path, threads=2)
    assert relative_error(kernel.run(None, {kernel.get_inputs()[0].name: x.numpy()}), [want]) < 1e-5


def test_export_checks_with_the_kernel_when_available(tmp_path):
    result = _prog().export_onnx(tmp_path / "m.onnx", policy="always")
    runtimes = [c.runtime for c in result.checks]
    from sparsec import runtime

    if runtime.kernel_available():
        assert runtimes == ["onnxruntime", "onnxruntime + sparsec kernel"] * 2
    else:
        assert runtimes == ["onnxruntime"] * 2 and result.notes
    # the example inputs, then another batch along the file's dynamic batch dimension
    assert [c.inputs for c in result.checks[::len(runtimes) // 2]] == [{"x": [4, 45]}, {"x": [5, 45]}]


def test_int8_compute_with_per_row_scales(tmp_path):
    prog = _prog(block=(16, 16))
    result = prog.export_onnx(tmp_path / "m8.onnx", policy="always", int8=True)
    model = onnx.load(result.path)
    inits = {i.name: i for i in model.graph.initializer}
    node = sparse_nodes(model)[1]  # fc2: no bias, so input 4 is "" and 5 the scales
    assert node.input[4] == "" and inits[node.input[5]].data_type == onnx.TensorProto.FLOAT
    assert list(inits[node.input[5]].dims) == [onnx.helper.get_node_attr_value(node, "N")]  # one per row
    assert onnx.helper.get_node_attr_value(node, "compute") == b"int8"
    assert stored_values(sparse_nodes(ir.load(result.path))[1])[1] == ir.DataType.INT8
    assert {f.overload for f in model.functions} == {"int8dq", "int8dq_bias"}
    assert max(c.error for c in result.checks) < 1e-3      # onnxruntime vs the INT8 PyTorch program
    assert 0 < result.error_vs_dense < 2e-2                  # the quantization's cost vs fp32


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_int8_without_vnni_says_it_is_slower(tmp_path, monkeypatch, isa):
    """On a CPU whose kernel computes INT8 on AVX2 (no VNNI: AMD Zen 3, Intel before Ice Lake) the
    report says INT8 buys size, not speed there; with VNNI (SPARSEC_KERNEL_ISA caps it) nothing."""
    from sparsec import runtime

    if runtime.kernel_path() is None:
        pytest.skip("native kernel not available")
    from sparsec.runtime.build import library_isa

    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    if isa == "avx512" and library_isa(runtime.kernel_path(), int8=True) != "avx512":
        pytest.skip("this CPU has no AVX-512 VNNI")
    result = _prog(block=(16, 16)).export_onnx(tmp_path / "m8.onnx", policy="always", int8=True)
    said = [n for n in result.notes if "no AVX-512 VNNI" in n]
    if isa == "avx2":
        assert len(said) == 1 and "kernel's avx2 path" in said[0] and "not speed" in said[0]
    else:
        assert said == []


def test_mismatch_is_a_clear_user_error(tmp_path):
    prog = _prog()
    with pytest.raises(ExportError, match=r"differs from .* by .*allowed 1e-12"):
        prog.export_onnx(tmp_path / "m.onnx", policy="always", tolerance=1e-12)
    assert not any(tmp_path.iterdir())   # nothing half-written


def test_unknown_option_is_rejected(tmp_path):
    with pytest.raises(ExportError, match="unknown option speed"):
        _prog().export_onnx(tmp_path / "m.onnx", speed=True)


def test_all_too_dense_stays_dense(tmp_path):
    result = _prog(density=0.9).export_onnx(tmp_path / "m.onnx")
    model = onnx.load(result.path)
    assert result.sparse_nodes == 0 and not sparse_nodes(model) and not model.functions
    assert not any(o.domain == DOMAIN for o in model.opset_import)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformers_models_export_and_match(tmp_path, name):
    model = zoo_model(name)
    args, kwargs = zoo_inputs(name, 2, 8)
    prog = _prog(model, args, kwargs, density=0.3)
    result = prog.export_onnx(tmp_path / f"{name}.onnx", policy="always")
    assert result.sparse_nodes >= 4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    other_args, other_kwargs = zoo_inputs(name, 3, 5)   # dynamic batch and sequence
    with torch.no_grad():
        want = outputs(prog(*other_args, **other_kwargs))
    got = session.run(None, feeds(session, other_args, other_kwargs))
    assert relative_error(got, want) < 1e-4
    assert all(np.isfinite(g).all() for g in got)
    # attention runs as one ONNX Attention on [batch, seq, heads * head] projections: no Transposes
    onnx_model = onnx.load(result.path)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert "Attention" in ops and "Transpose" not in ops
    assert all(any(a.name == "q_num_heads" for a in n.attribute) for n in onnx_model.graph.node
               if n.op_type == "Attention")
    if name == "bert":  # Gelu and the residual Adds are folded into the sparse layers' epilogue
        assert "Gelu" not in ops
        assert any(a.name == "activation" and a.s == b"gelu" for n in sparse_nodes(onnx_model) for a in n.attribute)
        assert sum(len(n.input) >= 7 for n in sparse_nodes(onnx_model)) >= 2   # residual (and LayerNorm)
        assert sum(len(n.input) == 9 for n in sparse_nodes(onnx_model)) >= 2
    if runtime.kernel_available():
        session = runtime.session(result.path)
        got = session.run(None, feeds(session, other_args, other_kwargs))
        assert relative_error(got, want) < 1e-4


def test_padding_slots_are_not_stored(tmp_path):
    """Magnitude masks keep unequal block counts per block row; the file stores only kept blocks
    (a Gather of constants rebuilds the padded layout at load) and still matches PyTorch."""
    prog = _prog(density=0.3, block=(16, 16))
    result = prog.export_onnx(tmp_path / "m.onnx", policy="always")
    model = ir.load(str(result.path))
    compacted = 0
    for node in sparse_nodes(model):
        (r, s, br, bc), _, nbytes, blocks = stored_values(node)
        assert blocks <= r * s
        compacted += blocks < r * s
    assert compacted >= 1
    assert "Gather" in {n.op_type for n in model.graph}
    assert max(c.error for c in result.checks) < 1e-4


def test_an_example_batch_of_1_still_gives_a_dynamic_batch(tmp_path):
    """torch.export fixes a dimension whose example size is 1; capture repeats a batch of 1 to 2, so
    the program and its file take any batch, and any sequence length."""
    model = zoo_model("bert")
    args, kwargs = zoo_inputs("bert", 1, 8)
    prog = _prog(model, args, kwargs, density=0.3)
    result = prog.export_onnx(tmp_path / "b1.onnx", policy="always")
    dims = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in onnx.load(result.path).graph.input]
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 5), (3, 6)):
        other_args, other_kwargs = zoo_inputs("bert", batch, seq)
        with torch.no_grad():
            want = outputs(prog(*other_args, **other_kwargs))
        assert relative_error(session.run(None, feeds(session, other_args, other_kwargs)), want) < 1e-4


def test_outputs_keep_the_models_names_in_both_files(tmp_path):
    model = zoo_model("gpt2")
    args, kwargs = zoo_inputs("gpt2", 2, 8)
    prog = _prog(model, args, kwargs, density=0.3)
    sparse = onnx.load(prog.export_onnx(tmp_path / "s.onnx", policy="always").path)
    dense = onnx.load(prog.export_onnx(tmp_path / "d.onnx", lower=False).path)
    assert [o.name for o in sparse.graph.output] == [o.name for o in dense.graph.output] == ["logits"]
