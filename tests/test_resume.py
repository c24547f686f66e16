"""Checkpoints and exact resume: a compile killed with SIGKILL (twice, at different steps) and
resumed with `--resume` ends bit-identical to an uninterrupted one (Program state, optimizer and
generator state, the finalized model, the loss history and train.jsonl), for movement pruning (learned
scores, dropout, a shuffled Dataset, a linear learning-rate schedule with warm-up, evaluations) and
for PINS with distillation and self-regularization and QM with Fisher estimates (their extra data
stream and checkpoint). And what a resume refuses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

import sparsec
from sparsec.modelfile import load as load_model_file
from sparsec.spec import load_spec
from sparsec.training import checkpoint, lr
from sparsec.training.optim import make_optimizer

MODEL = '''
import time
import torch

class Data(torch.utils.data.Dataset):
    def __init__(self, delay=0.0):
        self.delay = delay
    def __len__(self):
        return 96
    def __getitem__(self, i):
        time.sleep(self.delay)
        x = torch.randn(16, generator=torch.Generator().manual_seed(i))
        return x, int(x[:4].sum() > 0) + 2 * int(x[4:8].sum() > 0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.drop = torch.nn.Dropout(0.2)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)
    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))

def build_model():
    torch.manual_seed(0)
    return Net()

def example_inputs():
    return torch.randn(2, 16)

def train_data():
    return Data(DELAY)

def eval_data():
    return Data()
'''
STEPS = 30
SPECS = {
    "movement": {"prune": [{"targets": ["fc*"], "method": "movement", "density": 0.25, "block": [8, 8]}],
                 "schedule": {"kind": "cubic", "total": STEPS, "warmup": 2, "cooldown": 5}},
    "pins_distill_selfreg": {
        "prune": [{"targets": ["fc*"], "method": "pins", "density": 0.3, "scope": "global"}],
        "schedule": {"kind": "cubic", "total": STEPS, "warmup": 2, "cooldown": 5},
        "distill": {"alpha": 0.5, "temperature": 2.0}, "self_regularization": {"lambda": 1.0}},
    "qm_fisher": {"prune": [{"targets": ["fc*"], "method": "qm", "density": 0.2, "scope": "global",
                             "fisher_examples": 16, "fisher_chunk": 4}],
                  "schedule": {"kind": "exponential", "total": STEPS, "warmup": 2, "cooldown": 2,
                               "iterations": 6}},
}
TRAIN = {"steps": STEPS, "batch_size": 8, "lr": 1e-2, "lr_schedule": "linear", "warmup_steps": 3,
         "checkpoint_every": 5, "eval_every": 10}
COMPARED = ("state.safetensors", "train_state.safetensors", "model.safetensors")


def write_case(folder: Path, method: str, delay: float) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.py"
    model.write_text(MODEL.replace("DELAY", repr(delay)))
    spec = folder / "spec.toml"
    spec.write_text(tomli_w.dumps({**SPECS[method], "train": TRAIN, "export": {"bench": False}}))
    return model, spec


def kill_when(proc: subprocess.Popen, ready: Path, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready` exists (it must not have finished before)."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, f"the compile ended (exit {proc.returncode}) before {ready.name}"
        assert time.monotonic() < deadline, f"no {ready} after {timeout} s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def cli(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsec", "compile", *map(str, args), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_same_training(a: Path, b: Path) -> None:
    for name in COMPARED:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(left) == sorted(right), name
        for key in left:
            assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), (name, key)
    history = [json.loads((folder / "train.json").read_text()) for folder in (a, b)]
    for key in ("losses", "densities", "lrs", "metric_history", "pruning_iterations", "metric_pruned"):
        assert history[0][key] == history[1][key], key
    assert (a / "train.jsonl").read_text() == (b / "train.jsonl").read_text()


# movement in the default run; the others (about 35 s each on 2 cores) with `bin/test --slow`
@pytest.mark.parametrize("method", [m if m == "movement" else pytest.param(m, marks=pytest.mark.slow) for m in SPECS])
def test_killed_twice_and_resumed_is_bit_identical(method, tmp_path, sparsec_cli):
    model, spec = write_case(tmp_path / "plain", method, 0.0)
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", tmp_path / "a", "--no-progress")
    assert code == 0, err

    slow_model, slow_spec = write_case(tmp_path / "slow", method, 0.004)  # ~30 ms per step
    out = tmp_path / "b"
    work = checkpoint.working_folder(out)
    kill_when(cli(slow_model, "--spec", slow_spec, "-o", out), work / "step-0000010")
    kill_when(cli(slow_model, "--spec", slow_spec, "-o", out, "--resume"), work / "step-0000020")
    assert checkpoint.latest(work).name == "step-0000020"   # (step 10 may not be removed yet)
    code, stdout, err = sparsec_cli("compile", slow_model, "--spec", slow_spec, "-o", out, "--no-progress",
                                    "--resume")
    assert code == 0, err
    assert "resumed after step 20" in stdout
    assert not work.exists()  # the working folder goes once OUT holds the training
    assert_same_training(tmp_path / "a", out)


def test_resume_refuses_another_spec_and_a_missing_checkpoint(tmp_path, sparsec_cli):
    model, spec = write_case(tmp_path, "movement", 0.004)
    out = tmp_path / "out"
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", out, "--no-progress", "--resume")
    assert code == 2 and f"no checkpoint to resume from in {checkpoint.working_folder(out)}" in err
    kill_when(cli(model, "--spec", spec, "-o", out), checkpoint.working_folder(out) / "step-0000005")
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", out, "--no-progress", "--resume",
                               "--set", "train.lr=0.5")
    assert code == 2 and "was written with another spec (train.lr differs)" in err
    assert err.count("\n") == 1
    # keys that do not change the computation may differ
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", out, "--no-progress", "--resume",
                               "--set", "train.log_every=3", "--set", "export.policy=\"never\"")
    assert code == 0, err


def test_a_fresh_run_drops_older_checkpoints(tmp_path, sparsec_cli):
    model, spec = write_case(tmp_path, "movement", 0.004)
    out = tmp_path / "out"
    work = checkpoint.working_folder(out)
    kill_when(cli(model, "--spec", spec, "-o", out), work / "step-0000020")
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", out, "--no-progress",
                               "--set", "train.steps=12", "--set", "schedule.total=12", "--set", "train.checkpoint_every=0")
    assert code == 0, err
    assert not work.exists()
    assert json.loads((out / "train.json").read_text())["steps"] == 12


def test_the_api_resumes_from_out(tmp_path, sparsec_cli):
    """OUT's state.safetensors + train_state.* restore a fresh Program, optimizer and scheduler to
    the end of training: the same tensors, the same optimizer moments, the same learning rates."""
    model, spec_path = write_case(tmp_path, "movement", 0.0)
    out = tmp_path / "out"
    code, _, err = sparsec_cli("compile", model, "--spec", spec_path, "-o", out, "--no-progress")
    assert code == 0, err
    mf = load_model_file(model)
    spec = load_spec(spec_path)
    prog = sparsec.compile(mf.model, spec, mf.example_inputs)
    optimizer = make_optimizer(prog, spec.train)
    scheduler = lr.scheduler(optimizer, spec.train)
    restored = checkpoint.load(out)
    restored.restore(prog, optimizer, scheduler)
    assert restored.step == STEPS and int(prog.step_count) == STEPS
    saved = load_file(str(out / "state.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in prog.state_dict().items())
    assert scheduler.last_epoch == STEPS and optimizer.param_groups[0]["lr"] == 0.0  # linear decay ends at 0
    moments = load_file(str(out / "train_state.safetensors"))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments["optimizer.0.exp_avg"])


def test_a_damaged_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / checkpoint.JSON_FILE).write_text("{not json")
    with pytest.raises(sparsec.errors.UserError, match="not a readable sparsec checkpoint"):
        checkpoint.load(tmp_path)
