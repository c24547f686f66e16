"""The `sparsec` command line: exit codes, one-line errors, the compile flow, the output folder and
`inspect`. Most tests run `main(argv)` in-process on tests/models/tiny_mlp.py (a few seconds)."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsec import outdir
from sparsec.cli import main

MODELS = Path(__file__).parent / "models"
TINY, SPEC = MODELS / "tiny_mlp.py", MODELS / "tiny.toml"
OUT_FILES = ("spec.resolved.toml", "ir/00_captured.py.txt", "graph.json", "sites.json",
             "state.safetensors", "model.safetensors", "report.json", "report.txt")


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsec: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """One full compile of the tiny model, shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("compiled") / "tiny"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["compile", str(TINY), "--spec", str(SPEC), "-o", str(out), "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------------------------ validate
def test_validate_prints_the_summary(sparsec_cli):
    code, out, err = sparsec_cli("validate", SPEC)
    assert code == 0, err
    assert "movement, density 0.5" in out
    assert "cubic over 24 steps" in out


def test_validate_reports_every_problem_one_line_each(sparsec_cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[prune]]\ntargets = ["*"]\nmethod = "movment"\ndensity = 1.5\n\n'
                   '[schedule]\nkind = "cubic"\ntotall = 3\n')
    code, out, err = sparsec_cli("validate", bad)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) >= 3, err  # (a cubic schedule also needs a total)
    assert all(line.startswith(f"sparsec: error: {bad}: ") for line in lines)
    assert any("prune[0].method" in line for line in lines)
    assert any("prune[0].density" in line for line in lines)
    assert any("schedule.totall" in line for line in lines)
    assert "Traceback" not in err + out


