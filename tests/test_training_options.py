"""The recipe knobs of [train]: learning-rate schedules (against transformers' own), separately for
weights and scores; bf16 autocast against fp32; frozen parameters; gradient accumulation counting
optimizer steps; gradients left over from build_model(); the device key; train.jsonl."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import sparsec
from sparsec.errors import SpecError, TrainingError
from sparsec.spec import TrainSpec, load_spec
from sparsec.training import lr
from sparsec.training.backend import resolve_device
from sparsec.training.loop import fine_prune
from sparsec.training.optim import make_optimizer
from tests.test_train import MLP, blobs, model_file

STEPS = 20


def spec(method: str = "movement", **train) -> dict:
    return {"prune": [{"targets": ["fc*"], "method": method, "density": 0.25, "scope": "global"}],
            "schedule": {"kind": "cubic", "total": STEPS, "warmup": 2, "cooldown": 4},
            "train": {"steps": STEPS, "batch_size": 16, "lr": 1e-2, **train}}


def data_file(model: nn.Module | None = None):
    x, y = blobs()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    torch.manual_seed(0)
    return model_file(model or MLP(), (x[:2],), train_data=lambda: batches, eval_data=lambda: batches)


def run(spec_dict: dict, mf=None):
    mf = mf or data_file()
    loaded = load_spec(spec_dict)
    prog = sparsec.compile(mf.model, loaded, mf.example_inputs)
    return prog, fine_prune(prog, mf, loaded.train, progress=False)


# ------------------------------------------------------------------------------ learning rates
@pytest.mark.parametrize("kind,hf", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                     ("cosine", "cosine")])
def test_lr_factors_are_transformers_schedules(kind, hf):
    transformers = pytest.importorskip("transformers")
    warmup, total = 10, 100
    ours = lr.LrFactor(kind, warmup, total)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = transformers.get_scheduler(hf, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 1):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), step
    # warm-up, middle, end
    assert ours(0) == 0.0 and ours(5) == 0.5 and ours(10) == 1.0
    assert ours(55) == {"constant": 1.0, "linear": 0.5, "cosine": pytest.approx(0.5)}[kind]
    assert ours(100) == (1.0 if kind == "constant" else 0.0)


def test_weights_and_scores_follow_their_own_schedules():
    prog, result = run(spec(lr_schedule="linear", warmup_steps=4, score_lr_schedule="cosine",
                            score_warmup_steps=0, score_lr=0.1))
    weights = [r[0] for r in result.lrs]
    scores = [r[1] for r in result.lrs]
    assert weights[:5] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])
    assert weights[-1] == pytest.approx(0.01 * (STEPS - (STEPS - 1)) / (STEPS - 4))
    assert scores[0] == pytest.approx(0.1)
    assert scores[STEPS // 2] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_constant_schedule_keeps_the_rates():
    _, result = run(spec(score_lr=0.05))
    assert all(r == [0.01, 0.05] for r in result.lrs)


# ------------------------------------------------------------------------------- precision
def test_bf16_autocast_on_cpu_matches_fp32():
    prog32, fp32 = run(spec())
    prog16, bf16 = run(spec(precision="bf16"))
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=2e-2)
    assert bf16.losses[-1] == pytest.approx(fp32.losses[-1], rel=0.2, abs=0.05)
    for prog in (prog32, prog16):
        masks = prog.masks()
        assert all(m.dtype == torch.float32 for m in masks.values())
        assert all(s.dtype == torch.float32 for s in prog.scores().values())
        assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * sum(m.numel() for m in masks.values()))


def test_fp16_has_a_grad_scaler_or_says_it_needs_a_gpu():
    try:
        _, result = run(spec(precision="fp16"))
    except TrainingError as exc:
        assert "needs a GPU here" in str(exc)
    else:
        assert all(math.isfinite(v) for v in result.losses)


# ----------------------------------------------------------------------- freeze, accumulate
def test_frozen_parameters_do_not_change_and_are_released_after():
    mf = data_file()
    before = {k: v.clone() for k, v in mf.model.state_dict().items()}
    prog, _ = run(spec(freeze=["fc1.*"]), mf)
    after = prog.module.state_dict()
    assert torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])  # the mask is applied in forward
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert all(p.requires_grad for p in prog.parameters())
    with pytest.raises(SpecError, match=r"train.freeze\[0\]: '\*embed\*' matches no parameter"):
        run(spec(freeze=["*embed*"]))


def test_accumulation_counts_optimizer_steps_and_matches_a_larger_batch():
    x, y = blobs()
    big = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    small = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]

    def file(batches):
        torch.manual_seed(0)
        return model_file(MLP(), (x[:2],), train_data=lambda: batches)

    prog_a, a = run(spec("magnitude", batch_size=16), file(big))
    prog_b, b = run(spec("magnitude", batch_size=8, accumulate=2), file(small))
    assert a.steps == b.steps == STEPS and int(prog_b.step_count) == STEPS and len(b.lrs) == STEPS
    assert b.losses == pytest.approx(a.losses, rel=1e-5)
    for name, weight in prog_a.weights().items():
        torch.testing.assert_close(prog_b.weights()[name], weight, rtol=1e-4, atol=1e-5)


def test_gradients_left_by_build_model_do_not_reach_step_one():
    def dirty():
        torch.manual_seed(0)
        model = MLP()
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e3)
        return model

    torch.manual_seed(0)
    _, clean = run(spec("pins"), data_file(MLP()))
    _, leftover = run(spec("pins"), data_file(dirty()))
    assert leftover.losses == clean.losses and leftover.densities == clean.densities


def test_make_optimizer_leaves_frozen_parameters_out():
    prog = sparsec.compile(MLP(), spec(), (torch.randn(2, 8),))
    prog.module.fc1.weight.requires_grad_(False)
    optimizer = make_optimizer(prog, TrainSpec(steps=1))
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(prog.module.fc1.weight) not in ids and id(prog.module.fc2.weight) in ids


# ------------------------------------------------------------------------------- device, log
def test_device_auto_is_the_cpu_here_and_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TrainingError, match="train.device = 'cuda', but CUDA is not available"):
        resolve_device("cuda")


def test_cli_writes_train_jsonl_and_says_when_tensorboard_is_missing(tmp_path, sparsec_cli, models_dir):
    out = tmp_path / "out"
    code, _, err = sparsec_cli("compile", models_dir / "tiny_mlp.py", "--spec", models_dir / "tiny.toml",
                               "-o", out, "--no-progress", "--set", "train.tensorboard=true")
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 25))
    assert set(lines[0]) == {"step", "loss", "density", "lr", "metric"}
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "torch.utils.tensorboard cannot be imported" in err
    else:
        assert any((out / "tensorboard").iterdir())
