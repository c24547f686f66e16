"""INT8 compute (`compute = "int8"`): each kernel path (AVX-512 VNNI, AVX2, scalar) against the
numpy integer reference exactly (the int32 sums), against fp32 within the quantization error, the
stock-onnxruntime function body against the kernel, and the bad inputs the kernel refuses."""
from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch

from sparsec import runtime
from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import int8_reference, pack, quantize_rows, random_keep, unpack
from tests.test_runtime_kernel import inputs, kernel_session, stock_session

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}
BLOCKS = [(32, 32), (16, 16), (8, 32), (32, 8), (1, 4), (4, 1), (64, 64), (3, 5), (16, 1), (1, 16),
          (1, 1), (1, 3), (1, 8),  # one output high: the row path's 4-byte windows
          (1, 12), (1, 32),        # and on VNNI by columns of 12 and 16 inputs (with 1x4, 1x8, 1x16)
          (16, 2), (32, 3),        # narrower than 4 (and [16, 1], [4, 1]): merged into 4-column windows
          (16, 128), (48, 16)]     # AMX: two 16-group chunks per block; a 16-output slice after a 32-output one


@pytest.fixture(scope="module")
def lib():
    try:
        path = runtime.build_kernel()
    except runtime.BuildError as err:
        pytest.skip(f"native kernel cannot be built here: {err}")
    library = ctypes.CDLL(str(path))
    library.SparsecInt8Linear.restype = ctypes.c_int
    return library


def layer(n: int, k: int, block: tuple[int, int], density: float, seed: int = 0, weights: np.ndarray | None = None):
    keep = random_keep(n, k, block, density, seed=seed)
    keep[-1] = True
    if keep.shape[0] > 1:
        keep[0] = False  # an empty block row: bias only
    w = weights if weights is not None else (np.random.default_rng(seed).standard_normal((n, k)) / np.sqrt(k))
    return pack(w.astype(np.float32), keep, block, int8=True, per_row=True)


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def run_path(lib, packed, x: np.ndarray, isa: str, bias: np.ndarray | None = None):
    """(int32 sums, y) of the kernel on one instruction set, called without onnxruntime."""
    x = np.ascontiguousarray(x, np.float32)
    m = x.shape[0]
    values = np.ascontiguousarray(packed.values)
    scales = np.ascontiguousarray(packed.scales)
    dims = np.array([*values.shape, packed.N, packed.K], np.int64)
    raw = np.zeros((m, packed.N), np.int32)
    y = np.zeros((m, packed.N), np.float32)
    error = ctypes.create_string_buffer(512)
    rc = lib.SparsecInt8Linear(_ptr(values), _ptr(scales), _ptr(packed.block_cols), _ptr(packed.row_nnz),
                               _ptr(dims), _ptr(x), None if bias is None else _ptr(bias), ctypes.c_int64(m),
                               ISAS[isa], _ptr(raw), _ptr(y), error, ctypes.c_size_t(512))
    if rc == 2:
        pytest.skip(f"this CPU has no {isa} INT8 path")
    assert rc == 0, error.value.decode()
    return raw, y


def check_exact(lib, packed, x, isa, bias=None):
    raw, y = run_path(lib, packed, x, isa, bias)
    want_acc, want_y = int8_reference(x, packed, bias)
    np.testing.assert_array_equal(raw, want_acc)  # exact: quantization and int32 sums
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6 * float(np.abs(want_y).max() + 1))
    return y


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("rows", [1, 7, 128, 200])
def test_every_path_matches_the_integer_reference(lib, isa, block, rows):
    n, k = 100, 90  # neither divisible by the blocks (except 1-wide ones)
    packed = layer(n, k, block, 0.35, seed=rows + block[0])
    x = inputs((rows, k), seed=rows)
    x[0, :5] = [0.0, 1e-30, -3.0, 3.0, 0.5]
    bias = inputs((n,), seed=3)
    check_exact(lib, packed, x, isa, bias)


