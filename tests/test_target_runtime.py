"""Lowering that knows its runtime: `[export] target`, measured per-layer costs (a fake timer makes
the decisions deterministic; one smoke test times for real), the cache, "estimated, not measured",
and target stock's whole-file check (a sparse file never slower than the dense one)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from sparsec.export import stock_check
from sparsec.ir import graph_info
from sparsec.lowering import calibrate, cost
from tests.helpers import lowering_program


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measurement on (SPARSEC_MEASURE unset), a private cache, the kernel reported available, and
    a fake timer: `set(fn)` makes fn(case) -> (dense ms, sparse ms) the layer timings; `calls`
    lists the cases timed."""
    monkeypatch.delenv("SPARSEC_MEASURE", raising=False)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "kernel_unavailable", lambda: "")

    class Fake:
        calls: list = []
        fn = staticmethod(lambda case: (1.0, 0.5))

        def set(self, fn):
            self.fn = fn

    fake = Fake()
    fake.calls = []

    def time_layer(case, weight, bias):
        fake.calls.append(case)
        assert weight.shape == case.shape
        dense, sparse = fake.fn(case)
        return dense, sparse, 10

    monkeypatch.setattr(calibrate, "time_layer", time_layer)
    return fake


def _plans(gm):
    return graph_info(gm).lowering


def test_the_measurement_decides_per_target(measuring):
    # the kernel is 4x faster, the function body 2x slower: lowered for sparsec, dense for stock
    measuring.set(lambda case: (1.0, 0.25) if case.target == "sparsec" else (1.0, 2.0))
    prog = lowering_program(0.1)
    kernel = _plans(prog.lower(target="sparsec"))
    stock = _plans(prog.lower(target="stock"))
    assert kernel and all(p.lower for p in kernel.values())
    assert not any(p.lower for p in stock.values())
    fc1 = stock["fc1.weight"]
    assert fc1.measured.speedup == pytest.approx(0.5) and fc1.runtime == "stock"
    assert fc1.reason.startswith("too dense to gain: measured 0.50x (1.000 -> 2.000 ms) < 1.5x on "
                                 "stock onnxruntime (measured, 5 rows)")
    assert kernel["fc1.weight"].reason.startswith("measured 4.0x (1.000 -> 0.250 ms) faster on sparsec kernel")
    # the estimate would have lowered both for the kernel: the measurement overrides it
    assert kernel["fc2.weight"].speedup == pytest.approx(cost.estimated_speedup(kernel["fc2.weight"].stats))


def test_min_speedup_applies_to_the_measured_speedup(measuring):
    measuring.set(lambda case: (1.0, 0.8))  # 1.25x
    prog = lowering_program(0.1)
    assert not any(p.lower for p in _plans(prog.lower(target="stock")).values())
    assert all(p.lower for p in _plans(prog.lower(target="stock", min_speedup=1.2)).values())


def test_measurements_are_cached_by_case(measuring):
    prog = lowering_program(0.1)
    prog.lower(target="stock")
    assert len(measuring.calls) == 2   # fc1 and fc2: two shapes
    plans = _plans(prog.lower(target="stock"))
    assert len(measuring.calls) == 2   # from the cache
    assert all(p.measured.cached and "(cached)" in p.basis for p in plans.values())
    prog.lower(target="stock", threads=1)
    prog.lower(target="sparsec")
    assert len(measuring.calls) == 6   # other threads, other runtime: measured again
    prog.lower(target="stock", int8=True)
    assert len(measuring.calls) == 8 and measuring.calls[-1].int8   # INT8 blocks: timed as such
    case = measuring.calls[0]
    assert case.rows == 5 and case.block == (16, 16) and case.shape == (128, 96)
    assert calibrate.cache_path(case).is_file()


def test_cache_key_names_the_machine_and_onnxruntime(measuring, monkeypatch):
    case = calibrate.LayerCase("stock", (128, 96), (16, 16), 5, 6, 1, 0)
    key = calibrate.cache_key(case)
    assert key == calibrate.cache_key(case)
    assert calibrate.cache_key(calibrate.LayerCase("stock", (128, 96), (16, 16), 5, 7, 1, 0)) != key
    other = {**calibrate.machine(), "onnxruntime": "0.0.0"}
    monkeypatch.setattr(calibrate, "machine", lambda: other)
    assert calibrate.cache_key(case) != key


