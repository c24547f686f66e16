"""The block-sparse convolution target (sparsec.lowering.targets.conv): conv2d as one
block_sparse_conv2d / BlockSparseConv, in PyTorch and in ONNX (kernel and stock onnxruntime), at
another batch and image size; BatchNormalization and Relu folded into the node; lowered where the
cost model or the measurement says it pays; unsupported convolutions stay dense with a reason."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import sparsec
from sparsec.ir import graph_info


class Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.strided = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.pointwise = torch.nn.Conv2d(64, 48, 1)
        self.dilated = torch.nn.Conv2d(48, 64, (3, 5), dilation=2, padding=(2, 4), bias=False)
        self.grouped = torch.nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.strided(x))
        x = torch.relu(self.pointwise(x))
        x = self.grouped(self.dilated(x))
        return self.fc(x.mean((2, 3)))


SITES = ["strided.weight", "pointwise.weight", "dilated.weight", "grouped.weight"]


@pytest.fixture(scope="module")
def prog():
    torch.manual_seed(0)
    spec = {"prune": [{"targets": SITES, "method": "magnitude", "density": 0.25, "block": [16, 16]}]}
    program = sparsec.compile(Convs().eval(), spec, (torch.randn(2, 3, 20, 20),))
    return program.eval()


def test_lowered_convolutions_compute_what_the_dense_ones_do(prog):
    lowered = prog.lower(policy="always")
    plans = graph_info(lowered).lowering
    assert [name for name in SITES if plans[name].lower] == SITES[:3]
    assert "groups = 4" in plans["grouped.weight"].reason and not plans["grouped.weight"].lower
    assert "3x5 kernel unfolded" in plans["dilated.weight"].reason
    dense = prog.finalize()
    for shape in ((2, 3, 20, 20), (1, 3, 17, 23)):        # odd sizes: every tap's slice length
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), dense(x), rtol=0, atol=1e-5)
    assert not any(n.target == torch.ops.aten.conv2d.default and n.args[1].target in SITES[:3]
                   for n in lowered.graph.nodes if n.op == "call_function")


def test_the_onnx_file_runs_on_the_kernel_and_on_stock_onnxruntime(prog, tmp_path):
    result = prog.export_onnx(tmp_path / "convs.onnx", policy="always")
    assert result.checks and all(check.error < 1e-4 for check in result.checks)
    import onnx

    ops = [n.op_type for n in onnx.load(tmp_path / "convs.onnx").graph.node]
    assert ops.count("BlockSparseConv") == 3 and "Conv" in ops    # c1 and the grouped one stay dense
    x = torch.randn(3, 3, 26, 18)
    with torch.no_grad():
        expected = prog.finalize()(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "convs.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    dense = tmp_path / "convs.dense.onnx"
    prog.export_onnx(dense, lower=False)
    assert (tmp_path / "convs.onnx").stat().st_size < dense.stat().st_size


def test_convolutions_are_lowered_where_they_pay(prog):
    plans = graph_info(prog.lower()).lowering          # policy cost, estimated (SPARSEC_MEASURE=0)
    pointwise, strided = plans["pointwise.weight"], plans["strided.weight"]
    # a quarter of the work: 1x1 convolutions read X in place (efficiency 0.6), others pay a copy
    assert pointwise.lower and pointwise.speedup == pytest.approx(0.6 / 0.25)
    assert not strided.lower and "too dense to gain: est. 1.40x < 1.5x" in strided.reason
    assert strided.conv == (3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 2, 32, 20, 20)   # geometry, then the image
    assert not any(p.lower for p in graph_info(prog.lower(policy="never")).lowering.values())
    stock = graph_info(prog.lower(target="stock")).lowering          # the body runs onnxruntime's Conv
    assert all(stock[name].speedup == 1.0 and not stock[name].lower for name in SITES[:3])


def test_a_convolution_is_timed_on_its_own_geometry_and_image(monkeypatch, tmp_path):
    from sparsec.lowering import calibrate

    monkeypatch.delenv("SPARSEC_MEASURE", raising=False)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "MEASURE_S", 0.02)
    spec = {"prune": [{"targets": ["conv.weight"], "method": "magnitude", "density": 0.1, "block": [16, 16]}]}

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(32, 64, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    prog = sparsec.compile(One().eval(), spec, (torch.randn(1, 32, 24, 24),))
    plan = graph_info(prog.lower(target="stock")).lowering["conv.weight"]
    assert plan.measured is not None and plan.basis.startswith("measured, input ") and "x32x24x24" in plan.basis
    assert plan.measured.dense_ms > 0 and plan.measured.sparse_ms > 0
    assert len(list((tmp_path / "cost").glob("*.json"))) == 1


class ResidualBlock(torch.nn.Module):
    """conv-bn-relu, conv-bn + shortcut, relu (a ResNet basic block), then a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.head = torch.nn.Conv2d(32, 32, 1)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.bn2(self.conv2(h)) + h))


