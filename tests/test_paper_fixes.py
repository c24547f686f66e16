"""The fixes of issue 11 ("the papers, exactly"), each against a computation by hand or the
reference formula on small tensors: the Gauss-Newton curvature of loss modelling (Eq 8), Algorithm 1
with all pi iterations inside one step and Delta-L of the whole prune (Table 1)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jacrev, vmap
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sparsec
from sparsec import curvature, estimation, modelfile, schedules
from sparsec.errors import SpecError, TrainingError
from sparsec.report import build_report, format_report
from sparsec.spec import load_spec
from sparsec.training.losses import objective as objective_of
from sparsec.training.loop import fine_prune
from tests.helpers import spec_dict

MODELS = Path(__file__).resolve().parent / "models"


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))


def _reference_ggn(model: torch.nn.Module, xs: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean_i sum_j p_ij (d log p_ij / d W)^2 from per-example Jacobians of log_softmax (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_probs(p, x):
        return torch.log_softmax(functional_call(model, p, (x[None],))[0], -1)

    jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, xs)            # name -> [B, C, *shape]
    probs = torch.softmax(model(xs), -1).detach()                           # [B, C]
    return {k: (probs.reshape(*probs.shape, *[1] * (j.dim() - 2)) * j * j).sum(1).mean(0)
            for k, j in jac.items()}


def test_ggn_diagonal_matches_per_example_jacobians():
    model = _mlp()
    xs = torch.randn(6, 5)
    weights = [model[0].weight, model[2].weight]
    ref = _reference_ggn(model, xs)
    # one example per item (averaged over items) and one item of all six: the same exact value
    per_example = [torch.zeros_like(w) for w in weights]
    for i in range(6):
        for acc, d in zip(per_example, curvature.ggn_diagonal(model(xs[i:i + 1]), torch.zeros(1, dtype=torch.long), weights)):
            acc += d / 6
    whole = curvature.ggn_diagonal(model(xs), torch.zeros(6, dtype=torch.long), weights)
    for got in (per_example, whole):
        torch.testing.assert_close(got[0], ref["0.weight"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1], ref["2.weight"], rtol=1e-5, atol=1e-7)
    # ignored rows (-100) do not count; the labels themselves do not matter (model's own p)
    target = torch.tensor([3, -100, 1, -100, 0, 2])
    masked = curvature.ggn_diagonal(model(xs), target, weights)
    keep = _reference_ggn(model, xs[target != -100])
    torch.testing.assert_close(masked[1], keep["2.weight"], rtol=1e-5, atol=1e-7)


def test_ggn_mc_is_unbiased_and_empirical_fisher_is_different():
    model = _mlp(1)
    xs = torch.randn(3, 5)
    w = [model[2].weight]
    ref = _reference_ggn(model, xs)["2.weight"]
    gen = torch.Generator().manual_seed(0)
    draws = 1000
    mean = sum(curvature.ggn_mc_diagonal(model(xs), torch.zeros(3, dtype=torch.long), w, gen)[0]
               for _ in range(draws)) / draws
    # the relative error of the Monte Carlo mean shrinks like 1/sqrt(draws)
    assert float((mean - ref).abs().sum() / ref.abs().sum()) < 0.08
    # squared gradient of the true labels: another quantity
    y = torch.tensor([0, 1, 2])
    ef = sum(torch.autograd.grad(torch.nn.functional.cross_entropy(model(xs[i:i + 1]), y[i:i + 1]), w)[0] ** 2
             for i in range(3)) / 3
    assert float((ef - ref).abs().sum() / ref.abs().sum()) > 0.3


def test_estimate_fisher_uses_the_ggn_by_default_in_the_qm_saliency():
    model = _mlp(2)
    xs, ys = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    spec = spec_dict(["*"], method="qm", density=0.5, schedule={"kind": "one_shot", "warmup": 1})
    prog = sparsec.compile(model, spec, (torch.randn(1, 5),))
    assert prog.method(0).opts["curvature"] == "ggn"

    def loss_of(i):
        return torch.nn.functional.cross_entropy(prog(xs[i:i + 1]), ys[i:i + 1])

    with pytest.raises(TrainingError, match="logits_fn"):
        prog.estimate_fisher(range(4), loss_of)
    prog.estimate_fisher(range(4), loss_of, logits_fn=lambda i: (prog(xs[i:i + 1]), ys[i:i + 1]))
    ref = _reference_ggn(model, xs)
    w = model[0].weight.detach()
    g = sum(torch.autograd.grad(loss_of(i), model[0].weight)[0] for i in range(4)) / 4
    expected = (-g * w + 0.5 * ref["0.weight"] * w * w).abs()
    assert prog.sites[0].shape == tuple(w.shape)
    torch.testing.assert_close(prog.state_of(prog.sites[0].name).buffers["saliency"], expected,
                               rtol=1e-5, atol=1e-8)


def test_ggn_needs_a_cross_entropy_objective():
    spec = spec_dict(["*"], method="qm", density=0.5, schedule={"kind": "one_shot", "warmup": 1})
    prog = sparsec.compile(_mlp(), spec, (torch.randn(1, 5),))
    own = objective_of(None)
    estimation.check(prog, own)  # the default cross-entropy: fine
    user = type(own)(loss=own.loss, metric=own.metric, description="loss(outputs, batch) of model.py")
    with pytest.raises(TrainingError, match=r"prune\[0\].curvature = 'ggn'.*empirical_fisher"):
        estimation.check(prog, user)
    # lm reads only g: no curvature, so any loss will do
    lm = sparsec.compile(_mlp(), {**spec, "prune": [{**spec["prune"][0], "method": "lm"}]}, (torch.randn(1, 5),))
    assert estimation.curvature_of(lm, 0) == "none"
    estimation.check(lm, user)


# ------------------------------------------------------------------ Algorithm 1 inside one step
def test_at_once_schedule_and_its_spec_rules():
    p = schedules.ScheduleParams(final=0.01, warmup=3, iterations=4, at_once=True, total=50, cooldown=5)
    assert [schedules.pruning_iteration(t, p) for t in (0, 2, 3, 40)] == [0, 0, 4, 4]
    assert schedules.density_at("exponential", 3, p) == 0.01
    assert [round(schedules.density_after_iteration("exponential", i, p), 6) for i in range(5)] == \
        [1.0, round(0.01 ** 0.25, 6), 0.1, round(0.01 ** 0.75, 6), 0.01]
    assert schedules.density_after_iteration("linear", 2, p) == pytest.approx(1 - 2 * 0.99 / 4)
    with pytest.raises(SpecError, match="schedule.at_once: true needs kind 'linear' or 'exponential'"):
        load_spec(spec_dict(["*"], method="lm", schedule={"kind": "one_shot", "warmup": 1, "at_once": True}))
    load_spec(spec_dict(["*"], method="lm", schedule={"kind": "linear", "warmup": 1, "at_once": True,
                                                       "iterations": 5}))


def _run(spec: dict):
    mf = modelfile.load(MODELS / "tiny_mlp.py")
    loaded = load_spec(spec)
    prog = sparsec.compile(mf.model, loaded, mf.example_inputs)
    return prog, fine_prune(prog, mf, loaded.train, progress=False), loaded


@pytest.mark.parametrize("curv", ["ggn", "ggn_mc"])
def test_fine_prune_at_once_runs_pi_iterations_in_one_step_and_reports_the_whole_delta_l(curv):
    pi = 5
    spec = {"prune": [{"targets": ["fc*"], "method": "qm", "density": 0.1, "scope": "global",
                       "fisher_examples": 8, "fisher_chunk": 4, "curvature": curv}],
            "schedule": {"kind": "exponential", "warmup": 3, "iterations": pi, "at_once": True},
            "train": {"steps": 6, "batch_size": 16, "lr": 1e-2}}
    prog, result, loaded = _run(spec)
    its = result.pruning_iterations
    assert [it["iteration"] for it in its] == list(range(1, pi + 1)) and {it["step"] for it in its} == {3}
    total = sum(m.numel() for m in prog.masks().values())
    expected = [schedules.density_after_iteration("exponential", i, loaded.schedule.params(0.1))
                for i in range(1, pi + 1)]
    assert [it["density"] for it in its] == pytest.approx(expected, abs=1.5 / total)
    # the density reached at step 3 stays (fine-tuning afterwards prunes nothing more)
    assert result.densities[2:] == pytest.approx([its[-1]["density"]] * 4)
    assert len(result.prunes) == 1
    whole = result.prunes[0]
    assert whole["iterations"] == pi and whole["density_before"] == 1.0 and whole["step"] == 3
    assert whole["loss_before"] == its[0]["loss_before"]   # measured on the first iteration's examples
    assert whole["delta_loss"] == abs(whole["loss_after"] - whole["loss_before"])
    report = build_report(model_path="tiny_mlp.py", spec=loaded, capture_tool="export", sites=prog.sites,
                          left_out={}, prog=prog, result=result)
    assert report["prunes"] == result.prunes and "whole prune" in format_report(report)


def test_at_once_without_the_intermediate_iterations_is_an_error():
    spec = spec_dict(["*"], method="lm", density=0.1, curvature="empirical_fisher",
                     schedule={"kind": "linear", "warmup": 1, "iterations": 3, "at_once": True})
    model = _mlp()
    prog = sparsec.compile(model, spec, (torch.randn(1, 5),))
    xs, ys = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(prog(xs), ys).backward()
    prog.estimate_fisher(range(4), lambda i: torch.nn.functional.cross_entropy(prog(xs[i:i + 1]), ys[i:i + 1]))
    with pytest.raises(TrainingError, match="0 of the first 2 were done"):
        prog.step()


# ------------------------------------------------------------------------ sensitivity (PINS Eq 5)
def test_sensitivity_reads_the_weight_before_the_update():
    model = _mlp(3)
    spec = spec_dict(["*"], method="sensitivity", density=0.5,
                     schedule={"kind": "cubic", "total": 10, "warmup": 2, "cooldown": 2})
    prog = sparsec.compile(model, spec, (torch.randn(1, 5),))
    opt = torch.optim.SGD(prog.parameters(), lr=0.5)
    xs, ys = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(prog(xs), ys).backward()
    before = model[0].weight.detach().clone()
    grad = model[0].weight.grad.clone()
    opt.step()
    assert not torch.equal(before, model[0].weight.detach())
    with pytest.raises(TrainingError, match=r"theta\^\(t\)"):
        prog.step()   # no optimizer attached: theta^(t) cannot be known
    prog.step(optimizer=opt)
    # smoothing "none": the buffer holds |g theta^(t)| of this step, not |g theta^(t+1)|
    torch.testing.assert_close(prog.state_of(prog.sites[0].name).buffers["ema"], (grad * before).abs())


@pytest.mark.parametrize("method, options", [("pins", {}), ("sensitivity", {}),
                                             ("dynsparse", {"lambda": 0.5, "block": [2, 2]})])
def test_the_update_is_read_with_the_learning_rate_it_was_made_with(method, options, monkeypatch):
    """Under a warm-up schedule the learning rate changes at every step: the methods that read the
    optimizer's last update (PINS' dtheta, sensitivity's theta^(t), the decoupled group lasso) must
    see the rate of that update, not the next step's (the scheduler steps after prog.step())."""
    from sparsec.methods import dynsparse, pins, sensitivity

    before: dict[int, torch.Tensor] = {}
    checked: list[float] = []
    original = pins.applied_update

    def snapshot(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                before[id(p)] = p.detach().clone()

    def checking(optimizer, group, param, grad):
        update, start = original(optimizer, group, param, grad)
        expected, seen = before[id(param)], start
        if method == "dynsparse":   # blocks re-allocated at this step were zeroed with their moments
            survived = (expected != 0) & (start != 0)
            assert survived.float().mean() > 0.2
            seen, expected = start[survived], expected[survived]
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)
        checked.append(float(group["lr"]))
        return update, start

    for module in (pins, sensitivity, dynsparse):
        monkeypatch.setattr(module, "applied_update", checking)
    handle = register_optimizer_step_pre_hook(snapshot)
    try:
        group = {"targets": ["fc*"], "method": method, "density": 0.5, "scope": "local", **options}
        schedule = ({"kind": "constant", "every": 1, "total": 6} if method == "dynsparse"
                    else {"kind": "cubic", "total": 6, "warmup": 1, "cooldown": 1})
        _run({"prune": [group], "schedule": schedule,
              "train": {"steps": 6, "batch_size": 8, "lr": 1e-2, "optimizer": "adamw",
                        "weight_decay": 0.1, "lr_schedule": "linear", "warmup_steps": 3}})
    finally:
        handle.remove()
    assert checked and checked[0] == 0.0 and max(checked) > 0   # warm-up from 0: rates did change