def test_validate_missing_file(sparsec_cli, tmp_path):
    code, _, err = sparsec_cli("validate", tmp_path / "nope.toml")
    assert_one_error_line(code, err, "nope.toml", "no such file")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[prune]]\ntargets = 3\n")
    proc = subprocess.run([sys.executable, "-m", "sparsec", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sparsec: error:" in proc.stderr and "prune[0].targets" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_under_torchrun_the_first_process_alone_reports_a_spec_error_and_others_name_their_rank(
        sparsec_cli, tmp_path, monkeypatch):
    """Every process of `torchrun -m sparsec compile` reads the same spec and model file: their
    errors are reported once (rank 0); any other error says which process hit it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[[prune]]\ntargets = 3\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        code, _, err = sparsec_cli("validate", bad)
        assert code == 2 and ("prune[0].targets" in err) == (rank == "0"), err
        assert err.strip() if rank == "0" else err == "", err
    for name in ("MASTER_ADDR", "MASTER_PORT"):   # a launcher's environment, half set by hand
        monkeypatch.delenv(name, raising=False)
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", tmp_path / "out")
    assert code == 2 and err.startswith("sparsec: error: [rank 1] cannot start the gloo process group"), err
    assert "MASTER_ADDR" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- compile
def test_dry_run_lists_sites_and_left_out_weights_and_writes_nothing(sparsec_cli, tmp_path):
    out = tmp_path / "out"
    code, text, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--dry-run", "-o", out)
    assert code == 0, err
    assert "2 sites" in text
    assert "fc1.weight" in text and "32x8" in text and "movement" in text
    assert "fc2.weight" in text and "1,024" in text
    left = text.split("left out", 1)[1]
    assert "head.weight" in left and "not matched" in left
    assert "scale" in left
    assert not out.exists()


def test_compile_writes_the_whole_output_folder(compiled):
    for name in OUT_FILES:
        assert (compiled / name).is_file(), name
    irs = sorted(p.name for p in (compiled / "ir").iterdir())
    assert irs[0] == "00_captured.py.txt" and irs[5] == "05_attach_schedule.py.txt"
    # the lowering passes' FX IR, the exported ONNX and the IR after every ONNX pass
    assert irs[6:10] == ["06_bake_masks.py.txt", "07_choose_sparse_layers.py.txt",
                         "08_lower_block_sparse.py.txt", "09_safe_views.py.txt"]
    assert irs[10] == "10_exported.onnx.txt" and irs[-1] == "19_record_example_inputs.onnx.txt"
    assert "main_graph" in (compiled / "ir" / "15_fuse_epilogues.onnx.txt").read_text()
    assert not list(compiled.parent.glob(".tiny.*")), "no temporary folder left behind"


def test_compile_report_and_state(compiled):
    report = json.loads((compiled / "report.json").read_text())
    assert report["steps_trained"] == 24
    assert report["density"] == pytest.approx(0.5, abs=0.01)
    assert report["density_asked"] == 0.5
    assert [layer["site"] for layer in report["layers"]] == ["fc1.weight", "fc2.weight"]
    assert report["metric_dense"] is not None and report["metric_pruned"] is not None
    assert "head.weight" in report["left_out"]
    assert "density" in (compiled / "report.txt").read_text()

    state = load_file(compiled / "state.safetensors")
    assert {"module.fc1.weight_mask", "module.fc1.weight_scores", "step_count"} <= set(state)
    assert int(state["step_count"]) == 24
    model = load_file(compiled / "model.safetensors")
    assert "fc1.weight" in model and not any(k.endswith(("_mask", "_scores")) for k in model)
    kept = (model["fc1.weight"] != 0).float().mean() * 256 + (model["fc2.weight"] != 0).float().mean() * 1024
    assert float(kept) / 1280 == pytest.approx(report["density"], abs=0.01)

    sites = json.loads((compiled / "sites.json").read_text())
    assert [s["name"] for s in sites["sites"]] == ["fc1.weight", "fc2.weight"]
    assert "head.weight" in sites["left_out"]


def test_print_after_prints_the_ir(sparsec_cli, tmp_path):
    code, out, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--dry-run",
                                 "--print-after", "insert_masks", "--print-pipeline", "--time-passes")
    assert code == 0, err
    assert "# sparsec IR after insert_masks" in out
    assert "fc1_weight_mask" in out
    assert "# sparsec IR after find_sites" not in out
    assert "pipeline:" in out and "[rewrite] insert_masks" in out
    assert "select_sites" in out.split("pipeline:")[1]


def test_print_after_accepts_a_comma_list(sparsec_cli):
    code, out, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--dry-run",
                                 "--print-after", "find_sites,attach_schedule")
    assert code == 0, err
    assert "# sparsec IR after find_sites" in out and "# sparsec IR after attach_schedule" in out


def test_unknown_print_after_lists_the_passes(sparsec_cli):
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--dry-run", "--print-after", "insert_mask")
    assert_one_error_line(code, err, "insert_mask", "insert_masks", "select_sites", "all")


def test_stop_after_select_writes_what_exists(sparsec_cli, tmp_path):
    out = tmp_path / "sel"
    code, text, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--stop-after", "select", "-o", out)
    assert code == 0, err
    names = sorted(p.name for p in (out / "ir").iterdir())
    assert names == ["00_captured.py.txt", "01_make_mode_aware.py.txt", "02_find_sites.py.txt",
                     "03_select_sites.py.txt"]
    assert not (out / "state.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_after"] == "select" and report["steps_trained"] == 0
    assert report["density"] is None
    code, text, err = sparsec_cli("inspect", out)
    assert code == 0, err
    assert "# sparsec IR after select_sites" in text and "no masks" in text


def test_stop_after_rewrite_has_a_program_but_no_training(sparsec_cli, tmp_path):
    out = tmp_path / "rw"
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--stop-after", "rewrite", "-o", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["steps_trained"] == 0 and report["density"] == 1.0
    assert int(load_file(out / "state.safetensors")["step_count"]) == 0


def test_default_output_folder_is_out_slash_stem(sparsec_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--stop-after", "capture")
    assert code == 0, err
    assert (tmp_path / "out" / "tiny_mlp" / "report.json").is_file()
    assert "wrote out/tiny_mlp" in text


# ------------------------------------------------------------------------- bad model files
@pytest.mark.parametrize("model, fragments", [
    ("no_build.py", ("no_build.py", "build_model()")),
    ("import_raises.py", ("import_raises.py", "RuntimeError", "/nowhere/ckpt is not mounted")),
    ("wrong_type.py", ("wrong_type.py", "torch.nn.Module", "dict")),
    ("missing.py", ("missing.py", "no such file")),
])
def test_bad_model_file_is_one_error_line(sparsec_cli, tmp_path, model, fragments):
    code, _, err = sparsec_cli("compile", MODELS / model, "--spec", SPEC, "-o", tmp_path / "o")
    assert_one_error_line(code, err, *fragments)
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(sparsec_cli, tmp_path):
    code, _, err = sparsec_cli("compile", MODELS / "import_raises.py", "--spec", SPEC, "--debug")
    assert code == 2
    assert "Traceback" in err and "sparsec: error:" in err


def test_internal_error_is_one_line_and_exit_1(sparsec_cli, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("sparsec.spec.format_summary", broken)
    code, _, err = sparsec_cli("validate", SPEC)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "--debug" in lines[0]
    assert "boom" in lines[0]


# --------------------------------------------------------------------------- atomic output
def test_an_existing_out_survives_a_failing_compile(sparsec_cli, tmp_path):
    out = tmp_path / "keep"
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "--stop-after", "capture", "-o", out)
    assert code == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = sparsec_cli("compile", MODELS / "train_raises.py", "--spec", SPEC, "-o", out)
    assert_one_error_line(code, err, "train_data()", "the training shards are missing")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_write_atomically_replaces_or_keeps_whole_folders(tmp_path):
    out = tmp_path / "o"
    outdir.write_atomically(out, lambda d: (d / "a.txt").write_text("1"))
    outdir.write_atomically(out, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    def half_written(folder: Path) -> None:
        (folder / "c.txt").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        outdir.write_atomically(out, half_written)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_refuses_to_replace_a_folder_sparsec_did_not_write(sparsec_cli, tmp_path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", precious)
    assert_one_error_line(code, err, "not a sparsec output folder")
    assert (precious / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------- inspect
def test_inspect_prints_final_ir_and_density_table(sparsec_cli, compiled):
    code, out, err = sparsec_cli("inspect", compiled)
    assert code == 0, err
    assert "# sparsec IR after attach_schedule" in out
    assert "per-layer density" in out and "fc1.weight" in out and "fc2.weight" in out


def test_inspect_stage(sparsec_cli, compiled):
    code, out, _ = sparsec_cli("inspect", compiled, "--stage", "captured")
    assert code == 0 and "weight_mask" not in out
    code, out, _ = sparsec_cli("inspect", compiled, "--stage", "insert_masks")
    assert code == 0 and "# sparsec IR after insert_masks" in out
    code, _, err = sparsec_cli("inspect", compiled, "--stage", "lower_everything")
    assert_one_error_line(code, err, "lower_everything", "insert_masks")


def test_inspect_diff(sparsec_cli, compiled):
    code, out, err = sparsec_cli("inspect", compiled, "--diff")
    assert code == 0, err
    assert out.startswith("--- ir/00_captured.py.txt\n+++ ir/05_attach_schedule.py.txt")
    assert "+    fc1_weight_mask = self.fc1.weight_mask" in out


def test_inspect_dot_marks_masks_and_scores(sparsec_cli, compiled, tmp_path):
    code, out, err = sparsec_cli("inspect", compiled, "--format", "dot")
    assert code == 0, err
    assert out.startswith('digraph "tiny" {')
    mask_line = next(line for line in out.splitlines() if line.strip().startswith('"fc1_weight_mask" ['))
    assert "[mask]" in mask_line and "fillcolor" in mask_line
    assert '"fc1_weight_mask" -> "fc1_weight_masked";' in out
    target = tmp_path / "g.dot"
    code, out, _ = sparsec_cli("inspect", compiled, "--format", "dot", "-o", target)
    assert code == 0 and target.read_text().startswith("digraph")


def test_inspect_graphml_is_valid_and_has_roles(sparsec_cli, compiled, tmp_path):
    import networkx as nx

    target = tmp_path / "g.graphml"
    code, _, err = sparsec_cli("inspect", compiled, "--format", "graphml", "-o", target)
    assert code == 0, err
    ET.parse(target)
    graph = nx.read_graphml(target)
    assert graph.nodes["fc1_weight_scores"]["role"] == "scores"
    assert graph.nodes["fc2_weight_mask"]["role"] == "mask"
    assert graph.has_edge("fc2_weight_masked", "linear_1")


@pytest.mark.parametrize("make", ["missing", "plain_folder"])
def test_inspect_rejects_what_is_not_an_output_folder(sparsec_cli, tmp_path, make):
    target = tmp_path / "x"
    if make == "plain_folder":
        target.mkdir()
        (target / "hello.txt").write_text("hi")
    code, _, err = sparsec_cli("inspect", target)
    assert_one_error_line(code, err, str(target))


# ------------------------------------------------------------------------------------- example
@pytest.mark.slow
def test_digits_example_end_to_end(sparsec_cli, tmp_path):
    """bin/demo's compile: movement pruning to 10% keeps the digits MLP above 90% accuracy."""
    root = Path(__file__).parent.parent / "examples" / "digits"
    out = tmp_path / "digits"
    threads = torch.get_num_threads()  # the example's model.py sets one thread
    try:
        code, text, err = sparsec_cli("compile", root / "model.py", "--spec", root / "spec.toml",
                                      "-o", out, "--no-progress")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["density"] == pytest.approx(0.1, abs=0.005)
    assert report["metric_dense"] > 0.9 and report["metric_pruned"] > 0.9


# ------------------------------------------------------------------ the ONNX stage as passes
BROADCAST_MODEL = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) + x[:, :1]   # a broadcast Add: not a residual the layer can fold


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return torch.randn(4, 64)
'''
BROADCAST_SPEC = '''
[[prune]]
targets = ["fc.weight"]
method = "magnitude"
density = 0.25
block = [16, 16]