def test_without_measuring_the_plan_says_estimated(measuring, monkeypatch):
    prog = lowering_program(0.1)
    plans = _plans(prog.lower(target="stock", measure=False))
    assert not measuring.calls
    for plan in plans.values():
        assert plan.measured is None and plan.basis == "estimated, not measured: [export] measure = false"
        assert plan.speedup == pytest.approx(cost.estimated_speedup_stock(plan.stats, 5))
        assert not plan.lower   # 5 rows: the function body's fixed cost dominates
    monkeypatch.setenv("SPARSEC_MEASURE", "0")
    plans = _plans(prog.lower(target="sparsec"))
    assert all(p.basis == "estimated, not measured: SPARSEC_MEASURE=0" for p in plans.values())
    assert all(p.lower and p.reason.startswith("est. ") for p in plans.values())


def test_no_kernel_means_estimated_for_target_sparsec(measuring, monkeypatch):
    monkeypatch.setattr(calibrate, "kernel_unavailable", lambda: "disabled by SPARSEC_DISABLE_KERNEL")
    plans = _plans(lowering_program(0.1).lower(target="sparsec"))
    assert not measuring.calls
    assert all("estimated, not measured: sparsec's kernel is not available here" in p.basis
               for p in plans.values())


def test_stock_estimate_counts_padding_slots_and_fixed_cost():
    even = cost.BlockStats((768, 3072), (32, 32), (24, 96), 24 * 10, 10)
    uneven = cost.BlockStats((768, 3072), (32, 32), (24, 96), 24 * 10, 40)
    assert cost.estimated_speedup_stock(even, 128) > 3 > 1 > cost.estimated_speedup_stock(uneven, 128)
    assert cost.estimated_speedup_stock(even, 1) < 1   # one row: overhead-bound


def _export(prog, tmp_path, **options):
    path = prog.export_onnx(str(tmp_path / "model.onnx"), **options)
    nodes = [n for n in onnx.load(str(path.path)).graph.node if n.domain == "sparsec"]
    return path, len(nodes)


def test_stock_file_faster_than_dense_is_kept(measuring, monkeypatch, tmp_path):
    measuring.set(lambda case: (1.0, 0.25))
    timed = []
    monkeypatch.setattr(stock_check, "time_files", lambda s, d, threads, batch=None: timed.append(s) or
                        stock_check.Attempt(2, 1.0, 0.5, 10))
    result, sparse = _export(lowering_program(0.1), tmp_path, target="stock")
    assert sparse == 2 and len(timed) == 1
    assert result.stock_check["outcome"].startswith("measured 2.00x faster than the dense file")


def test_stock_file_slower_than_dense_falls_back_to_the_strong_layers(measuring, monkeypatch, tmp_path):
    # fc1 measured 4x, fc2 1.6x: both chosen; the whole file is slower, then fc1 alone is faster
    measuring.set(lambda case: (1.0, 0.25) if case.shape == (128, 96) else (1.0, 0.625))
    attempts = iter([stock_check.Attempt(2, 1.0, 1.2, 10), stock_check.Attempt(1, 1.0, 0.8, 10)])
    monkeypatch.setattr(stock_check, "time_files", lambda *a, **k: next(attempts))
    result, sparse = _export(lowering_program(0.1), tmp_path, target="stock")
    assert sparse == 1
    check = result.stock_check
    assert [a["speedup"] for a in check["attempts"]] == pytest.approx([1 / 1.2, 1.25])
    assert check["outcome"].startswith("lowered 1 of 2 chosen layers (those at least 3x faster)")
    assert result.sparse_nodes == 1