# ------------------------------------------------- movement pruning recipe in the shipped specs
SPECS = Path(__file__).resolve().parent.parent / "specs"


@pytest.mark.parametrize("name", ["movement", "soft_movement", "l0", "movement_distill", "magnitude"])
def test_movement_specs_freeze_the_embeddings_and_warm_up_then_decay(name):
    """Movement pruning section 5: the embeddings are frozen; the learning rate warms up linearly
    and decays linearly. The freeze glob takes exactly the embeddings of a Hugging Face BERT task
    model (and of a bare BertModel), and the sites the spec prunes are encoder linears."""
    from fnmatch import fnmatchcase

    from transformers import BertConfig, BertForSequenceClassification

    spec = load_spec(SPECS / f"{name}.toml")
    assert spec.train.freeze == ("*embeddings*",)
    assert spec.train.lr_schedule == "linear" and 0 < spec.train.warmup_steps < spec.train.steps
    assert spec.train.score_lr_schedule == "linear"
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    for prefix, model in (("bert.", BertForSequenceClassification(config)),
                          ("", BertForSequenceClassification(config).bert)):
        names = [n for n, _ in model.named_parameters()]
        frozen = {n for n in names if fnmatchcase(n, spec.train.freeze[0])}
        assert frozen == {n for n in names if n.startswith(prefix + "embeddings.")} and frozen
        assert not any(fnmatchcase(n, spec.groups[0].targets[0]) for n in frozen)