[export]
policy = "always"
bench = false
'''


def test_onnx_passes_are_listed_printed_timed_and_explained(sparsec_cli, tmp_path):
    (tmp_path / "net.py").write_text(BROADCAST_MODEL)
    (tmp_path / "net.toml").write_text(BROADCAST_SPEC)
    code, out, err = sparsec_cli("compile", tmp_path / "net.py", "--spec", tmp_path / "net.toml",
                                 "-o", tmp_path / "out", "--print-pipeline", "--print-after",
                                 "lower_block_sparse,fuse_epilogues", "--time-passes", "--debug")
    assert code == 0, err
    listing = out.split("pipeline:")[1]
    for name in ("[lower] lower_block_sparse", "[lower, onnx] attention_head_layout",
                 "[lower, onnx] lower_attention", "[lower, onnx] fuse_epilogues", "[lower, onnx] fuse_qkv",
                 "[lower, onnx] compact_padding"):
        assert name in listing
    assert "# sparsec IR after lower_block_sparse" in out and "block_sparse_linear" in out
    assert "# sparsec ONNX IR after fuse_epilogues" in out and "sparsec.BlockSparseLinear" in out
    assert "fuse_epilogues: rule fold_residual did not apply at Add node" in out
    assert "is not provably the output's" in out
    assert "torch.onnx export" in out and "attach_functions" in out.split("time per pass and stage:")[1]
    ir_files = sorted(p.name for p in (tmp_path / "out" / "ir").iterdir())
    assert "17_attach_functions.onnx.txt" in ir_files


def test_a_train_table_without_train_data_is_an_error_before_any_work(sparsec_cli, tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import torch\n"
                     "def build_model():\n    return torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
                     "def example_inputs():\n    return torch.randn(2, 8)\n")
    code, _, err = sparsec_cli("compile", model, "--spec", SPEC, "-o", tmp_path / "out")
    assert_one_error_line(code, err, str(model), "[train]", "train_data()")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ the output folder
def test_a_failed_lowering_keeps_the_training_and_sparsec_export_redoes_it(sparsec_cli, tmp_path, monkeypatch):
    import sparsec.export as export_module
    from sparsec.export.options import ExportError

    out = tmp_path / "out"
    real = export_module.write_onnx

    def broken(*args, **kwargs):
        raise ExportError("model.onnx: ONNX export failed: a decomposition torch.onnx could not do")

    monkeypatch.setattr(export_module, "write_onnx", broken)
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", out, "--no-progress")
    assert_one_error_line(code, err, "could not do", f"the training results are kept in {out}",
                          f"sparsec export {out}")
    for name in ("state.safetensors", "model.safetensors", "train.json", "report.json", ".sparsec"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["steps_trained"] == 24 and "could not do" in report["lowering_error"]
    assert not (out / "model.onnx").exists()
    assert not list(tmp_path.glob(".out.*")), "no temporary folder left behind"

    monkeypatch.setattr(export_module, "write_onnx", real)
    code, stdout, err = sparsec_cli("export", out)
    assert code == 0, err
    assert (out / "model.onnx").is_file() and (out / "model.dense.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    assert "lowering_error" not in report and report["lowering"]["model"]["path"] == "model.onnx"
    assert report["steps_trained"] == 24   # the training part of the report is the compile's
    assert "lowering (fp32 blocks" in stdout


def test_a_folder_without_sparsecs_marker_is_never_replaced(sparsec_cli, tmp_path):
    """Even one holding files named like sparsec's (report.json, spec.resolved.toml)."""
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in (("report.json", "{}"), ("spec.resolved.toml", ""), ("notes.txt", "keep me")):
        (out / name).write_text(text)
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", out, "--no-progress")
    assert_one_error_line(code, err, str(out), "not a sparsec output folder")
    assert (out / "notes.txt").read_text() == "keep me"


def test_the_default_out_of_one_model_file_is_not_taken_by_another(sparsec_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other" / TINY.name
    other.parent.mkdir()
    other.write_text(TINY.read_text())
    assert sparsec_cli("compile", TINY, "--spec", SPEC, "--stop-after", "rewrite")[0] == 0
    code, _, err = sparsec_cli("compile", other, "--spec", SPEC, "--stop-after", "rewrite")
    assert_one_error_line(code, err, "holds the output of", str(TINY.resolve()), "-o")


def test_a_second_compile_to_the_same_out_fails_clearly_while_the_first_holds_it(sparsec_cli, tmp_path):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", out, "--stop-after", "rewrite")
    assert_one_error_line(code, err, str(out), "another sparsec compile is writing it")
    assert not out.exists()


def test_stale_temporary_folders_of_a_killed_compile_are_removed_and_modes_match(sparsec_cli, tmp_path):
    out = tmp_path / "out"
    for stale in (".out.tmp-abc123", ".out.onnx-def456", ".out.old-0a1b2c3d"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "half.bin").write_bytes(b"x")
    (tmp_path / ".other.tmp-zzz").mkdir()   # another OUT's: not ours to remove
    code, _, err = sparsec_cli("compile", TINY, "--spec", SPEC, "-o", out, "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".other.tmp-zzz"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes   # model.onnx is not the private mode of a temp file


def test_model_safetensors_loads_strictly_into_the_users_model(sparsec_cli, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "bert.py").write_text(BERT_MODEL)
    (tmp_path / "spec.toml").write_text('[[prune]]\ntargets = ["*encoder.layer.*"]\nmethod = "magnitude"\n'
                                        'density = 0.5\n')
    code, _, err = sparsec_cli("compile", tmp_path / "bert.py", "--spec", tmp_path / "spec.toml",
                               "-o", tmp_path / "out", "--stop-after", "rewrite")
    assert code == 0, err
    sys.path.insert(0, str(tmp_path))
    try:
        import bert  # noqa: PLC0415 - the model file of this test
    finally:
        sys.path.pop(0)
    model = bert.build_model()
    model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)
    assert (model.bert.encoder.layer[0].intermediate.dense.weight == 0).float().mean() == 0.5


BERT_MODEL = '''
import torch
from transformers import BertConfig, BertForSequenceClassification


