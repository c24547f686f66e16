"""Each new method end to end on the small MLP through the public API (compile, the documented
loop, step, masks, finalize): the density asked is reached (soft_movement and l0 through their
controllers; with `control = "none"` it is an outcome of lambda), bit-exact resume of every stateful method, the clear errors of
the loop contract, and the specs/ files."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.errors import SpecError, TrainingError
from sparsec.spec import load_spec
from tests.helpers import mlp, mlp_input, spec_dict

SPECS = Path(__file__).resolve().parent.parent / "specs"
CUBIC = {"kind": "cubic", "total": 20, "warmup": 2, "cooldown": 4}
ITERATIVE = {"kind": "exponential", "total": 20, "warmup": 2, "cooldown": 4, "iterations": 4}
TOTAL = 128 + 256 + 64  # weights of fc1, fc2, fc3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=gen)
    return x, x[:, :4].sum(dim=1, keepdim=True).expand(16, 4) * 0.5


def mse(prog, x, y):
    return torch.nn.functional.mse_loss(prog(x), y)


def compile_(method: str, schedule=None, density=0.25, scope="global", seed=0, **options):
    if method in ("lm", "qm", "obd"):  # an MSE regression: no softmax for the Gauss-Newton curvature
        options.setdefault("curvature", "empirical_fisher")
    spec = spec_dict(["fc*"], method=method, density=density, scope=scope,
                     schedule=schedule or CUBIC, **options)
    return sparsec.compile(mlp(seed), spec, (mlp_input(),))


def optimizer(prog, score_lr=0.05):
    groups = [{"params": prog.model_parameters(), "lr": 1e-2}]
    if prog.score_parameters():
        groups.append({"params": prog.score_parameters(), "lr": score_lr})
    return torch.optim.Adam(groups)


def train(prog, opt, start: int, steps: int) -> None:
    """The documented loop: forward, loss + regularization, backward, optimizer.step(), the
    estimate when due, prog.step(), zero_grad."""
    prog.attach_optimizer(opt)
    prog.train()
    for step in range(start, start + steps):
        x, y = batch(step)
        torch.manual_seed(step)  # L0's noise depends only on the step
        loss = mse(prog, x, y) + prog.regularization()
        loss.backward()
        opt.step()
        if prog.estimate_due():
            examples = [(x[i:i + 1], y[i:i + 1]) for i in range(16)]
            prog.estimate_fisher(examples, lambda ex: mse(prog, *ex))
        prog.step()
        opt.zero_grad()


# ------------------------------------------------------------------------- densities reached
@pytest.mark.parametrize("method,schedule", [("pins", CUBIC), ("sensitivity", CUBIC), ("lm", ITERATIVE),
                                             ("qm", ITERATIVE), ("obd", ITERATIVE)])
def test_target_methods_reach_the_asked_density(method, schedule):
    prog = compile_(method, schedule)
    assert prog.density() == 1.0  # gradient-based: dense until gradients exist
    train(prog, optimizer(prog), 0, 20)
    kept = sum(int(m.sum()) for m in prog.masks().values())
    assert kept == round(0.25 * TOTAL)
    plain = prog.finalize()
    assert not any(name.endswith(("_ema", "_unc", "_saliency")) for name, _ in plain.named_buffers())
    prog.eval()
    torch.testing.assert_close(plain.eval()(mlp_input()), prog(mlp_input()))


def test_loss_modelling_only_prunes_at_iterations_and_never_regrows():
    prog = compile_("qm", ITERATIVE)
    opt = optimizer(prog)
    previous = {n: m.clone() for n, m in prog.masks().items()}
    densities = []
    for step in range(20):
        train(prog, opt, step, 1)
        densities.append(prog.density())
        for name, mask in prog.masks().items():
            assert bool((mask <= previous[name]).all()), "a pruned weight came back"
        previous = {n: m.clone() for n, m in prog.masks().items()}
    assert len(set(densities)) == 5  # dense + 4 iterations of the exponential schedule


@pytest.mark.parametrize("method,tolerance", [("soft_movement", 0.0), ("l0", 0.02)])
def test_controlled_methods_reach_the_asked_density(method, tolerance):
    """soft_movement's threshold and l0's Lagrangian drive the density to the schedule's."""
    schedule = {"kind": "cubic", "total": 50, "warmup": 5, "cooldown": 10}
    prog = compile_(method, schedule, density=0.25, **{"lambda": 0.0})
    assert prog.density() == 1.0
    train(prog, optimizer(prog, 0.2), 0, 60)
    assert abs(prog.density() - 0.25) <= tolerance + 1 / TOTAL
    assert abs(prog.group_density(0) - prog.target_density(0)) <= tolerance + 1 / TOTAL