# ------------------------------------------------------------------ the distillation teacher
TEACHER_MODEL = '''
import torch
import sys
sys.path.insert(0, {models!r})
from tiny_mlp import *  # noqa: F401,F403  (build_model, example_inputs, train_data, eval_data)
from tiny_mlp import Tiny


def teacher():
    torch.manual_seed(7)
    return Tiny()
'''


def _teacher_case(tmp_path, with_teacher_fn: bool) -> Path:
    text = TEACHER_MODEL.format(models=str(MODELS))
    if not with_teacher_fn:
        text = text.split("def teacher")[0]
    path = tmp_path / "model.py"
    path.write_text(text)
    return path


def test_teacher_from_model_py_and_from_saved_weights(tmp_path):
    from safetensors.torch import save_file

    from sparsec.errors import ModelFileError, UserError
    from sparsec.training.teacher import load_teacher

    mf = modelfile.load(_teacher_case(tmp_path, True))
    x = torch.randn(5, 8)
    torch.manual_seed(7)
    expected = mf.module.Tiny()(x)
    torch.testing.assert_close(load_teacher("model", mf)(x), expected)
    assert load_teacher("dense", mf) is None
    # a folder of weights (a separately fine-tuned model), relative to the spec file
    tuned = mf.module.Tiny()
    with torch.no_grad():
        tuned.head.weight.mul_(3.0)
    (tmp_path / "tuned").mkdir()
    save_file(tuned.state_dict(), str(tmp_path / "tuned" / "model.safetensors"))
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text("")
    loaded = load_teacher("tuned", mf, str(spec_file))
    torch.testing.assert_close(loaded(x), tuned(x))
    # the errors: no teacher(), no folder, other tensors
    (tmp_path / "plain").mkdir()
    plain = modelfile.load(_teacher_case(tmp_path / "plain", False))
    with pytest.raises(ModelFileError, match="teacher\\(\\) function"):
        load_teacher("model", plain)
    with pytest.raises(UserError, match="does not exist"):
        load_teacher("nowhere", mf, str(spec_file))
    save_file({"fc1.weight": torch.zeros(3, 3)}, str(tmp_path / "tuned" / "model.safetensors"))
    with pytest.raises(UserError, match="lacks tensors"):
        load_teacher("tuned", mf, str(spec_file))