def build_model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32))


def example_inputs():
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
'''


def test_dry_run_lists_every_site_when_the_targets_match_nothing(sparsec_cli, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[prune]]\ntargets = ["encoder.*"]\nmethod = "magnitude"\ndensity = 0.5\n')
    code, out, err = sparsec_cli("compile", TINY, "--spec", spec, "--dry-run")
    assert code == 0, err
    assert "0 sites" in out and "fc1.weight: not matched by any [[prune]] targets" in out
    assert "prune[0].targets ['encoder.*'] select no site" in out
    code, _, err = sparsec_cli("compile", TINY, "--spec", spec, "-o", tmp_path / "out")
    assert_one_error_line(code, err, "prune[0].targets", "selected no site", "--dry-run")


def test_set_overrides_any_spec_key(sparsec_cli, tmp_path):
    code, out, err = sparsec_cli("validate", SPEC, "--set", "train.steps=30", "--set", "prune.block=[4, 4]",
                                 "--set", "export.bench=false")
    assert code == 0, err
    assert "train: 30 steps" in out and "4x4 blocks" in out and "bench = false" in out
    code, _, err = sparsec_cli("validate", SPEC, "--set", "train.steps=abc")
    assert_one_error_line(code, err, "train.steps: expected an integer, got a string ('abc')")
    code, _, err = sparsec_cli("validate", SPEC, "--set", "steps")
    assert_one_error_line(code, err, "--set steps: expected TABLE.KEY=VALUE")