@pytest.mark.parametrize("method,lam,steps,score_lr", [("soft_movement", 0.005, 60, 0.1), ("l0", 0.01, 60, 0.2)])
def test_without_control_the_density_is_an_outcome_of_lambda(method, lam, steps, score_lr):
    densities = {}
    for value in (0.0, lam):
        prog = compile_(method, {"kind": "constant"}, density=0.5, control="none", **{"lambda": value})
        assert prog.density() == 1.0  # scores start above the threshold
        train(prog, optimizer(prog, score_lr), 0, steps)
        densities[value] = prog.density()
    assert densities[lam] < densities[0.0] - 0.2  # the regularizer is what prunes
    assert 0.05 < densities[lam] < 0.5
    prog.eval()
    x = mlp_input()
    torch.testing.assert_close(prog.finalize().eval()(x), prog(x))


def test_l0_masks_report_the_deterministic_mask():
    from sparsec import ops

    prog = compile_("l0", {"kind": "constant"}, control="none", **{"lambda": 0.01})
    train(prog, optimizer(prog, 0.2), 0, 30)
    scores = prog.scores()["fc2.weight"].detach()
    torch.testing.assert_close(prog.masks()["fc2.weight"], ops.hard_concrete_eval(scores, -0.1, 1.1))
    assert "fc2.weight_gate" in dict(prog.module.named_modules())
    assert "fc2.weight_gate" not in dict(prog.finalize().named_modules())


@pytest.mark.parametrize("density", [0.1, 0.03])
def test_l0_shift_keeps_exactly_the_asked_share_before_the_scores_spread(density):
    """With control "shift" and log alphas that have not spread apart (all equal, as after a short
    run), the paper's test-time gate would close every gate (the shift puts every log alpha below
    logit(-l / (r - l))); the deterministic mask keeps exactly the asked share, whole."""
    prog = compile_("l0", {"kind": "constant"}, density=density, **{"lambda": 0.0})
    prog.step()
    kept = sum(int((m != 0).sum()) for m in prog.masks().values())
    assert kept == round(density * TOTAL)
    assert all(bool(((m == 0) | (m == 1)).all()) for m in prog.masks().values())
    assert prog.density() == pytest.approx(kept / TOTAL)


# ------------------------------------------------------------------------------- exact resume
def _snapshot(prog, opt):
    return {k: v.clone() for k, v in prog.state_dict().items()}, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("method,schedule", [("pins", CUBIC), ("sensitivity", CUBIC), ("qm", ITERATIVE),
                                             ("l0", {"kind": "constant"}),
                                             ("soft_movement", {"kind": "constant"})])
def test_exact_resume(method, schedule):
    options = {"lambda": 0.01} if method in ("l0", "soft_movement") else {}
    if method == "sensitivity":
        options["smoothing"] = "ema"
    straight = compile_(method, schedule, **options)
    opt = optimizer(straight)
    train(straight, opt, 0, 9)
    saved, saved_opt = _snapshot(straight, opt)
    train(straight, opt, 9, 9)
    resumed = compile_(method, schedule, seed=5, **options)  # other weights: all from the state
    opt2 = optimizer(resumed)
    resumed.load_state_dict(saved)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 9, 9)
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if method in ("pins", "sensitivity"):
        assert "module.fc1.weight_ema" in a and bool(a["module.fc1.weight_ema"].abs().sum() > 0)