def test_batch_norm_residual_and_relu_fold_into_the_node(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = ResidualBlock()
    with torch.no_grad():   # statistics that are not the identity
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    spec = {"prune": [{"targets": ["conv.weight", "conv2.weight", "head.weight"], "method": "magnitude",
                       "density": 0.25, "block": [8, 8]}]}
    prog = sparsec.compile(model.eval(), spec, (torch.randn(2, 16, 12, 12),)).eval()
    result = prog.export_onnx(tmp_path / "m.onnx", policy="always")
    assert result.checks and all(check.error < 1e-5 for check in result.checks)
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    assert [n.op_type for n in nodes if n.domain in ("", "ai.onnx") and n.op_type != "Gather"] == []
    convs = [n for n in nodes if n.op_type == "BlockSparseConv"]
    assert [n.overload for n in convs] == ["conv_fp32_bias_relu", "conv_fp32_bias_residual_relu", "conv_fp32_bias"]
    x = torch.randn(3, 16, 9, 13)
    with torch.no_grad():
        expected = prog.finalize()(x).numpy()
    from sparsec import runtime

    for session in (runtime.session(str(tmp_path / "m.onnx")),
                    ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])):
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_conv1d_stays_dense_with_a_reason():
    class Wave(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(16, 32, 3)

        def forward(self, x):
            return self.conv(x)

    spec = {"prune": [{"targets": ["conv.weight"], "method": "magnitude", "density": 0.25, "block": [16, 16]}]}
    prog = sparsec.compile(Wave().eval(), spec, (torch.randn(2, 16, 40),))
    plan = graph_info(prog.lower(policy="always")).lowering["conv.weight"]
    assert not plan.lower and "not a 2-D convolution" in plan.reason


def test_an_unbatched_image_stays_dense_with_a_reason():
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(16, 32, 3)

        def forward(self, x):
            return self.conv(x)

    spec = {"prune": [{"targets": ["conv.weight"], "method": "magnitude", "density": 0.25, "block": [16, 16]}]}
    prog = sparsec.compile(One().eval(), spec, (torch.randn(16, 12, 12),))   # [C, H, W]
    plan = graph_info(prog.lower(policy="always")).lowering["conv.weight"]
    assert not plan.lower and "[N, C, H, W]" in plan.reason


def test_int8_blocks_fold_the_batch_norm_too(tmp_path):
    import onnx

    torch.manual_seed(0)
    model = ResidualBlock()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    spec = {"prune": [{"targets": ["conv.weight", "conv2.weight", "head.weight"], "method": "magnitude",
                       "density": 0.25, "block": [8, 8]}]}
    prog = sparsec.compile(model.eval(), spec, (torch.randn(2, 16, 12, 12),)).eval()
    result = prog.export_onnx(tmp_path / "m.onnx", policy="always", int8=True)
    # requantized with the normalisation's scale folded in: within INT8's tolerance of the program
    assert result.checks and all(check.error < 5e-3 for check in result.checks)
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    assert [n.overload for n in nodes if n.op_type == "BlockSparseConv"] == [
        "conv_int8_bias_relu", "conv_int8_bias_residual_relu", "conv_int8_bias"]
    assert not [n for n in nodes if n.op_type in ("BatchNormalization", "Add", "Relu")]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")  # PyTorch's own
def test_string_paddings_same_and_valid_are_sites_and_lower(tmp_path):
    from sparsec import runtime

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.same = torch.nn.Conv2d(8, 32, (4, 3), padding="same", dilation=(1, 2))  # odd total: more below
            self.valid = torch.nn.Conv2d(32, 16, 3, padding="valid")

        def forward(self, x):
            return self.valid(torch.relu(self.same(x)))

    torch.manual_seed(0)
    spec = {"prune": [{"targets": ["same.weight", "valid.weight"], "method": "magnitude", "density": 0.25,
                       "block": [8, 8]}]}
    prog = sparsec.compile(Padded().eval(), spec, (torch.randn(2, 8, 10, 10),)).eval()
    plans = graph_info(prog.lower(policy="always")).lowering
    assert plans["same.weight"].lower and plans["same.weight"].conv[:10] == (4, 3, 1, 1, 1, 2, 2, 2, 1, 2)
    assert plans["valid.weight"].lower and plans["valid.weight"].conv[4:8] == (0, 0, 0, 0)
    result = prog.export_onnx(tmp_path / "m.onnx", policy="always")
    assert result.checks and all(check.error < 1e-5 for check in result.checks)
    x = torch.randn(3, 8, 13, 9)
    with torch.no_grad():
        expected = prog.finalize()(x).numpy()
    session = runtime.session(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape == (3, 16, 11, 7)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
