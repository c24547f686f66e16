"""sparsec::BlockSparseLinear in onnxruntime: the standard-op function body on stock onnxruntime and
the native kernel, against the numpy reference and dense torch; kernel build, dispatch and fallback."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sparsec import runtime
from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import PackedBlocks, pack, random_keep, reference, unpack
from sparsec.runtime.build import library_isa

RTOL = ATOL = 2e-5  # fp32, K <= 768: far below a real layout or indexing error


@pytest.fixture(scope="session")
def kernel_library():
    """Build the kernel once per test session (cached on disk across sessions)."""
    try:
        return runtime.build_kernel()
    except runtime.BuildError as err:
        pytest.skip(f"native kernel cannot be built here: {err}")


@pytest.fixture
def fresh_runtime():
    runtime._reset()
    yield runtime
    runtime._reset()


def make_layer(n: int, k: int, block: tuple[int, int], density: float, *, seed: int = 0, int8: bool = False,
               bias: bool = True, empty_row: bool = True, dense_row: bool = True, balanced: bool = False):
    rng = np.random.default_rng(seed)
    keep = random_keep(n, k, block, density, seed=seed, balanced=balanced)
    if empty_row:
        keep[0] = False
    if dense_row and keep.shape[0] > 1:
        keep[-1] = True  # also the partial block row when N is not divisible
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    packed = pack(w, keep, block, int8=int8)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return packed, b


def inputs(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def stock_session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernel_session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.KernelUnavailableWarning)
        return runtime.session(model.SerializeToString(), threads=threads)


def check(y: np.ndarray, x: np.ndarray, packed: PackedBlocks, bias: np.ndarray | None) -> None:
    np.testing.assert_allclose(y, reference(x, packed, bias), rtol=RTOL, atol=ATOL)
    dense = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(unpack(packed)),
                                       None if bias is None else torch.from_numpy(bias))
    np.testing.assert_allclose(y, dense.numpy(), rtol=1e-4, atol=1e-4)


LAYERS = [  # n, k, block, int8, bias
    pytest.param(128, 96, (16, 16), False, True, id="16x16"),
    pytest.param(96, 128, (32, 32), False, True, id="32x32"),
    pytest.param(80, 96, (8, 32), False, False, id="8x32-nobias"),
    pytest.param(100, 70, (16, 16), False, True, id="16x16-ragged"),
    pytest.param(70, 45, (32, 32), False, True, id="32x32-ragged"),
    pytest.param(50, 45, (8, 32), False, True, id="8x32-ragged"),
    pytest.param(90, 200, (64, 16), False, True, id="64x16-ragged"),
    pytest.param(100, 70, (1, 16), False, True, id="1x16-ragged"),
    pytest.param(50, 45, (1, 1), False, False, id="unstructured-ragged-nobias"),
    pytest.param(100, 70, (16, 16), True, True, id="int8-16x16-ragged"),
    pytest.param(70, 45, (32, 32), True, False, id="int8-32x32-ragged-nobias"),
]
ROWS = [(1, None), (7, None), (128, None), (2, 5)]


@pytest.mark.parametrize("n,k,block,int8,bias", LAYERS)
def test_function_body_on_stock_onnxruntime(n, k, block, int8, bias):
    packed, b = make_layer(n, k, block, 0.3, int8=int8, bias=bias)
    for rows in ROWS:
        shape = tuple(d for d in rows if d is not None) + (k,)
        model = onnx_op.single_layer_model(packed, b, leading=len(shape) - 1, compact=len(shape) == 2)
        x = inputs(shape)
        check(stock_session(model).run(None, {"x": x})[0], x, packed, b)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "padded"])
@pytest.mark.parametrize("n,k,block,int8,bias", LAYERS)
def test_kernel(kernel_library, n, k, block, int8, bias, compact):
    packed, b = make_layer(n, k, block, 0.3, int8=int8, bias=bias)
    for rows in ROWS:
        shape = tuple(d for d in rows if d is not None) + (k,)
        model = onnx_op.single_layer_model(packed, b, leading=len(shape) - 1, compact=compact)
        x = inputs(shape)
        check(kernel_session(model).run(None, {"x": x})[0], x, packed, b)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("n,k,block", [(100, 70, (16, 16)), (70, 200, (32, 32)), (300, 45, (128, 8)),
                                       (70, 200, (1, 16)), (100, 70, (1, 1))])
def test_every_instruction_set(kernel_library, monkeypatch, isa, n, k, block):
    """SPARSEC_KERNEL_ISA caps the dispatch, so each micro-kernel family runs here (where the CPU has it)."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    order = ["scalar", "avx2", "avx512"]
    assert order.index(library_isa(kernel_library)) <= order.index(isa)
    packed, b = make_layer(n, k, block, 0.4, seed=2)
    model = onnx_op.single_layer_model(packed, b)
    sess = kernel_session(model)
    for m in (1, 3, 13, 50):
        x = inputs((m, k), seed=m)
        check(sess.run(None, {"x": x})[0], x, packed, b)