@pytest.mark.parametrize("block", [(1, 16), (1, 12), (1, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("rows", [1, 33])
def test_column_path_bands(lib, block, rows):
    """VNNI takes row vectors [1, 4 j] by columns: 900 outputs make two bands of outputs (about 384
    each), rows 1 and 33 one and three slices of 16 rows (the last partial); K = 203 cuts the last
    column of inputs, and a block row with no vector leaves a band's outputs at the bias."""
    packed = layer(900, 203, block, 0.2, seed=rows)
    x = inputs((rows, 203), seed=rows + 1)
    check_exact(lib, packed, x, "avx512", inputs((900,), seed=4))


@pytest.mark.parametrize("isa", list(ISAS))
def test_divisible_shapes_and_zero_rows(lib, isa):
    packed = layer(96, 128, (32, 32), 0.5)
    x = inputs((13, 128))
    x[3] = 0.0                 # scale 1, zero point 0
    x[4] = np.abs(x[4])        # only positive: zero point 0
    x[5] = -np.abs(x[5])       # only negative: zero point 255
    check_exact(lib, packed, x, isa)


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("block", [(32, 32), (1, 16), (1, 1), (16, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_overflow_corners_long_k(lib, isa, block):
    """Weights all +-127 and inputs at the ends of their range over K = 65536: the largest sums
    (|acc| up to 255 * 127 * K, just under 2^31) are still exact, on the block path, the row
    path's windows and narrow blocks merged into windows."""
    n, k = 40, 1 << 16
    sign = np.where(np.arange(n)[:, None] % 2 == 0, 1.0, -1.0)
    packed = layer(n, k, block, 1.0, weights=np.broadcast_to(sign, (n, k)).copy())
    assert set(np.unique(packed.values[:, :1])) <= {-127, 0, 127}
    x = np.empty((3, k), np.float32)
    x[0] = 1.0                                            # xq = 255, zero point 0
    x[1] = np.where(np.arange(k) % 2 == 0, -1.0, 1.0)      # xq in {0, 255}, zero point 128
    x[2] = -1.0                                           # xq = 0, zero point 255
    raw, _ = run_path(lib, packed, x, isa)
    want, _ = int8_reference(x, packed)
    np.testing.assert_array_equal(raw, want)
    assert np.abs(want).max() > 2 ** 31 * 0.9


@pytest.mark.parametrize("isa", list(ISAS))
def test_quantization_near_ties_is_exact(lib, isa):
    """The kernel quantizes with x * (1 / s) and takes the exact quotient x / s only near a half:
    rows full of values at (j + 0.5) * s and one ulp either side (where the product and the quotient
    round to different integers in hundreds of lanes) must quantize as the division does."""
    rows = []
    for hi in (25.5, 3.3, 1.7, 0.9, 77.7, 12.34):
        s = np.float32(np.float32(hi) / np.float32(255))
        ties = ((np.arange(255, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
        near = np.concatenate([ties, np.nextafter(ties, np.float32(1e9)), np.nextafter(ties, np.float32(-1e9))])
        rows.append(np.concatenate([[0.0, hi], near]).astype(np.float32))        # zero point 0
        rows.append(np.concatenate([[0.0, -hi], -near]).astype(np.float32))      # zero point 255
    x = np.stack(rows)
    product = np.rint(x * (np.float32(1) / quantize_rows(x)[1])[:, None].astype(np.float32))
    assert (product != np.rint(x / quantize_rows(x)[1][:, None])).sum() > 100   # the case is real
    packed = layer(40, x.shape[1], (32, 32), 0.5, seed=5)
    check_exact(lib, packed, x, isa)


@pytest.mark.parametrize("isa", list(ISAS))
def test_quantization_of_tiny_rows_is_exact(lib, isa):
    """Rows whose range is so small that 1 / s overflows float32 (s below 1 / FLT_MAX, subnormal
    inputs included) still quantize as the division does, where a multiply by 1 / s would give
    inf or NaN."""
    rng = np.random.default_rng(3)
    rows = []
    for magnitude in (1e-36, 1e-37, 3e-39, 1e-41, 1e-44):
        rows.append(rng.standard_normal(96) * magnitude)
        rows.append(np.abs(rng.standard_normal(96)) * magnitude)
    x = np.stack(rows).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(1) / quantize_rows(x)[1]).all()  # the case is real
    check_exact(lib, layer(40, 96, (32, 32), 0.5, seed=5), x, isa)


def test_k_above_the_exact_bound_is_refused(lib):
    packed = layer(4, (1 << 16) + 4, (4, 4), 0.01)
    with pytest.raises(AssertionError, match="K <= 65536"):
        run_path(lib, packed, inputs((1, packed.K)), "scalar")


def test_quantization_matches_onnx_dynamic_quantize_linear():
    """Per row, the same formula as ONNX DynamicQuantizeLinear per tensor (checked with onnxruntime)."""
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
                              [helper.make_tensor_value_info(v, t, None) for v, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = stock_session(model)
    for seed in range(5):
        x = inputs((1, 300), seed) * (seed + 1) + (seed - 2)
        q, s, z = sess.run(None, {"x": x})
        mine_q, mine_s, mine_z = quantize_rows(x)
        assert mine_s[0] == s and mine_z[0] == z
        np.testing.assert_array_equal(mine_q[0], q[0])


def test_error_vs_fp32_is_within_the_quantization_bound(lib):
    """vs fp32 on the same kept weights: |error| <= sum_k |x| dw + dx (|w| + dw) per output, with
    dw = sw / 2 (weights rounded) and dx = sx (inputs rounded, at most one step at the clipped top)."""
    keep = random_keep(128, 256, (32, 32), 0.3)
    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32) / 16
    dense = unpack(pack(w, keep, (32, 32))).astype(np.float64)
    packed = pack(w, keep, (32, 32), int8=True, per_row=True)
    x = inputs((64, 256))
    _, y = run_path(lib, packed, x, "scalar")
    exact = x.astype(np.float64) @ dense.T
    dw = packed.scales[:, None].astype(np.float64) / 2 * (dense != 0)
    _, sx, _ = quantize_rows(x)
    bound = np.abs(x) @ dw.T + sx[:, None].astype(np.float64) * (np.abs(dense) + dw).sum(1)[None, :]
    err = np.abs(y - exact)
    assert np.all(err <= bound + 1e-5 * np.abs(exact).max())
    assert err.max() / np.abs(exact).max() < 0.02


# ------------------------------------------------------------------------------ through onnxruntime
def int8_model(packed, bias, **kw):
    return onnx_op.single_layer_model(packed, bias, **kw)


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("n,k,block", [(96, 128, (32, 32)), (70, 45, (32, 32)), (100, 70, (16, 16)),
                                       (50, 45, (8, 32)), (100, 70, (1, 16)), (50, 45, (1, 1))],
                         ids=["32x32", "32x32-ragged", "16x16-ragged", "8x32", "1x16-ragged", "unstructured"])
def test_kernel_and_function_body_agree(lib, monkeypatch, isa, n, k, block):
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    packed = layer(n, k, block, 0.4, seed=n)
    bias = inputs((n,), seed=2)
    model = int8_model(packed, bias, leading=2)
    x = inputs((3, 7, k))
    _, want = int8_reference(x.reshape(-1, k), packed, bias)
    y_kernel = kernel_session(model).run(None, {"x": x})[0]
    y_stock = stock_session(model).run(None, {"x": x})[0]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(y_kernel.reshape(-1, n), want, atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(y_stock.reshape(-1, n), want, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("block", [(32, 32), (1, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_function_body_is_exact_where_int16_pairs_would_saturate(block):
    """Weights +-127 and inputs quantized to 255: adjacent products sum to +-64770, past int16.
    onnxruntime's uint8 x int8 GEMM saturates such pairs on x86 without VNNI (AVX2, AVX-512 BW;
    e.g. Zen 3, where the int8 body answered 0.44 off at 2.8); the body must still be exact."""
    n, k = 64, 256
    sign = np.where(np.arange(n)[:, None] % 2 == 0, 1.0, -1.0)
    packed = layer(n, k, block, 1.0, weights=np.broadcast_to(sign, (n, k)).copy())
    x = np.ones((2, 3, k), np.float32)
    x[1] = np.where(np.arange(k) % 2 == 0, -1.0, 1.0)  # xq in {0, 255}, zero point 128
    _, want = int8_reference(x.reshape(-1, k), packed)
    y = stock_session(int8_model(packed, None, leading=2)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y.reshape(-1, n), want, atol=1e-6 * float(np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("activation", ["", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2"])
@pytest.mark.parametrize("block", [(16, 16), (1, 16)], ids=["16x16", "1x16"])
def test_epilogue_in_fp32(lib, monkeypatch, isa, activation, residual, block):
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    n, k = 80, 96
    packed = layer(n, k, block, 0.5)
    bias = inputs((n,), seed=4)
    ln = (inputs((n,), seed=5), inputs((n,), seed=6), 1e-5)
    for layer_norm in (None, ln):
        model = int8_model(packed, bias, activation=activation, residual=residual, layer_norm=layer_norm)
        x, r = inputs((128, k)), inputs((128, n), seed=9)
        feeds = {"x": x, **({"r": r} if residual else {})}
        _, z = int8_reference(x, packed, bias)
        zt = torch.from_numpy(z)
        if activation:
            zt = torch.nn.functional.gelu(zt, approximate="tanh" if activation == "gelu_tanh" else "none")
        if residual:
            zt = zt + torch.from_numpy(r)
        if layer_norm is not None:
            zt = torch.nn.functional.layer_norm(zt, (n,), torch.from_numpy(ln[0]), torch.from_numpy(ln[1]), 1e-5)
        got = kernel_session(model).run(None, feeds)[0]
        stock = stock_session(model).run(None, feeds)[0]
        scale = float(zt.abs().max())
        np.testing.assert_allclose(got, zt.numpy(), atol=2e-5 * scale, rtol=0)
        np.testing.assert_allclose(stock, zt.numpy(), atol=2e-5 * scale, rtol=0)


TWO_THREADS = [(isa, block) for isa in ("avx512", "avx2") for block in ((1, 16), (1, 1))] + \
              [(isa, block) for isa in ("amx", "avx512") for block in ((32, 32), (64, 64), (16, 16), (8, 32), (48, 16))]


@pytest.mark.parametrize("k", [768, 3072])
@pytest.mark.parametrize("isa,block", TWO_THREADS, ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_two_threads(lib, monkeypatch, isa, block, k):
    """A layer large enough to be split over the pool, 200, 130 then 40 rows through onnxruntime on two
    threads, against the integer reference: the row path (windows of X transposed by 16-row tasks,
    outputs in groups of equal window counts, 128-row passes) and the block path (VNNI tiles or AMX
    32-row passes, the last AMX pass reading the zero rows after X; X quantized tile by tile inside the
    tasks, which start at different tiles; from 64 rows one range of rows per thread (kSplitRows),
    ranges of whole tiles and the last tile partial; at 40 rows one range that both threads share)."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    packed = layer(768, k, block, 0.1, seed=8)
    bias = inputs((768,), seed=2)
    session = kernel_session(int8_model(packed, bias), threads=2)
    for seed, rows in ((3, 200), (4, 130), (5, 40)):  # in turn: nothing of one may be left in the next's result
        x = inputs((rows, k), seed=seed)
        _, want = int8_reference(x, packed, bias)
        got = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, atol=1e-6 * float(np.abs(want).max()), rtol=0)



@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2"])
def test_two_threads_residual_layer_norm(lib, monkeypatch, isa):
    """The epilogue with the pool: from 64 rows the VNNI and AMX paths give each thread one range of rows
    with all its outputs and normalize those rows inside the task (no LayerNorm pass of its own); at 40
    rows, and on AVX2, the layer's tasks share rows and a LayerNorm pass follows them."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    n, k = 768, 768
    packed = layer(n, k, (32, 32), 0.1, seed=11)
    bias = inputs((n,), seed=12)
    ln = (inputs((n,), seed=13), inputs((n,), seed=14), 1e-5)
    session = kernel_session(int8_model(packed, bias, residual=True, layer_norm=ln), threads=2)
    for seed, rows in ((3, 200), (4, 130), (5, 40)):
        x, r = inputs((rows, k), seed=seed), inputs((rows, n), seed=seed + 10)
        _, z = int8_reference(x, packed, bias)
        want = torch.nn.functional.layer_norm(torch.from_numpy(z) + torch.from_numpy(r), (n,),
                                              torch.from_numpy(ln[0]), torch.from_numpy(ln[1]), 1e-5).numpy()
        got = session.run(None, {"x": x, "r": r})[0]
        np.testing.assert_allclose(got, want, atol=2e-5 * float(np.abs(want).max()), rtol=0)

def test_amx_is_chosen_where_the_cpu_has_it(lib, monkeypatch):
    """Without a cap, INT8 compute takes AMX exactly when this CPU reports AMX-TILE and AMX-INT8
    (and Linux grants the tile state, which it does wherever both flags are shown)."""
    monkeypatch.delenv("SPARSEC_KERNEL_ISA", raising=False)
    lib.SparsecKernelIsaInt8.restype = ctypes.c_char_p
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    has_amx = "amx_tile" in flags and "amx_int8" in flags and "avx512_vnni" in flags
    assert (lib.SparsecKernelIsaInt8().decode() == "amx") == has_amx


@pytest.mark.parametrize("cap", ["scalar", "avx2", "avx512", "amx"])
def test_dispatch_follows_the_cap(lib, monkeypatch, cap):
    """SPARSEC_KERNEL_ISA caps the INT8 path as it caps the fp32 one (VNNI needed for avx512)."""
    lib.SparsecKernelIsaInt8.restype = ctypes.c_char_p
    monkeypatch.delenv("SPARSEC_KERNEL_ISA", raising=False)
    best = lib.SparsecKernelIsaInt8().decode()
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", cap)
    order = list(ISAS)
    assert lib.SparsecKernelIsaInt8().decode() == order[min(order.index(cap), order.index(best))]
