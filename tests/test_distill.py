"""Distillation from the dense teacher (movement pruning section 6) and PINS self-regularization
(Eq 13, Algorithm 1): the teacher, the loss helper by hand, and both in the fine-pruning loop
together with the loss-modelling estimates and the Delta-L report."""
from __future__ import annotations

from pathlib import Path

import torch

import sparsec
from sparsec import modelfile
from sparsec.training.distill import SelfRegularizer, distillation_kl
from sparsec.report import build_report, format_report
from sparsec.spec import load_spec
from sparsec.training.loop import fine_prune
from tests.helpers import mlp, mlp_input, spec_dict

MODELS = Path(__file__).resolve().parent / "models"


def test_teacher_is_the_frozen_dense_model_and_the_loss_is_alpha_t2_kl():
    model = mlp(0)
    x = mlp_input(4)
    with torch.no_grad():
        dense = model(x)
    spec = {**spec_dict(["fc*"], method="magnitude", density=0.3), "distill": {"alpha": 0.7, "temperature": 3.0}}
    prog = sparsec.compile(model, spec, (mlp_input(),))
    assert prog.density() < 0.5 and abs(prog.task_loss_weight - 0.3) < 1e-12
    out = prog(x)
    loss = prog.distillation_loss(out, x)
    torch.testing.assert_close(loss, 0.7 * distillation_kl(out, dense, 3.0))
    loss.backward()  # gradients reach the student only
    assert model.fc1.weight.grad is not None
    teacher = prog._teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    torch.testing.assert_close(teacher(x), dense)
    assert not any(k.startswith("_teacher") for k in prog.state_dict())
    assert {id(p) for p in teacher.parameters()}.isdisjoint({id(p) for p in prog.parameters()})
    plain = sparsec.compile(mlp(0), spec_dict(["fc*"], method="magnitude"), (mlp_input(),))
    assert float(plain.distillation_loss(plain(x), x)) == 0.0 and plain.task_loss_weight == 1.0


def test_self_regularizer_refreshes_on_improvement():
    prog = sparsec.compile(mlp(0), spec_dict(["fc*"], method="magnitude", density=0.5), (mlp_input(),))
    sr = SelfRegularizer(prog, lam=2.0)
    x = mlp_input(4)
    first = sr.checkpoint
    assert float(sr.loss(prog(x), x).detach()) == 0.0  # the checkpoint is the current model
    with torch.no_grad():
        prog.weights()["fc1.weight"].add_(0.5)
    out = prog(x)
    torch.testing.assert_close(sr.loss(out, x), 2.0 * distillation_kl(out, first(x), 1.0))
    assert sr.update(prog, 0.5) and sr.checkpoint is not first
    assert not sr.update(prog, 0.4) and sr.update(prog, 0.6) and sr.refreshes == 2


def _run(spec: dict):
    mf = modelfile.load(MODELS / "tiny_mlp.py")
    loaded = load_spec(spec)
    prog = sparsec.compile(mf.model, loaded, mf.example_inputs)
    result = fine_prune(prog, mf, loaded.train, progress=False)
    return prog, result, loaded


def test_fine_prune_with_pins_distillation_and_self_regularization():
    spec = {"prune": [{"targets": ["fc*"], "method": "pins", "density": 0.3, "scope": "global"}],
            "schedule": {"kind": "cubic", "total": 16, "warmup": 2, "cooldown": 4},
            "train": {"steps": 16, "batch_size": 16, "lr": 1e-2, "eval_every": 4},
            "distill": {"alpha": 0.5, "temperature": 2.0},
            "self_regularization": {"lambda": 1.0}}
    prog, result, _ = _run(spec)
    total = sum(m.numel() for m in prog.masks().values())
    assert sum(int(m.sum()) for m in prog.masks().values()) == round(0.3 * total)
    assert result.checkpoint_refreshes >= 1
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fine_prune_loss_modelling_reports_delta_l():
    spec = {"prune": [{"targets": ["fc*"], "method": "qm", "density": 0.2, "scope": "global",
                       "fisher_examples": 24, "fisher_chunk": 4}],
            "schedule": {"kind": "exponential", "total": 12, "warmup": 2, "cooldown": 2, "iterations": 4},
            "train": {"steps": 12, "batch_size": 16, "lr": 1e-2}}
    prog, result, loaded = _run(spec)
    assert [it["step"] for it in result.pruning_iterations] == [2, 4, 6, 8]
    densities = [it["density"] for it in result.pruning_iterations]
    assert densities == sorted(densities, reverse=True) and abs(densities[-1] - 0.2) < 0.01
    assert all(it["delta_loss"] == abs(it["loss_after"] - it["loss_before"]) for it in result.pruning_iterations)
    report = build_report(model_path="tiny_mlp.py", spec=loaded, capture_tool="export", sites=prog.sites,
                          left_out={}, prog=prog, result=result)
    assert len(report["pruning_iterations"]) == 4
    assert "Delta-L" in format_report(report)
