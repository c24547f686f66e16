"""Bad input of every kind ends with exit code 2 and one line that names the file, the key or the
function, never a traceback, a hang, exit 0 or exit 1: a spec fuzzer (hundreds of malformed specs,
fixed seed), special files, and tables of bad model files, bad ONNX files and bad output folders."""
from __future__ import annotations

import contextlib
import io
import os
import random
import time
from pathlib import Path

import pytest
import tomli_w

from sparsec.cli import main

MODELS = Path(__file__).parent / "models"
TINY = MODELS / "tiny_mlp.py"
VALID = {
    "prune": [{"targets": ["fc*"], "method": "movement", "density": 0.5, "scope": "global", "block": [2, 2]}],
    "schedule": {"kind": "cubic", "total": 10, "warmup": 2, "cooldown": 2},
    "train": {"steps": 10, "batch_size": 4, "lr": 0.01, "seed": 0},
}


def run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and all(line.startswith("sparsec: error: ") for line in lines), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ------------------------------------------------------------------------------- spec fuzzer
JUNK = [None, -1, 0, 2 ** 64, -(2 ** 70), 1e308, 3.5, -0.0, True, "", "x" * 500, "\x1b[31mred\x07",
        "tab\there", "\u202egnp.exe", [], [1], [[[]]], ["*", 3], {}, {"a": {"b": {}}}, [1, 2, 3],
        [2 ** 40, 2 ** 40], [-1, 4], [100000, 100000], "nan", "inf", [0.5, 0.5]]


def _mutate(rng: random.Random) -> dict:
    spec = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in VALID.items()}
    spec["prune"] = [dict(g) for g in VALID["prune"]]
    for _ in range(rng.randint(1, 4)):
        table = rng.choice(["prune", "schedule", "train", "export", "capture", "distill", rng.choice(["x", "pruned"])])
        if table == "prune":
            target = spec["prune"][0]
        else:
            target = spec.setdefault(table, {}) if not isinstance(spec.get(table), list) else {}
            if not isinstance(target, dict):
                continue
        key = rng.choice(list(target) + ["density", "block", "steps", "kind", "seed", "lambda",
                                         "threshold", "every", "warmup", "total", "policy", "nope"])
        if rng.random() < 0.2:
            target.pop(key, None)
        else:
            target[key] = rng.choice(JUNK)
    return spec


def _write_toml(path: Path, data: dict) -> None:
    def clean(value):  # TOML has no null: drop Nones
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value if v is not None]
        return value
    try:
        path.write_text(tomli_w.dumps(clean(data)))
    except (TypeError, ValueError):  # a mixed array tomli_w refuses: write something else broken
        path.write_text("[[prune]\ntargets = ")


def test_a_fuzzed_spec_exits_0_or_2_with_one_line_per_problem_and_never_hangs(tmp_path):
    rng = random.Random(20261130)
    start = time.perf_counter()
    codes = []
    for i in range(300):
        path = tmp_path / f"s{i}.toml"
        if i % 10 == 0:  # raw bytes: truncated, BOM, binary, deep nesting
            path.write_bytes(rng.choice([b"[[prune]]\ntargets = [\"", b"\xef\xbb\xbf[schedule]\n",
                                         bytes(rng.randrange(256) for _ in range(64)),
                                         b"a = " + b"[" * 5000 + b"]" * 5000, b"[a]\nb = 1\n" * 3]))
        else:
            _write_toml(path, _mutate(rng))
        code, _, err = run("validate", path)
        assert code in (0, 2), (i, path.read_bytes()[:200], err)
        assert "Traceback" not in err and "internal error" not in err, err
        if code == 2:
            assert all(line.startswith(f"sparsec: error: {path}") for line in err.strip().splitlines()), err
        codes.append(code)
    assert codes.count(2) > 250                    # the mutations are mistakes
    assert time.perf_counter() - start < 60        # and none of them hangs


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "too-long", "huge", "bom", "missing"])
def test_special_spec_files_are_refused_in_one_line(tmp_path, kind):
    if kind == "dev-zero":
        path, fragment = Path("/dev/zero"), "not a regular file"
    elif kind == "fifo":
        path, fragment = tmp_path / "pipe.toml", "not a regular file"
        os.mkfifo(path)
    elif kind == "directory":
        path, fragment = tmp_path, "is a directory"
    elif kind == "too-long":
        path, fragment = tmp_path / ("x" * 5000 + ".toml"), "cannot read (File name too long)"
    elif kind == "huge":
        path, fragment = tmp_path / "huge.toml", "larger than 1 MiB"
        path.write_text("# padding\n" * 200_000)
    elif kind == "bom":
        path, fragment = tmp_path / "bom.toml", "byte-order mark"
        path.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(VALID).encode())
    else:
        path, fragment = tmp_path / "nope.toml", "no such file"
    code, _, err = run("validate", path)
    assert_user_error(code, err, fragment)


@pytest.mark.parametrize("patch, fragment", [
    ({"seed": 2 ** 64}, "train.seed: 18446744073709551616 does not fit a 64-bit integer"),
    ({"block": [100000, 100000]}, "prune[0].block: [100000, 100000] is out of range"),
    ({"kind": "linear", "total": 10, "warmup": 8, "cooldown": 4}, "leaves no steps for the pruning iterations"),
    ({"kind": "one_shot", "warmup": 20}, "train.steps: 10 steps end before pruning starts"),
    ({"method": "soft_movement", "control": "none", "threshold": 2.0, "score_init": 1.0},
     "prune[0].score_init: 1 is not above threshold = 2"),
    ({"targets": ["fc\x1b[2J*"], "density": 7}, "prune[0].density: 7.0 is out of range"),
])
def test_spec_values_that_would_fail_later_are_refused_now(tmp_path, patch, fragment):
    spec = {k: (dict(v) if isinstance(v, dict) else [dict(g) for g in v]) for k, v in VALID.items()}
    for key, value in patch.items():
        table = "train" if key == "seed" else "schedule" if key in ("kind", "total", "warmup", "cooldown") else None
        (spec[table] if table else spec["prune"][0])[key] = value
    path = tmp_path / "spec.toml"
    path.write_text(tomli_w.dumps(spec))
    code, _, err = run("validate", path)
    assert_user_error(code, err, fragment)
    assert "\x1b" not in err   # a control character in a name is printed escaped