def test_program_distils_from_the_teacher_it_is_given():
    from sparsec.training.distill import distillation_kl

    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    spec = {**spec_dict(["*"], method="magnitude", density=0.5), "distill": {"alpha": 0.6, "temperature": 2.0}}
    prog = sparsec.compile(model, spec, (torch.randn(1, 5),))
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Dropout(0.5))
    prog.set_teacher(teacher)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert not any("_teacher" in k for k in prog.state_dict())
    x = torch.randn(3, 5)
    out = prog(x)
    torch.testing.assert_close(prog.distillation_loss(out, x), 0.6 * distillation_kl(out, teacher(x), 2.0))
    plain = sparsec.compile(torch.nn.Sequential(torch.nn.Linear(5, 4)), spec_dict(["*"], method="magnitude"),
                            (torch.randn(1, 5),))
    with pytest.raises(SpecError, match="distill"):
        plain.set_teacher(teacher)


def test_compile_uses_the_spec_teacher(tmp_path, sparsec_cli):
    from safetensors.torch import save_file

    model = _teacher_case(tmp_path, True)
    spec = (MODELS / "tiny.toml").read_text().replace("steps = 24", "steps = 4").replace("total = 24", "total = 4") \
        .replace("cooldown = 6", "cooldown = 1")
    (tmp_path / "weights").mkdir()
    save_file(modelfile.load(model).module.teacher().state_dict(), str(tmp_path / "weights" / "model.safetensors"))
    losses = {}
    for teacher in ("dense", "model", "weights"):
        path = tmp_path / f"{teacher}.toml"
        path.write_text(spec + f'\n[distill]\nalpha = 0.5\nteacher = "{teacher}"\n')
        code, out, err = sparsec_cli("compile", model, "--spec", path, "-o", tmp_path / f"out_{teacher}",
                                     "--no-progress", "--stop-after", "train")
        assert code == 0, err
        report = json.loads((tmp_path / f"out_{teacher}" / "report.json").read_text())
        losses[teacher] = report["final_loss"]
    # the same seeds: only the teacher differs ("model" and "weights" hold the same Tiny(seed 7))
    assert losses["model"] == pytest.approx(losses["weights"]) and losses["model"] != losses["dense"]
    path = tmp_path / "bad.toml"
    path.write_text(spec + '\n[distill]\nteacher = "missing_folder"\n')
    code, out, err = sparsec_cli("compile", model, "--spec", path, "-o", tmp_path / "out_bad", "--no-progress")
    assert code == 2 and "missing_folder" in err and "Traceback" not in err
