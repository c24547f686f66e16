"""sparsec's convolution kernel (sparsec/runtime/kernel/block_sparse_conv.cc) and the BlockSparseConv
function body, one node at a time: against PyTorch's conv2d of the same masked weight on every
instruction set, for strides, paddings (asymmetric too), dilations, 1x1 and 7x7 kernels, every
block height (the tiles of 1 to 6 channels), odd image sizes, batches; the residual and ReLU
epilogue; where a NaN pixel lands; and the node's validation (attributes at session creation, X
and the residual at each call)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsec import runtime
from sparsec.lowering import block_format, conv_op

pytestmark = pytest.mark.skipif(not runtime.kernel_available(), reason="sparsec's kernel is not available here")

# (batch, C, H, W, O, kernel, stride, pads [top, left, bottom, right], dilation, block)
CASES = [
    (2, 8, 5, 7, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (4, 4)),
    (1, 16, 9, 9, 64, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (16, 1)),      # in place (no copy)
    (3, 5, 11, 6, 13, (3, 2), (2, 1), (1, 0, 1, 0), (2, 1), (1, 1)),       # unstructured
    (1, 64, 20, 20, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (32, 32)),
    (2, 48, 14, 14, 40, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (32, 32)),   # ResNet's downsample
    (1, 3, 17, 19, 24, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), (8, 8)),      # ResNet's stem
    (1, 6, 4, 4, 7, (3, 3), (1, 1), (2, 1, 0, 3), (2, 2), (1, 4)),         # asymmetric pads
    (1, 12, 31, 3, 9, (2, 3), (3, 1), (0, 1, 2, 1), (1, 1), (3, 6)),       # odd block height
]


def _case(case, density=0.3, seed=1):
    b, c, h, w, o, (kh, kw), (sh, sw), pads, (dh, dw), block = case
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((o, c * kh * kw)).astype(np.float32)
    keep = block_format.random_keep(o, c * kh * kw, block, density, seed=seed)
    packed = block_format.pack(weight, keep, block=block)
    dense = block_format.unpack(packed).reshape(o, c, kh, kw)
    geometry = [kh, kw, sh, sw, *pads, dh, dw]
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    return packed, dense, geometry, x, bias


def _torch_conv(x, dense, bias, geometry, relu=False):
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw = geometry
    padded = torch.nn.functional.pad(torch.from_numpy(x), (pl, pr, pt, pb))
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(dense), None if bias is None else torch.from_numpy(bias),
                                   (sh, sw), 0, (dh, dw))
    return (torch.relu(y) if relu else y).numpy()


def _run(model, x, isa=None, monkeypatch=None, stock=False):
    """The model's output on x (an array for input "x", or a dict of feeds)."""
    if stock:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    else:
        if isa is not None:
            monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
        session = runtime.session(model.SerializeToString(), threads=2)
    return session.run(None, x if isinstance(x, dict) else {"x": x})[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[5][0]}x{c[5][1]}s{c[6][0]}b{c[9][0]}x{c[9][1]}" for c in CASES])
@pytest.mark.parametrize("engine", ["avx512", "avx2", "scalar", "stock"])
def test_the_node_computes_pytorchs_convolution(case, engine, monkeypatch):
    packed, dense, geometry, x, bias = _case(case)
    for with_bias, relu, residual in ((True, False, False), (False, True, False), (True, True, True)):
        b = bias if with_bias else None
        model = conv_op.single_layer_model(packed, geometry, ["b", "c", "h", "w"], b, activation="relu" if relu else "",
                                           residual=residual)
        expected = _torch_conv(x, dense, b, geometry)
        feeds = {"x": x}
        if residual:   # added before the activation
            feeds["r"] = np.random.default_rng(5).standard_normal(expected.shape).astype(np.float32)
            expected = expected + feeds["r"]
        if relu:
            expected = np.maximum(expected, 0)
        got = _run(model, feeds, None if engine == "stock" else engine, monkeypatch, stock=engine == "stock")
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