# ------------------------------------------------------------------------------ loop contract
def test_gradient_methods_fail_clearly_without_a_gradient():
    prog = compile_("sensitivity")
    with pytest.raises(TrainingError, match="'fc1.weight'.*zero_grad"):
        prog.step()


def test_pins_needs_the_optimizer():
    prog = compile_("pins")
    opt = optimizer(prog)
    x, y = batch(0)
    mse(prog, x, y).backward()
    opt.step()
    with pytest.raises(TrainingError, match="attach_optimizer"):
        prog.step()
    prog.step(optimizer=opt)  # or pass it to step()


def test_loss_modelling_needs_a_fresh_estimate():
    prog = compile_("lm", {"kind": "one_shot", "warmup": 1})
    opt = optimizer(prog)
    x, y = batch(0)
    mse(prog, x, y).backward()
    opt.step()
    assert prog.estimate_due()
    with pytest.raises(TrainingError, match="estimate_fisher"):
        prog.step()


def test_spec_rules_for_the_new_methods():
    with pytest.raises(SpecError, match="prune\\[0\\].scope: 'local' is not supported by method 'soft_movement'"):
        load_spec(spec_dict(["*"], method="soft_movement", scope="local"))
    with pytest.raises(SpecError, match="'pins' ranks weights by gradients"):
        load_spec(spec_dict(["*"], method="pins", schedule={"kind": "constant"}))
    with pytest.raises(SpecError, match="train.eval_every"):
        load_spec({**spec_dict(["*"], method="magnitude"), "train": {"steps": 5}, "self_regularization": {}})


def test_every_spec_file_validates():
    names = {p.stem for p in SPECS.glob("*.toml")}
    assert {"soft_movement", "l0", "pins", "sensitivity", "lm", "qm", "obd"} <= names
    for path in SPECS.glob("*.toml"):
        spec = load_spec(path)
        assert spec.groups[0].method in sparsec.methods.names()


@pytest.mark.parametrize("method", ["pins", "sensitivity"])
def test_pins_framework_dense_gradients_and_zeroed_pruned_weights(method):
    """PINS Eq 1-2: every weight, pruned ones included, gets the gradient at the masked weights and
    the optimizer's update; `step()` then zeroes the pruned ones (theta <- theta_hat * M)."""
    prog = compile_(method)
    opt = optimizer(prog)
    train(prog, opt, 0, 12)  # past warm-up: some weights are pruned
    masks = prog.masks()
    assert any(bool((m == 0).any()) for m in masks.values())
    for name, weight in prog.weights().items():
        assert bool((weight[masks[name] == 0] == 0).all()), name
    x, y = batch(100)
    mse(prog, x, y).backward()
    pruned_grads = torch.cat([w.grad[masks[n] == 0] for n, w in prog.weights().items()])
    assert bool((pruned_grads != 0).any())  # dense gradient: pruned weights see it too
    opt.zero_grad()


def test_pins_scores_pruned_weights_by_their_update():
    """A weight pruned before a step (theta = 0) scores S = -g * dtheta_hat = eta g^2 under plain
    SGD (PINS Eq 11), so it can win its place back; with masked gradients it would score 0."""
    prog = compile_("pins", density=0.5, smoothing="none")
    opt = torch.optim.SGD(prog.model_parameters(), lr=0.05)
    train(prog, opt, 0, 12)
    pruned_before = {n: m == 0 for n, m in prog.masks().items()}
    x, y = batch(12)
    mse(prog, x, y).backward()
    grads = {n: w.grad.clone() for n, w in prog.weights().items()}
    opt.step()
    prog.step()
    opt.zero_grad()
    method = prog.method(0)
    for name, was_pruned in pruned_before.items():
        score = method.importance(prog.state_of(name))[was_pruned]
        expected = 0.05 * grads[name][was_pruned] ** 2
        torch.testing.assert_close(score, expected, atol=1e-7, rtol=1e-3)
        assert bool((expected > 0).any()), name