@pytest.mark.parametrize("n,k,block", [(100, 70, (16, 16)), (70, 200, (32, 32)), (90, 100, (16, 32)),
                                       (90, 100, (32, 16)), (3072, 768, (32, 32)), (90, 1024, (16, 16)),
                                       (70, 2048, (16, 32)), (100, 70, (16, 1)), (70, 45, (32, 1)),
                                       (90, 101, (16, 2)), (70, 203, (32, 4)), (100, 70, (16, 8)),
                                       (64, 3072, (16, 1)), (40, 5, (16, 1)), (50, 16, (16, 4)),
                                       (40, 3072, (32, 2)), (70, 3072, (32, 32)), (40, 1024, (32, 16))])
@pytest.mark.parametrize("order", ["resident", "streaming"])
def test_packed_input_panel_row_counts(kernel_library, monkeypatch, order, n, k, block):
    """Both AVX-512 paths for 16/32-row blocks: X read in place (12- or 16-row tiles) and X copied
    into a packed panel of register-tile-high tiles (BR = 16, and every narrow block width 1, 2, 4,
    8, copied 16 inputs of a row at a time: K below, at and far above 16, the last block column cut
    by K; 32-row blocks whose 12-row tiles would crowd one L1 set, K = 1024 and 3072 on an 8-way
    L1), the in-place path in both loop orders (SPARSEC_KERNEL_ORDER; by default it
    streams once the process's packed weights outgrow L2): row counts around the tile heights and the
    48-row task quantum, edge blocks cut by N and K, one and two threads."""
    monkeypatch.setenv("SPARSEC_KERNEL_ORDER", order)
    check_row_counts(make_layer(n, k, block, 0.3, seed=3), k, (2, 11, 12, 13, 16, 17, 47, 49, 97, 130))


@pytest.mark.parametrize("n,k,block", [(100, 70, (16, 1)), (70, 45, (32, 1)), (64, 3072, (16, 1)),
                                       (40, 5, (16, 1)), (50, 203, (4, 1)), (33, 17, (24, 1))])