def test_the_torch_op_matches_the_kernel():
    packed, dense, geometry, x, bias = _case(CASES[2])
    ref = conv_op.block_sparse_conv2d(torch.from_numpy(x), torch.from_numpy(packed.values),
                                      torch.from_numpy(packed.block_cols), torch.from_numpy(packed.row_nnz),
                                      torch.from_numpy(bias), None, packed.N, packed.K, geometry, "relu")
    got = _run(conv_op.single_layer_model(packed, geometry, list(x.shape), bias, activation="relu"), x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_other_image_sizes_and_thread_counts_reuse_one_session():
    packed, dense, geometry, x, bias = _case(CASES[0])
    model = conv_op.single_layer_model(packed, geometry, ["b", 8, "h", "w"], bias)
    for threads in (1, 2):
        session = runtime.session(model.SerializeToString(), threads=threads)
        for shape in ((1, 8, 3, 3), (4, 8, 33, 17), (2, 8, 64, 65), (0, 8, 5, 5)):
            xs = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
            got = session.run(None, {"x": xs})[0]
            expected = _torch_conv(xs, dense, bias, geometry)
            assert got.shape == expected.shape
            if xs.size:
                assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_int8_blocks_are_dequantized_when_packed():
    b, c, h, w, o = 2, 16, 10, 10, 32
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((o, c * 9)).astype(np.float32)
    packed = block_format.pack(weight, block_format.random_keep(o, c * 9, (8, 8), 0.4), block=(8, 8), int8=True)
    assert packed.values.dtype == np.int8 and packed.scales is not None
    dense = block_format.unpack(packed).reshape(o, c, 3, 3)   # the dequantized weight
    geometry = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1]
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    model = conv_op.single_layer_model(packed, geometry, list(x.shape))
    expected = _torch_conv(x, dense, None, geometry)
    for got in (_run(model, x), _run(model, x, stock=True)):
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_nan_pixel_reaches_exactly_the_outputs_of_its_kept_weights():
    packed, dense, geometry, x, bias = _case(CASES[0], density=0.2)
    x[1, 0, 2, 4] = np.nan   # channel 0: the column block padding slots name
    got = _run(conv_op.single_layer_model(packed, geometry, list(x.shape), bias, activation="relu"), x)
    hit = np.isnan(x).astype(np.float32)
    reach = _torch_conv(np.nan_to_num(hit), (dense != 0).astype(np.float32), None, geometry) > 0
    assert reach.any() and (np.isnan(got) == reach).all()   # ReLU keeps NaN; pruned weights skip it
    assert (packed.row_nnz < packed.values.shape[1]).any()  # padding slots (naming column block 0) too
    ref = conv_op.block_sparse_conv2d(torch.from_numpy(x), torch.from_numpy(packed.values),
                                      torch.from_numpy(packed.block_cols), torch.from_numpy(packed.row_nnz),
                                      torch.from_numpy(bias), None, packed.N, packed.K, geometry, "relu").numpy()
    assert (np.isnan(ref) == reach).all()                   # the PyTorch op reads what the kernel reads


def _node_model(**attrs):
    from onnx import TensorProto, helper, numpy_helper

    packed, _, _, _, _ = _case(CASES[0])
    inits = [numpy_helper.from_array(packed.values, "v"), numpy_helper.from_array(packed.block_cols, "c"),
             numpy_helper.from_array(packed.row_nnz, "r")]
    base = {"N": packed.N, "K": packed.K, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    base.update(attrs)
    node = helper.make_node("BlockSparseConv", ["x", "v", "c", "r"], ["y"], domain="sparsec",
                            **{k: v for k, v in base.items() if v is not None})
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("sparsec", 1)])
    model.ir_version = 10
    return model.SerializeToString()


@pytest.mark.parametrize("attrs, message", [
    ({"kernel_shape": None}, "attribute kernel_shape \\[kh, kw\\] is required"),
    ({"kernel_shape": [5, 5]}, "K=72 is not a multiple of kh\\*kw=25"),
    ({"pads": [1, 1, 1]}, "attribute pads must have 4 values, got 3"),
    ({"strides": [0, 1]}, "strides must be in \\[1, 1024\\]"),
    ({"dilations": [1, 5000]}, "dilations must be in \\[1, 1024\\]"),
    ({"activation": "gelu"}, "unknown activation \"gelu\" \\(allowed: relu\\)"),
    ({"compute": "int8"}, "compute=int8 is not supported"),
])
def test_bad_attributes_fail_when_the_session_is_built(attrs, message):
    with pytest.raises(Exception, match="BlockSparseConv: " + message):
        runtime.session(_node_model(**attrs))


@pytest.mark.parametrize("shape, message", [
    ((2, 8, 5), "X must be \\[B, C, H, W\\]"),
    ((1, 7, 5, 5), "X has 7 channels; the weight has K=72 = C\\*3\\*3, so C must be 8"),
    ((1, 8, 1, 1), None),                                  # padded to 3x3: one output pixel
    ((1, 8, 0, 4), "X's spatial sizes must be in \\[1, 2\\^40\\]"),
])
def test_bad_inputs_fail_at_the_call(shape, message):
    session = runtime.session(_node_model())
    x = np.ones(shape, np.float32)
    if message is None:
        assert session.run(None, {"x": x})[0].shape == (1, 10, 1, 1)
        return
    with pytest.raises(Exception, match="BlockSparseConv: " + message):
        session.run(None, {"x": x})


def test_an_image_smaller_than_the_dilated_kernel_fails_at_the_call():
    session = runtime.session(_node_model(pads=[0, 0, 0, 0], dilations=[2, 2]))
    with pytest.raises(Exception, match="the padded input 4x9 is smaller than the dilated kernel 5x5"):
        session.run(None, {"x": np.ones((1, 8, 4, 9), np.float32)})


def test_a_residual_of_another_shape_fails_at_the_call():
    packed, dense, geometry, x, bias = _case(CASES[0])
    session = runtime.session(conv_op.single_layer_model(packed, geometry, list(x.shape), bias,
                                                         residual=True).SerializeToString())
    with pytest.raises(Exception, match="BlockSparseConv: residual must be float \\[2, 10, 5, 7\\]"):
        session.run(None, {"x": x, "r": np.zeros((2, 10, 5, 6), np.float32)})
