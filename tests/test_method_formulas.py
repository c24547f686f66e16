"""Every formula of the new methods against a hand computation on small tensors: soft movement
(threshold mask, lambda * sum sigmoid(S)), L0 (hard-concrete sample, test-time mask, penalty,
score gradient of Eq 3), PINS Eq 11 and the optimizer update it reads, sensitivity (PINS Eq 5),
PLATON smoothing, the LM / QM / OBD saliencies with the step-size penalty, the diagonal empirical
Fisher estimate, and the distillation KL."""
from __future__ import annotations

import math

import pytest
import torch

from sparsec import ops
from sparsec.methods import get, smoothing
from sparsec.methods.l0 import L0
from sparsec.methods.pins import Pins, applied_update
from sparsec.methods.sensitivity import Sensitivity
from sparsec.methods.soft_movement import SoftMovement
from sparsec.site import Site, SiteState
from sparsec.training.distill import distillation_kl

S = torch.tensor([[-1.0, 0.5], [2.0, 0.0]])


# ------------------------------------------------------------------------------- soft movement
def test_soft_movement_threshold_and_penalty():
    assert SoftMovement.threshold_mask(S, 0.25).tolist() == [[False, True], [True, False]]
    lam = 0.3
    hand = lam * sum(1 / (1 + math.exp(-v)) for v in (-1.0, 0.5, 2.0, 0.0))
    got = SoftMovement.penalty([S, torch.tensor([[1.0]])], lam)
    assert math.isclose(float(got), hand + lam / (1 + math.exp(-1.0)), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ L0
def test_hard_concrete_sample_and_eval_mask_by_hand():
    b, l, r = 2 / 3, -0.1, 1.1
    u = torch.tensor([[0.2, 0.9], [0.5, 0.01]])
    got = ops.hard_concrete_sample(S, u, b, l, r)
    for (i, j), s in zip([(0, 0), (0, 1), (1, 0), (1, 1)], S.flatten().tolist()):
        uu = float(u[i, j])
        s_bar = 1 / (1 + math.exp(-(math.log(uu) - math.log(1 - uu) + s) / b))
        assert math.isclose(float(got[i, j]), min(1.0, max(0.0, (r - l) * s_bar + l)), abs_tol=1e-6)
    det = ops.hard_concrete_eval(S, l, r)
    hand = [min(1.0, max(0.0, (r - l) / (1 + math.exp(-s)) + l)) for s in S.flatten().tolist()]
    assert torch.allclose(det.flatten(), torch.tensor(hand), atol=1e-6)


def test_l0_penalty_uses_the_corrected_expected_l0():
    b, l, r, lam = 2 / 3, -0.1, 1.1, 0.5
    got = L0.penalty([S], lam, b, l, r)
    hand = lam * sum(1 / (1 + math.exp(-(s - b * math.log(-l / r)))) for s in S.flatten().tolist())
    assert math.isclose(float(got), hand, rel_tol=1e-6)


def test_l0_shift_puts_the_expected_density_on_target():
    """d(S + c) = sum_b |b| sigmoid(S_b + c - b log(-l/r)) / sum_b |b| (Louizos et al. Eq 12), with
    partial edge blocks weighted by their size; the shift c solves d(S + c) = t."""
    method = L0({"beta": 2 / 3, "l": -0.1, "r": 1.1})
    site = Site("w", (3, 5), "linear", block=(2, 2))                  # blocks of 4, 2, 2 and 1 weights
    scores = torch.tensor([[0.5, -1.0, 2.0], [1.5, -3.0, 0.0]])
    state = SiteState(site, torch.nn.Parameter(torch.zeros(3, 5)), torch.ones(3, 5), torch.nn.Parameter(scores))
    sizes = torch.tensor([[4.0, 4.0, 2.0], [2.0, 2.0, 1.0]])
    shift = (2 / 3) * math.log(0.1 / 1.1)                             # -b log(-l/r) = +1.599
    by_hand = float((torch.sigmoid(scores - shift) * sizes).sum() / 15)
    assert float(method.expected_density([state])) == pytest.approx(by_hand, rel=1e-6)
    c = method.density_shift([state], 0.3)
    assert float(method.expected_density([state], c)) == pytest.approx(0.3, abs=1e-7)
    assert float((torch.sigmoid(scores + c - shift) * sizes).sum() / 15) == pytest.approx(0.3, abs=1e-7)


def test_l0_score_gradient_is_eq3():
    """dL/dS = dL/dW_eff * W * (r - l)/b * S_bar (1 - S_bar) * 1{0 <= Z <= 1} (movement pruning Eq 3),
    also checked by finite differences."""
    b, l, r = 2 / 3, -0.1, 1.1
    torch.manual_seed(0)
    weight = torch.randn(2, 2, dtype=torch.float64)
    scores = torch.tensor([[-0.3, 0.4], [1.0, 5.0]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[0.3, 0.6], [0.45, 0.9]], dtype=torch.float64)
    upstream = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)

    def loss(s):
        return (weight * ops.hard_concrete_sample(s, u, b, l, r) * upstream).sum()

    loss(scores).backward()
    s_bar = torch.sigmoid((torch.log(u) - torch.log1p(-u) + scores.detach()) / b)
    z = (r - l) * s_bar + l
    eq3 = upstream * weight * (r - l) / b * s_bar * (1 - s_bar) * ((z >= 0) & (z <= 1))
    torch.testing.assert_close(scores.grad, eq3)
    assert float(eq3[1, 1]) == 0.0  # Z > 1 there: the gate is saturated, no gradient
    assert torch.autograd.gradcheck(loss, (scores.detach().clone().requires_grad_(),))