def test_avx2_column_vectors_panel(kernel_library, monkeypatch, n, k, block):
    """AVX2 runs column vectors ([BR, 1] blocks) from a panel of 6-row tiles, each input's 6 rows in
    8 floats (pack_columns_tile_avx2, by 8 x 8 transposes): K below and not a multiple of 8, K = 3072
    (48-row tasks, so tiles packed by whichever task comes first), block rows of 4, 16, 24 and 32
    outputs (16 at a time, the last cut by N), and row counts that end a tile on 1 to 6 rows (the
    2-, 4- and 6-row register tiles) around the task quantum, on one and two threads."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", "avx2")
    check_row_counts(make_layer(n, k, block, 0.3, seed=5), k, (2, 3, 5, 6, 7, 11, 13, 47, 48, 49, 97, 130))


def check_row_counts(layer, k: int, row_counts: tuple[int, ...]) -> None:
    """The kernel on one and two threads against the reference, for each row count."""
    packed, b = layer
    model = onnx_op.single_layer_model(packed, b)
    for threads in (1, 2):
        sess = kernel_session(model, threads=threads)
        for m in row_counts:
            x = inputs((m, k), seed=m)
            check(sess.run(None, {"x": x})[0], x, packed, b)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("n,k,block", [(3072, 768, (1, 1)), (70, 45, (1, 1)), (100, 770, (1, 16)),
                                       (33, 200, (1, 8)), (40, 96, (1, 3)), (40, 3000, (1, 1)),
                                       (40, 3000, (1, 4)), (30, 99, (1, 12)), (40, 300, (1, 32)),
                                       (1600, 70, (1, 16)), (800, 1000, (1, 8)), (50, 203, (1, 4))])
def test_row_path_row_counts(kernel_library, monkeypatch, isa, n, k, block):
    """Blocks one output high take the row path (lanes over the rows of X, X transposed once per
    call into slices of 16 rows, 16 (AVX-512) or 8 (AVX2) outputs transposed back at a time): row
    counts around the slices and the passes (two slices for unstructured masks on AVX-512, and on
    AVX2 four where K <= 1024 and two where K <= 2048, so 17 and 33 rows end on a part-filled or a lone slice), X^T small enough for every pass to run
    inside each task (K = 45, 768 up to 160 rows, 3000 up to 32) or not (768 at 200 rows, 3000
    from 33), outputs not a multiple of the lanes, K not a multiple of the lanes or of the block
    width, vectors 1 to 32 wide (a vector's weights in rounds of four running sums, whole and part),
    one and two threads.

    On AVX-512 and AVX2, vectors a multiple of 4 wide take the column path (block_sparse_columns.cc):
    columns of 16, 12, 8 or 4 inputs (the widest that divides the vector: [1, 32] two of 16, [1, 12]
    one of 12; AVX2 8 or 4: [1, 12] three of 4), the last one cut by K (770, 70, 99, 203, and 300,
    whose [1, 32] vectors end in a column wholly past K), one band of outputs or several (1600 and
    800 outputs: 4 and 2 bands), a column's outputs by eights, fours and ones (AVX2: both halves of
    8 rows at once by threes and ones, the 8 inputs of a column of 8 in two steps of 4; a slice of
    at most 8 rows, as 1, 2, 17, 33 and 200 rows end, by sixes, threes and ones; 25 rows end on 9)."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    check_row_counts(make_layer(n, k, block, 0.1 if n > 1000 else 0.3, seed=3), k,
                     (1, 2, 15, 16, 17, 25, 33, 127, 128, 129, 200))


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_row_path_with_nothing_kept(kernel_library, monkeypatch, isa):
    """An unstructured weight with no kept weight at all (no offsets to read): the bias alone."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    packed, b = make_layer(40, 96, (1, 1), 0.0, empty_row=True, dense_row=False)
    assert not packed.row_nnz.any()
    check_row_counts((packed, b), 96, (1, 17, 40))


def test_large_layer_both_paths_and_threads(kernel_library):
    packed, b = make_layer(3072, 768, (32, 32), 0.1, balanced=True)
    model = onnx_op.single_layer_model(packed, b)
    x = inputs((128, 768))
    expected = reference(x, packed, b)
    for sess in (stock_session(model), kernel_session(model, threads=1), kernel_session(model, threads=2)):
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_int8_error_vs_fp32_is_bounded_by_the_quantization_step(kernel_library):
    fp, b = make_layer(100, 70, (16, 16), 0.5, seed=7)
    q = pack(unpack(fp), block=(16, 16), int8=True)
    x = inputs((9, 70))
    y_fp = reference(x, fp, b)
    # |x W_q^T - x W^T| <= sum_k |x_k| * step/2, with step the largest scale of the row's blocks
    bound = np.abs(x).sum(1, keepdims=True) * q.scales.max() / 2
    for sess in (stock_session(onnx_op.single_layer_model(q, b)), kernel_session(onnx_op.single_layer_model(q, b))):
        y = sess.run(None, {"x": x})[0]
        assert (np.abs(y - y_fp) <= bound).all()
        np.testing.assert_allclose(y, reference(x, q, b), rtol=RTOL, atol=ATOL)


def test_models_pass_the_checker_and_name_their_overload():
    for int8 in (False, True):
        for bias in (False, True):
            packed, b = make_layer(70, 45, (32, 32), 0.3, int8=int8, bias=bias)
            model = onnx_op.single_layer_model(packed, b, leading=2)
            onnx.checker.check_model(model, full_check=True)
            (node,) = [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
            (fn,) = model.functions
            assert (node.domain, node.op_type) == (onnx_op.DOMAIN, onnx_op.OP) == (fn.domain, fn.name)
            assert node.overload == fn.overload == onnx_op.overload(int8, bias)
            assert {n.op_type for n in fn.node}.isdisjoint({"ScatterND", "ScatterElements"})


def test_kernel_replaces_the_function_body(kernel_library, tmp_path):
    packed, b = make_layer(96, 128, (32, 32), 0.3)
    model = onnx_op.single_layer_model(packed, b).SerializeToString()
    ops = {}
    for name, options in (("kernel", runtime.session_options(2)), ("stock", ort.SessionOptions())):
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        ops[name] = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops["kernel"] == ["BlockSparseLinear"]  # the compact values' Gather is folded at load
    assert "BlockSparseLinear" not in ops["stock"] and "MatMul" in ops["stock"]


def test_weights_as_graph_inputs_are_packed_per_call(kernel_library):
    packed, b = make_layer(70, 45, (16, 16), 0.4, int8=True)
    model = onnx_op.single_layer_model(packed, b, compact=False)
    graph = model.graph
    moved = [t for t in graph.initializer if t.name.startswith("W.")]
    for t in moved:
        graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        graph.initializer.remove(t)
    feeds = {t.name: onnx.numpy_helper.to_array(t) for t in moved}
    x = inputs((5, 45))
    feeds["x"] = x
    check(kernel_session(model).run(None, feeds)[0], x, packed, b)


def test_invalid_block_columns_fail_with_a_clear_error(kernel_library):
    packed, b = make_layer(64, 64, (32, 32), 1.0, empty_row=False)
    bad = PackedBlocks(packed.values, packed.block_cols + 5, packed.row_nnz, None, packed.N, packed.K)
    with pytest.raises(Exception, match="block_cols"):
        kernel_session(onnx_op.single_layer_model(bad, b))
    bad = PackedBlocks(packed.values, packed.block_cols, packed.row_nnz + 3, None, packed.N, packed.K)
    with pytest.raises(Exception, match="row_nnz"):
        kernel_session(onnx_op.single_layer_model(bad, b, compact=False))
    cols = packed.block_cols.copy()
    cols[1, 1] = cols[1, 0]  # a block twice in one row: the layout keeps each once, ascending
    bad = PackedBlocks(packed.values, cols, packed.row_nnz, None, packed.N, packed.K)
    with pytest.raises(Exception, match=r"block_cols\[1, 1\]=0 does not follow block_cols\[1, 0\]=0"):
        kernel_session(onnx_op.single_layer_model(bad, b, compact=False))


def test_kernel_available_and_path(kernel_library, fresh_runtime):
    assert fresh_runtime.kernel_available()
    assert fresh_runtime.kernel_path() == kernel_library and kernel_library.is_file()
    assert fresh_runtime.unavailable_reason() is None


def test_disabled_kernel_falls_back_with_one_warning(monkeypatch, fresh_runtime):
    monkeypatch.setenv("SPARSEC_DISABLE_KERNEL", "1")
    assert not fresh_runtime.kernel_available() and fresh_runtime.kernel_path() is None
    packed, b = make_layer(100, 70, (16, 16), 0.3)
    model = onnx_op.single_layer_model(packed, b).SerializeToString()
    x = inputs((7, 70))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            check(fresh_runtime.session(model, threads=2).run(None, {"x": x})[0], x, packed, b)
    relevant = [w for w in caught if issubclass(w.category, fresh_runtime.KernelUnavailableWarning)]
    assert len(relevant) == 1
    assert "SPARSEC_DISABLE_KERNEL" in str(relevant[0].message)


def test_missing_headers_give_a_reason(monkeypatch, tmp_path, fresh_runtime):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    assert not fresh_runtime.kernel_available()
    assert "ORT_INCLUDE_DIR" in fresh_runtime.unavailable_reason()


def test_build_failures_name_the_cause(kernel_library, monkeypatch, tmp_path, fresh_runtime):
    from sparsec.runtime import build

    headers = build.find_headers().include_dir
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(headers))  # a user-given path is honoured
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "bin" / "fake-cxx"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake-cxx 1.0'\n[ \"$1\" = --version ] && exit 0\n"
                    "echo 'sparsec_ort.cc:1:1: error: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(runtime.BuildError, match="build error: sparsec_ort.cc:1:1: error: boom"):
        build.build()
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not fresh_runtime.kernel_available()
    assert "no C++ compiler" in fresh_runtime.unavailable_reason()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built is left behind


def test_two_variants_in_one_model(kernel_library):
    """Nodes of different overloads share a graph; attach_functions adds one function per overload."""
    first, b1 = make_layer(64, 40, (16, 16), 0.5, seed=11)
    second, _ = make_layer(24, 64, (8, 32), 0.5, seed=12, int8=True, bias=False)
    inits = []
    for prefix, p in (("A", first), ("B", second)):
        inits += [onnx.numpy_helper.from_array(p.values, f"{prefix}.values"),
                  onnx.numpy_helper.from_array(p.block_cols, f"{prefix}.cols"),
                  onnx.numpy_helper.from_array(p.row_nnz, f"{prefix}.nnz")]
    inits += [onnx.numpy_helper.from_array(b1, "A.bias"), onnx.numpy_helper.from_array(second.scales, "B.scales")]
    nodes = [onnx_op.make_node("x", "A.values", "A.cols", "A.nnz", "h", 64, 40, bias="A.bias"),
             onnx_op.make_node("h", "B.values", "B.cols", "B.nnz", "y", 24, 64, scales="B.scales")]
    graph = onnx.helper.make_graph(
        nodes, "two", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", 40])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["m", 24])], initializer=inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", onnx_op.ONNX_OPSET)])
    onnx_op.attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    assert sorted(f.overload for f in model.functions) == ["fp32_bias", "int8"]
    x = inputs((6, 40))
    expected = reference(reference(x, first, b1), second)
    for sess in (stock_session(model), kernel_session(model)):
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_session_skips_the_slow_skip_layer_norm_fusion(tmp_path):
    """runtime.session(tuned=True) leaves Add + LayerNormalization unfused (measured 6x faster
    than onnxruntime 1.32's SkipLayerNormalization on this CPU); tuned=False keeps the fusion."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sparsec import runtime

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8], [1.0] * 8),
             helper.make_tensor("b", TensorProto.FLOAT, [8], [0.0] * 8)]
    nodes = [helper.make_node("Add", ["x", "x"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "w", "b"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "ln.onnx"
    onnx.save(model, path)

    def optimized_ops(tuned: bool) -> set[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"opt_{tuned}.onnx")
        runtime.session(path, options=options, tuned=tuned)
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    assert "SkipLayerNormalization" not in optimized_ops(True)
    assert "SkipLayerNormalization" in optimized_ops(False)


def epilogue_reference(x: np.ndarray, packed: PackedBlocks, bias: np.ndarray | None, activation: str,
                       residual: np.ndarray | None, layer_norm=None) -> np.ndarray:
    y = torch.from_numpy(reference(x, packed, bias).astype(np.float64))
    if activation:
        y = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    if residual is not None:
        y = y + torch.from_numpy(residual.astype(np.float64))
    if layer_norm is not None:
        scale, shift, eps = layer_norm
        y = torch.nn.functional.layer_norm(y, y.shape[-1:], torch.from_numpy(scale.astype(np.float64)),
                                           torch.from_numpy(shift.astype(np.float64)), eps)
    return y.numpy()


EPILOGUES = [("gelu", False), ("gelu_tanh", False), ("", True), ("gelu", True)]


@pytest.mark.parametrize("activation,residual", EPILOGUES, ids=["gelu", "gelu_tanh", "residual", "gelu+residual"])
@pytest.mark.parametrize("n,k,block,int8", [(96, 128, (32, 32), False), (70, 45, (32, 32), False),
                                             (100, 70, (16, 16), True), (50, 45, (8, 32), False),
                                             (50, 45, (1, 1), False), (70, 100, (1, 16), False)],
                         ids=["32x32", "32x32-ragged", "int8-16x16-ragged", "8x32-ragged", "unstructured",
                              "1x16"])
def test_epilogue_function_body_and_kernel(kernel_library, n, k, block, int8, activation, residual):
    """act(X W^T + b) + residual, on stock onnxruntime (function body) and with the kernel, for rows
    1, odd and 128 and a 3-D input; pre-activations span the GELU's curved range (scaled inputs)."""
    packed, b = make_layer(n, k, block, 0.4, int8=int8)
    for rows in ROWS:
        shape = tuple(d for d in rows if d is not None)
        model = onnx_op.single_layer_model(packed, b, leading=len(shape), activation=activation,
                                           residual=residual)
        x = 3 * inputs(shape + (k,))
        r = inputs(shape + (n,), seed=5) if residual else None
        feeds = {"x": x, **({"r": r} if residual else {})}
        want = epilogue_reference(x, packed, b, activation, r)
        for sess in (stock_session(model), kernel_session(model)):
            np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("block", [(32, 32), (1, 1), (16, 16), (1, 16)], ids=["32x32", "unstructured", "16x16", "1x16"])
@pytest.mark.parametrize("order", ["resident", "streaming"])
def test_epilogue_on_every_instruction_set(kernel_library, monkeypatch, isa, activation, block, order):
    """Each micro-kernel family (and the row path) applies the same epilogue, in both loop orders,
    over the whole GELU range (|v| up to ~12, where the erf tail and the exp clamp matter) and for
    rows 1 and many."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    monkeypatch.setenv("SPARSEC_KERNEL_ORDER", order)
    packed, b = make_layer(70, 200, block, 0.4, seed=4)
    model = onnx_op.single_layer_model(packed, b, activation=activation, residual=True)
    sess = kernel_session(model)
    for m in (1, 13, 50):
        x = 8 * inputs((m, 200), seed=m)
        r = inputs((m, 70), seed=m + 1)
        want = epilogue_reference(x, packed, b, activation, r)
        np.testing.assert_allclose(sess.run(None, {"x": x, "r": r})[0], want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_gelu_accuracy_against_float64(kernel_library, monkeypatch, isa):
    """GELU (erf) alone, through an identity layer (exact in fp32), on a fine grid of [-12, 12] and
    on the tables' interval ends (AVX-512: multiples of 1/4, where neighbouring quartics meet; AVX2:
    multiples of 3/2, and 6 where its table ends), against float64: within 5e-7 + 1e-5 |gelu|
    everywhere, gelu(0) = 0, gelu(+inf) = +inf, and a NaN row stays NaN."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    n = 64
    packed = pack(np.eye(n, dtype=np.float32), None, (16, 16))  # the 4 diagonal blocks
    sess = kernel_session(onnx_op.single_layer_model(packed, None, activation="gelu"))
    ends = np.concatenate([np.arange(-40, 41) / 4, np.arange(-8, 9) * 1.5])
    grid = np.concatenate([np.linspace(-12, 12, 48 * n), ends, ends + 1e-6, ends - 1e-6, [0.0, -0.0]]).astype(np.float32)
    rows = -(-grid.size // n)
    x = np.zeros(rows * n, dtype=np.float32)
    x[:grid.size] = grid
    y = sess.run(None, {"x": x.reshape(rows, n)})[0].reshape(-1)[:grid.size].astype(np.float64)
    v = grid.astype(np.float64)
    want = 0.5 * v * torch.special.erfc(torch.from_numpy(-v / np.sqrt(2.0))).numpy()
    err = np.abs(y - want)
    worst = int(np.argmax(err - 1e-5 * np.abs(want)))
    assert err[worst] <= 5e-7 + 1e-5 * abs(want[worst]), (v[worst], y[worst], want[worst])
    assert np.all(y[v == 0] == 0.0)
    assert np.isnan(sess.run(None, {"x": np.full((1, n), np.nan, dtype=np.float32)})[0]).all()
    # +inf from the bias (an infinite input meets the layer's zero weights: NaN)
    at_inf = kernel_session(onnx_op.single_layer_model(packed, np.full(n, np.inf, np.float32), activation="gelu"))
    assert (at_inf.run(None, {"x": np.zeros((3, n), np.float32)})[0] == np.inf).all()


def test_epilogue_overloads_and_bad_inputs(kernel_library):
    packed, b = make_layer(64, 40, (16, 16), 0.5)
    model = onnx_op.single_layer_model(packed, b, activation="gelu_tanh", residual=True)
    onnx.checker.check_model(model)
    node = next(n for n in model.graph.node if n.domain == onnx_op.DOMAIN)
    assert node.overload == model.functions[0].overload == "fp32_bias_gelu_tanh_residual"
    assert onnx_op.Variant.parse(node.overload) == onnx_op.Variant.of(node)
    with pytest.raises(ValueError, match="unknown BlockSparseLinear activation 'relu'"):
        onnx_op.Variant(activation="relu")
    with pytest.raises(ValueError, match="opset >= 20"):
        onnx_op.function_proto(onnx_op.Variant(activation="gelu"), opset=18)
    model.graph.input[1].type.tensor_type.shape.dim[-1].dim_param = "any"  # let a wrong width through
    with pytest.raises(Exception, match="residual must be float \\[3, 64\\]"):
        kernel_session(model).run(None, {"x": inputs((3, 40)), "r": inputs((3, 63))})
    bad = onnx_op.single_layer_model(packed, b, activation="gelu")
    next(n for n in bad.graph.node if n.domain == onnx_op.DOMAIN).attribute[-1].s = b"swish"
    with pytest.raises(Exception, match='unknown activation "swish"'):
        kernel_session(bad)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("n,k,block", [(96, 128, (32, 32)), (70, 45, (16, 16)), (768, 96, (32, 32)),
                                       (70, 45, (1, 1)), (70, 45, (1, 8))],
                         ids=["32x32", "16x16-ragged", "wide", "unstructured", "1x8-ragged"])
@pytest.mark.parametrize("order", ["resident", "streaming"])
def test_layer_norm_epilogue(kernel_library, monkeypatch, isa, n, k, block, order):
    """LayerNorm(X W^T + b + residual) * scale + shift over each output row, on stock onnxruntime
    (the function body's LayerNormalization) and with the kernel on every instruction set and in
    both loop orders, for rows 1, odd and 128 and a 3-D input; N not a multiple of 16 exercises the
    masked tail."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    monkeypatch.setenv("SPARSEC_KERNEL_ORDER", order)
    packed, b = make_layer(n, k, block, 0.4, seed=6)
    rng = np.random.default_rng(7)
    layer_norm = (rng.uniform(0.5, 1.5, n).astype(np.float32), rng.standard_normal(n).astype(np.float32), 1e-12)
    for rows in ROWS:
        shape = tuple(d for d in rows if d is not None)
        model = onnx_op.single_layer_model(packed, b, leading=len(shape), residual=True, layer_norm=layer_norm)
        x = inputs(shape + (k,))
        r = 3 + inputs(shape + (n,), seed=5)  # an offset: the mean matters
        want = epilogue_reference(x, packed, b, "", r, layer_norm)
        for sess in (stock_session(model), kernel_session(model)):
            np.testing.assert_allclose(sess.run(None, {"x": x, "r": r})[0], want, rtol=1e-4, atol=1e-4)


def test_layer_norm_overload_and_bad_inputs(kernel_library):
    packed, b = make_layer(64, 40, (16, 16), 0.5)
    model = onnx_op.single_layer_model(packed, b, residual=True,
                                       layer_norm=(np.ones(64, np.float32), np.zeros(64, np.float32), 1e-5))
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node if n.domain == onnx_op.DOMAIN)
    assert node.overload == "fp32_bias_residual_ln" and len(node.input) == 9
    assert onnx_op.Variant.parse(node.overload) == onnx_op.Variant.of(node)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    scale = next(i for i in bad.graph.initializer if i.name == "ln.scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.ones(63, np.float32), "ln.scale"))
    with pytest.raises(Exception, match="ln_scale must be float \\[N=64\\]"):
        kernel_session(bad).run(None, {"x": inputs((3, 40)), "r": inputs((3, 64))})


@pytest.mark.parametrize("n,k,block", [(64, 48, (16, 16)), (70, 45, (16, 16))], ids=["divisible", "padded"])
def test_a_width_other_than_k_is_refused(kernel_library, n, k, block):
    """X's last dim must be K on both paths, including widths whose size divides into blocks
    (X [2, 2K] read as [4, K] answered [4, N] before the function body checked it)."""
    packed, b = make_layer(n, k, block, 0.5)
    model = onnx_op.single_layer_model(packed, b)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "width"  # let any width through
    stock, kernel = stock_session(model), kernel_session(model)
    x = inputs((2, k))
    for sess in (stock, kernel):
        check(sess.run(None, {"x": x})[0], x, packed, b)
    for width in (2 * k, k // 2 + 1, k - 1, k + 1, 3 * k):
        bad = inputs((2, width))
        with pytest.raises(Exception, match="X_last_dim_must_equal_K"):
            stock.run(None, {"x": bad})
        with pytest.raises(Exception, match=f"X must be \\[..., K={k}\\]"):
            kernel.run(None, {"x": bad})