def test_stock_file_never_faster_ships_the_dense_graph(measuring, monkeypatch, tmp_path):
    measuring.set(lambda case: (1.0, 0.25))
    monkeypatch.setattr(stock_check, "time_files", lambda *a, **k: stock_check.Attempt(2, 1.0, 1.5, 10))
    prog = lowering_program(0.1)
    result, sparse = _export(prog, tmp_path, target="stock")
    assert sparse == 0 and result.sparse_nodes == 0
    assert result.stock_check["outcome"].startswith("shipped the dense graph")
    # still verified against PyTorch, and equal to the dense program
    import onnxruntime as ort

    x = torch.randn(5, 96)
    got = ort.InferenceSession(str(result.path)).run(None, {"x": x.numpy()})[0]
    want = prog.finalize()(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_stock_check_is_skipped_only_when_said(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEC_MEASURE", "0")
    monkeypatch.setattr(stock_check, "time_files", lambda *a, **k: pytest.fail("timed without measuring"))
    result, _ = _export(lowering_program(0.1), tmp_path, target="stock", policy="always")
    assert result.stock_check["outcome"].startswith("not checked: estimated, not measured (SPARSEC_MEASURE=0)")


def test_unknown_target_is_a_user_error(tmp_path):
    from sparsec.errors import UserError

    with pytest.raises(UserError, match="target 'gpu' is not one of sparsec, stock"):
        lowering_program(0.1).export_onnx(str(tmp_path / "m.onnx"), target="gpu")


def test_report_shows_measured_times_and_the_whole_file_check(measuring, monkeypatch, tmp_path):
    from sparsec.report import format_lowering, lowering_section

    measuring.set(lambda case: (1.0, 0.25) if case.shape == (128, 96) else (0.5, 1.0))
    monkeypatch.setattr(stock_check, "time_files", lambda *a, **k: stock_check.Attempt(1, 2.0, 1.0, 10))
    from sparsec.export import ExportOptions, export_pair

    prog = lowering_program(0.1)
    options = ExportOptions(target="stock")
    pair = export_pair(prog.module, tmp_path / "model.onnx", tmp_path / "model.dense.onnx",
                       prog.example_inputs, prog.example_kwargs, options)
    section = lowering_section(int8=False, policy="cost", target="stock",
                               plans=list(graph_info(pair.lowered).lowering.values()), model=pair.model,
                               dense=pair.dense, folder=tmp_path, model_file="model.onnx",
                               dense_file="model.dense.onnx", bench=None)
    text = "\n".join(format_lowering(section))
    assert "target stock: stock onnxruntime, function bodies" in text
    assert "fc1.weight  block-sparse     1.000      0.250    4.00x" in text
    assert "fc2.weight  dense            0.500      1.000    0.50x" in text
    assert "1 sparse layers:     1.000 ms vs dense     2.000 ms = 2.00x" in text
    assert "est." not in text   # nothing estimated here


def test_real_measurement_smoke(monkeypatch, tmp_path):
    """One layer really timed on stock onnxruntime (briefly): positive medians, cached on disk."""
    monkeypatch.delenv("SPARSEC_MEASURE", raising=False)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "MEASURE_S", 0.02)
    weight = torch.randn(64, 96)
    weight[:, 32:] = 0
    stats = cost.block_stats(weight, (16, 16))
    case = calibrate.LayerCase("stock", (64, 96), (16, 16), 4, stats.kept_blocks, stats.max_per_row, 1)
    first = calibrate.measure_layer(case, weight.numpy(), np.zeros(64, np.float32))
    assert first.dense_ms > 0 and first.sparse_ms > 0 and first.calls >= 2 and not first.cached
    assert first.runtime == "stock onnxruntime"
    again = calibrate.measure_layer(case, weight.numpy(), None)
    assert again.cached and again.sparse_ms == first.sparse_ms
    int8 = calibrate.measure_layer(replace(case, int8=True), weight.numpy(), None)
    assert not int8.cached and int8.sparse_ms > 0


def test_compile_for_stock_never_ships_a_slower_file(sparsec_cli, models_dir, tmp_path, monkeypatch):
    """End to end, really timed: the tiny MLP's layers lowered by force (policy always) run slower
    through the function bodies than dense on stock onnxruntime, so model.onnx is the dense graph
    and the report says why, with the measured times."""
    import json

    from sparsec.lowering.onnx_op import sparse_nodes

    monkeypatch.delenv("SPARSEC_MEASURE", raising=False)
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "MEASURE_S", 0.05)
    monkeypatch.setattr(stock_check, "FILE_S", 0.1)
    spec = tmp_path / "spec.toml"
    spec.write_text('[[prune]]\ntargets = ["fc*"]\nmethod = "magnitude"\ndensity = 0.25\nblock = [16, 16]\n\n'
                    '[export]\npolicy = "always"\ntarget = "stock"\nthreads = 1\nbench = false\n')
    out = tmp_path / "out"
    code, stdout, stderr = sparsec_cli("compile", models_dir / "tiny_mlp.py", "--spec", spec, "-o", out,
                                       "--no-progress")
    assert code == 0, stderr
    assert not sparse_nodes(onnx.load(out / "model.onnx"))
    lowering = json.loads((out / "report.json").read_text())["lowering"]
    check = lowering["model"]["stock_check"]
    assert check["attempts"][0]["sparse_layers"] == 2 and check["attempts"][0]["speedup"] < 1.05
    assert check["outcome"].startswith("shipped the dense graph")
    assert all(layer["measured"]["dense_ms"] > 0 and not layer["lowered"] for layer in lowering["layers"])
    assert "whole file on stock onnxruntime vs the dense file" in stdout and "shipped the dense graph" in stdout


def test_time_models_runs_each_model_alone_at_least_min_calls():
    from sparsec.lowering import onnx_op

    weight = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    dense = onnx_op.dense_layer_model(weight).SerializeToString()
    feeds = {"x": np.ones((2, 16), np.float32)}
    dense_ms, same_ms, calls = calibrate.time_models(dense, dense, feeds, False, 1, seconds=0.0,
                                                     rounds=2, min_calls=3)
    assert calls == 6 and dense_ms > 0 and same_ms > 0
