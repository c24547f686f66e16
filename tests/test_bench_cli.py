"""The lower stage of `sparsec compile` and `sparsec bench`."""
from __future__ import annotations

import json

import onnx

from sparsec.lowering.onnx_op import sparse_nodes

SPEC = """
[[prune]]
targets = ["fc*"]
method = "magnitude"
density = 0.25
block = [16, 16]

[export]
policy = "always"
bench_repeats = 3
"""


def test_compile_writes_verified_onnx_files_and_bench_times_them(sparsec_cli, models_dir, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    code, stdout, stderr = sparsec_cli("compile", models_dir / "tiny_mlp.py", "--spec", spec, "-o", out,
                                       "--no-progress", "--print-after", "lower_block_sparse")
    assert code == 0, stderr
    assert "torch.ops.sparsec.block_sparse_linear.default(" in stdout   # --print-after
    assert "lowering (fp32 blocks, policy always, target sparsec: onnxruntime with sparsec's kernel):" in stdout
    assert "max error vs PyTorch on x 4x8: onnxruntime" in stdout and "on x 5x8: onnxruntime" in stdout
    assert "dense (onnxruntime)" in stdout
    model = onnx.load(out / "model.onnx")
    assert len(sparse_nodes(model)) == 2
    assert not sparse_nodes(onnx.load(out / "model.dense.onnx"))
    report = json.loads((out / "report.json").read_text())
    lowering = report["lowering"]
    assert [layer["lowered"] for layer in lowering["layers"]] == [True, True]
    assert lowering["model"]["checks"][0]["error"] < 1e-4

    code, stdout, stderr = sparsec_cli("bench", out / "model.onnx", "--repeats", "3", "--threads", "1",
                                       "--json", tmp_path / "bench.json")
    assert code == 0, stderr
    assert "speedup" in stdout and "2 block-sparse nodes:" in stdout and "16x16" in stdout
    assert "fc1.weight " in stdout and "fc2.weight " in stdout   # each node named by the weight it holds
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [layer["weight"] for layer in result["layers"]] == ["fc1.weight", "fc2.weight"]
    assert "dense (onnxruntime)" in result["medians_ms"]
    assert result["sizes"]["dense"] > 0


def test_stop_after_train_writes_no_onnx(sparsec_cli, models_dir, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = sparsec_cli("compile", models_dir / "tiny_mlp.py", "--spec", models_dir / "tiny.toml",
                                  "-o", out, "--no-progress", "--stop-after", "train")
    assert code == 0, stderr
    assert not (out / "model.onnx").exists()


def test_bench_missing_file_is_a_user_error(sparsec_cli, tmp_path):
    code, _, stderr = sparsec_cli("bench", tmp_path / "nope.onnx")
    assert code == 2 and "no such ONNX file" in stderr


def test_bench_batch_on_a_fixed_batch_file_is_a_user_error(sparsec_cli, tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    code, _, stderr = sparsec_cli("bench", path, "--batch", "8", "--repeats", "1")
    assert code == 2 and "input 'x' has a fixed first dimension of 1" in stderr and "Traceback" not in stderr


def test_a_file_with_no_sparse_node_gets_no_speedup(sparsec_cli, models_dir, tmp_path):
    """Every layer dense (policy never; the stock target can ship the dense graph too): model.onnx is
    the dense graph, so its ratio to model.dense.onnx is noise, and neither the report nor `sparsec
    bench` may show it as a speedup of a sparse file."""
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('policy = "always"', 'policy = "never"'))
    out = tmp_path / "out"
    code, stdout, stderr = sparsec_cli("compile", models_dir / "tiny_mlp.py", "--spec", spec, "-o", out,
                                       "--no-progress")
    assert code == 0, stderr
    assert not sparse_nodes(onnx.load(out / "model.onnx"))
    bench = json.loads((out / "report.json").read_text())["lowering"]["bench"]
    assert "sparse (onnxruntime, function body)" not in bench["medians_ms"]
    assert bench["speedup"]["model, no sparse nodes (onnxruntime)"] is None
    assert any("no block-sparse nodes" in note for note in bench["notes"])
    line = next(line for line in stdout.splitlines() if "model, no sparse nodes (onnxruntime)" in line)
    assert line.rstrip().endswith("ms")   # no ratio after the time
    code, stdout, stderr = sparsec_cli("bench", out / "model.onnx", "--repeats", "2", "--threads", "1")
    assert code == 0, stderr
    row = next(line for line in stdout.splitlines() if "model, no sparse nodes" in line)
    assert row.split()[-1] == "-" and "no block-sparse nodes: every layer is dense" in stdout