def test_names_with_control_characters_print_escaped(tmp_path):
    """A module named with an ANSI code (nn.Module.add_module allows it) prints as text in the
    dry-run list, the report, its tables and report.txt: never as a terminal escape."""
    model = tmp_path / "model.py"
    model.write_text(
        "import torch\n"
        "def build_model():\n"
        "    m = torch.nn.Sequential()\n"
        "    m.add_module('fc\\x1b[31mred\\u202e', torch.nn.Linear(32, 32))\n"
        "    m.add_module('out', torch.nn.Linear(32, 4))\n"
        "    return m\n"
        "def example_inputs():\n    return torch.randn(2, 32)\n"
        "def train_data():\n    return [(torch.randn(8, 32), torch.arange(8) % 4)] * 2\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('[[prune]]\ntargets = ["*"]\nmethod = "magnitude"\ndensity = 0.5\nblock = [16, 16]\n'
                    '[train]\nsteps = 2\n[export]\nbench = false\n')
    for extra in (["--dry-run"], ["-o", tmp_path / "out", "--no-progress"]):
        code, out, err = run("compile", model, "--spec", spec, *extra)
        assert code == 0, err
        assert "fc\\x1b[31mred\\u202e.weight" in out
        assert "\x1b" not in out + err and "\u202e" not in out + err
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "\x1b" not in report and "fc\\x1b[31mred" in report


# ---------------------------------------------------------------------------- bad model files
GOOD_PARTS = {
    "header": "import os, sys, torch\n",
    "build": "def build_model():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n",
    "inputs": "def example_inputs():\n    return torch.randn(4, 8)\n",
    "train": "def train_data():\n    return [(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))]\n",
}


def _model_file(tmp_path: Path, **replace: str) -> Path:
    parts = {**GOOD_PARTS, **replace}
    path = tmp_path / "model.py"
    path.write_text("".join(parts.values()))
    return path


@pytest.mark.parametrize("replace, fragments", [
    ({"header": "import sys, torch\nsys.exit(0)\n"}, ["importing it called sys.exit(0)"]),
    ({"build": "import os\ndef build_model():\n    os._exit(0)\n"}, ["build_model() called os._exit(0)"]),
    ({"train": "def train_data():\n    return [(torch.randn(4, 8), torch.tensor([0, 1, 9, 0]))]\n"},
     ["a target is 9, outside the 3 classes of the logits"]),
    ({"train": GOOD_PARTS["train"] + "eval_data = train_data\ndef metric(outputs, batch):\n    return 'great'\n"},
     ["metric(outputs, batch) must return a number", "str"]),
    ({"train": GOOD_PARTS["train"] + "def loss(outputs, batch):\n    return outputs.sum() * float('nan')\n"},
     ["is nan at training step 1"]),
    ({"inputs": "def example_inputs():\n    return torch.randn(4, 5)\n"},
     ["does not run on its example inputs (4x5)", "mat1 and mat2"]),
])
def test_bad_model_files_are_one_line_each(tmp_path, replace, fragments):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[prune]]\ntargets = ["*"]\nmethod = "magnitude"\ndensity = 0.5\n[train]\nsteps = 2\n'
                    '[export]\nbench = false\n')
    code, _, err = run("compile", _model_file(tmp_path, **replace), "--spec", spec, "-o", tmp_path / "out",
                       "--no-progress")
    assert_user_error(code, err, str(tmp_path / "model.py") if "target" not in fragments[0] else "", *fragments)
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------- bad ONNX files and folders
@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage" * 10, "truncated"])
def test_bench_refuses_what_is_not_an_onnx_model(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content == "truncated":
        from sparsec.lowering.block_format import pack, random_keep
        from sparsec.lowering.onnx_op import single_layer_model
        import numpy as np

        data = single_layer_model(pack(np.ones((32, 32), np.float32), random_keep(32, 32, (8, 8), 0.5), (8, 8))).SerializeToString()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    code, _, err = run("bench", path, "--repeats", "1")
    assert_user_error(code, err, str(path), "not an ONNX model sparsec can time")


@pytest.mark.parametrize("argv", [("--repeats", "0"), ("--batch", "0"), ("--threads", "-2")])
def test_bench_numbers_must_be_positive(tmp_path, argv):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["bench", str(path), *argv])
    assert exc.value.code == 2 and "must be at least 1" in err.getvalue()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "not a sparsec output folder"),
    (lambda p: ((p / ".sparsec").write_text('{"writer": "sparsec"}'), (p / "report.json").write_text("{oops")),
     "report.json: cannot be read as JSON"),
    (lambda p: ((p / ".sparsec").write_text('{"writer": "sparsec"}'), (p / "report.json").write_text("[1, 2]")),
     "report.json: is not a sparsec report"),
    (lambda p: ((p / ".sparsec").write_text('{"writer": "sparsec"}'), (p / "report.json").write_text("{}")),
     "no IR snapshots"),
])
def test_inspect_refuses_broken_output_folders(tmp_path, make, fragment):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    code, _, err = run("inspect", out)
    assert_user_error(code, err, fragment)