def test_hard_concrete_module_train_and_eval():
    gate = ops.HardConcreteMask(2 / 3, -0.1, 1.1, (1, 2))
    weight = torch.ones(2, 4)
    mask = torch.full((2, 4), 0.5)
    scores = torch.zeros(2, 2)
    gate.eval()
    assert torch.equal(gate(weight, mask, scores), weight * mask)  # eval: the mask buffer
    gate.train()
    torch.manual_seed(3)
    first = gate(weight, mask, scores)
    torch.manual_seed(3)
    assert torch.equal(first, gate(weight, mask, scores))  # torch's RNG: reproducible when seeded
    assert not torch.equal(first, gate(weight, mask, scores))  # a fresh draw in every forward
    assert torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 2], first[:, 3])  # per block


# -------------------------------------------------------------------------------- PINS, sensitivity
def test_pins_and_sensitivity_values_by_hand():
    g = torch.tensor([0.5, -2.0, 1.0])
    update = torch.tensor([-0.1, 0.3, 0.0])
    theta = torch.tensor([1.0, 0.5, -3.0])
    # S = -g dtheta - g theta
    assert Pins.value(g, update, theta).tolist() == pytest.approx([0.05 - 0.5, 0.6 + 1.0, 0.0 + 3.0])
    assert Sensitivity.value(g, theta).tolist() == pytest.approx([0.5, 1.0, 3.0])


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD([p], lr=0.1),
    "sgd-wd": lambda p: torch.optim.SGD([p], lr=0.1, weight_decay=0.2),
    "sgd-momentum-wd": lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam-wd": lambda p: torch.optim.Adam([p], lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW([p], lr=0.05, weight_decay=0.1),
    "adamw-amsgrad": lambda p: torch.optim.AdamW([p], lr=0.05, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_applied_update_is_the_optimizers_step(name):
    """dtheta_hat read back from the optimizer's state equals the update it applied (PINS Eq 11)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = OPTIMIZERS[name](p)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
        update, recovered = applied_update(opt, opt.param_groups[0], p, p.grad)
        torch.testing.assert_close(recovered, before)
        torch.testing.assert_close(update, p.detach() - before)
    if name == "sgd":  # plain SGD: dtheta_hat = -lr * g (PINS Eq 9)
        torch.testing.assert_close(update, -0.1 * p.grad)


def test_platon_smoothing_by_hand():
    buffers = {"ema": torch.zeros(2), "unc": torch.zeros(2)}
    values = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])]
    b1, b2 = 0.85, 0.95
    ema = unc = torch.zeros(2)
    for v in values:
        smoothing.update(buffers, v, "platon", b1, b2)
        ema = b1 * ema + (1 - b1) * v
        unc = b2 * unc + (1 - b2) * (v - ema).abs()
    torch.testing.assert_close(buffers["ema"], ema)
    torch.testing.assert_close(smoothing.score(buffers, "platon"), ema * unc)
    smoothing.update(buffers, torch.tensor([7.0, 8.0]), "none", b1, b2)
    assert smoothing.score(buffers, "none").tolist() == [7.0, 8.0]


# ------------------------------------------------------------------------------ loss modelling
def test_loss_model_saliencies_by_hand():
    g = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    fisher = torch.tensor([[4.0, 1.0], [0.5, 2.0]])
    theta = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    lm, qm, obd = (get(n)() for n in ("lm", "qm", "obd"))

    def close(got, hand):
        torch.testing.assert_close(got, torch.tensor(hand))

    close(lm.saliency(g, fisher, theta), [[0.5, 2.0], [2.0, 0.3]])  # |g theta|
    # |-g theta + 1/2 G theta^2|
    close(qm.saliency(g, fisher, theta), [[abs(-0.5 + 2.0), abs(2.0 + 2.0)], [abs(2.0 + 0.25), abs(-0.3 + 9.0)]])
    close(obd.saliency(g, fisher, theta), [[2.0, 2.0], [0.25, 9.0]])  # 1/2 G theta^2
    # step-size penalty lambda/2 theta^2, and a 1x2 block: |sum of the signed terms| + penalty sum
    lm_pen = get("lm")({"step_penalty": 0.2})
    close(lm_pen.saliency(g, fisher, theta), [[0.5 + 0.1, 2.0 + 0.4], [2.0 + 0.1, 0.3 + 0.9]])
    close(lm_pen.saliency(g, fisher, theta, (1, 2)), [[abs(0.5 - 2.0) + 0.1 * 5], [abs(-2.0 + 0.3) + 0.1 * 10]])


def test_estimate_fisher_is_the_per_example_empirical_fisher():
    import sparsec
    from tests.helpers import spec_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    spec = spec_dict(["*"], method="qm", density=0.5, curvature="empirical_fisher",
                     schedule={"kind": "one_shot", "warmup": 1})
    prog = sparsec.compile(model, spec, (torch.randn(1, 3),))
    xs, ys = torch.randn(4, 3), torch.randn(4, 2)

    def loss_of(i):
        return torch.nn.functional.mse_loss(prog(xs[i:i + 1]), ys[i:i + 1])

    mean_loss = prog.estimate_fisher(range(4), loss_of)
    grads = []
    for i in range(4):
        w = model[0].weight.detach().clone().requires_grad_()
        loss = torch.nn.functional.mse_loss(xs[i:i + 1] @ w.T + model[0].bias, ys[i:i + 1])
        grads.append(torch.autograd.grad(loss, w)[0])
    g = torch.stack(grads).mean(0)
    fisher = torch.stack([x * x for x in grads]).mean(0)
    expected = (-g * model[0].weight + 0.5 * fisher * model[0].weight ** 2).abs()
    site = prog.sites[0].name
    torch.testing.assert_close(prog.module.get_buffer(site + "_saliency"), expected.detach())
    assert math.isclose(mean_loss, sum(float(loss_of(i).detach()) for i in range(4)) / 4, rel_tol=1e-6)
    assert model[0].weight.grad is None  # .grad untouched


# -------------------------------------------------------------------------------- distillation
def test_distillation_kl_by_hand():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    temp = 2.0
    hand = 0.0
    for row_s, row_t in zip(s, t):
        ps, pt = torch.softmax(row_s / temp, -1), torch.softmax(row_t / temp, -1)
        hand += float((pt * (pt.log() - ps.log())).sum())
    hand = hand / 2 * temp ** 2
    assert math.isclose(float(distillation_kl(s, t, temp)), hand, rel_tol=1e-5)
    assert float(distillation_kl(t, t, 1.0)) == pytest.approx(0.0, abs=1e-7)
