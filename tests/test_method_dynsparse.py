"""DynSparse (Dietrich et al. 2022): every formula against a hand computation (block norms of
Eq 1, the cosine decay of the pruning ratio, the group lasso of Eq 2 and its gradient, the sparse
learning-rate rule of Eq 3), Algorithm 1's prune-and-regrow (exact density, blocks move, regrown
blocks start at zero weights and zero Adam / SGD state, dead weights stay zero), the errors,
bit-exact resume, training the small MLP with the documented loop, and specs/dynsparse.toml."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec import blocks
from sparsec.errors import SpecError, TrainingError
from sparsec.methods.dynsparse import (block_norm, explored_fraction, generator_for, group_lasso,
                                       prune_ratio_at, sparse_learning_rate)
from sparsec.spec import load_spec
from tests.helpers import mlp, mlp_input, spec_dict

SPECS = Path(__file__).resolve().parent.parent / "specs"
SCHEDULE = {"kind": "constant", "total": 40, "every": 4}
W = torch.tensor([[1.0, -2.0, 0.5, 0.0],
                  [3.0, 0.0, -0.5, 1.5]])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=gen)
    return x, x[:, :4].sum(dim=1, keepdim=True).expand(16, 4) * 0.5


def compile_(density=0.25, block=(2, 2), schedule=None, model_seed=0, **options):
    spec = spec_dict(["fc*"], method="dynsparse", density=density, scope="local", block=block,
                     schedule=schedule or SCHEDULE, **options)
    return sparsec.compile(mlp(model_seed), spec, (mlp_input(),))


def train(prog, opt, start: int, steps: int) -> list[float]:
    """The documented loop: forward, loss + regularization, backward, optimizer.step(),
    prog.step(), zero_grad."""
    prog.attach_optimizer(opt)
    prog.train()
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(prog(x), y) + prog.regularization()
        loss.backward()
        opt.step()
        prog.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def kept_blocks(prog) -> dict[str, torch.Tensor]:
    return {s.name: blocks.block_reduce(prog.masks()[s.name], s.block, "max") > 0 for s in prog.sites}


# ------------------------------------------------------------------------------------ formulas
def test_block_norms_eq1_by_hand():
    # 2x2 blocks: [[1, -2], [3, 0]] and [[0.5, 0], [-0.5, 1.5]]
    assert block_norm(W, (2, 2), "l1").tolist() == [[6.0, 2.5]]
    torch.testing.assert_close(block_norm(W, (2, 2), "l2"),
                               torch.tensor([[math.sqrt(14.0), math.sqrt(2.75)]]))
    assert block_norm(W, (2, 2), "linf").tolist() == [[3.0, 1.5]]
    # 1x1 blocks: every norm is |W| (magnitude pruning, the paper's limit of block size 1)
    for norm in ("l1", "l2", "linf"):
        torch.testing.assert_close(block_norm(W, (1, 1), norm), W.abs())
    # partial edge blocks: [1, 3] over 4 columns -> blocks of 3 and 1 columns
    assert block_norm(W, (1, 3), "l1").tolist() == [[3.5, 0.0], [3.5, 1.5]]
    assert block_norm(W, (1, 3), "linf").tolist() == [[2.0, 0.0], [3.0, 1.5]]


def test_cosine_decay_of_the_pruning_ratio_by_hand():
    assert prune_ratio_at(0, 100, 0.5) == 0.5
    assert math.isclose(prune_ratio_at(25, 100, 0.5), 0.25 * (1 + math.sqrt(0.5)))
    assert math.isclose(prune_ratio_at(50, 100, 0.5), 0.25)
    assert math.isclose(prune_ratio_at(75, 100, 0.5), 0.25 * (1 - math.sqrt(0.5)))
    assert prune_ratio_at(100, 100, 0.5) == 0.0
    assert prune_ratio_at(150, 100, 0.5) == 0.0
    assert prune_ratio_at(99, 100, 0.5, "constant") == 0.5
    assert prune_ratio_at(100, 100, 0.5, "constant") == 0.0


def test_group_lasso_eq2_value_and_gradient_by_hand():
    lam, w_std, eps = 0.3, 0.02, 1e-6
    w = W.clone().requires_grad_(True)
    value = group_lasso(w, (2, 2), lam, w_std)
    sqrt_b = math.sqrt(2.0)  # sqrt(B) with B = 2 for 2x2 blocks
    hand = lam * w_std * sqrt_b * (math.sqrt(14.0 + eps) + math.sqrt(2.75 + eps))
    assert math.isclose(float(value.detach()), hand, rel_tol=1e-6)
    value.backward()
    # Eq 2: the update term lambda w_std sqrt(B) W_ij / sqrt(sum_{B(i,j)} W^2 + eps), per block
    norms = torch.tensor([[math.sqrt(14.0 + eps)] * 2 + [math.sqrt(2.75 + eps)] * 2] * 2)
    torch.testing.assert_close(w.grad, lam * w_std * sqrt_b * W / norms)
    # only kept blocks count when a keep grid is given
    kept = group_lasso(W, (2, 2), lam, w_std, keep=torch.tensor([[True, False]]))
    assert math.isclose(float(kept), lam * w_std * sqrt_b * math.sqrt(14.0 + eps), rel_tol=1e-6)
    # 16x16 blocks: sqrt(B) = 4
    assert math.isclose(float(group_lasso(torch.ones(16, 16), (16, 16), 1.0, 1.0, eps=0.0)), 4.0 * 16.0)


def test_sparse_learning_rate_eq3_by_hand():
    assert sparse_learning_rate(2e-4, 1.0) == 2e-4
    hand = 2e-4 * math.exp(1.969 * 0.81 + 0.2905 * 0.9)
    assert math.isclose(sparse_learning_rate(2e-4, 0.1), hand)
    assert math.isclose(sparse_learning_rate(2e-4, 0.1), 1.28e-3, rel_tol=0.01)  # Table A.14's best
    assert math.isclose(sparse_learning_rate(1.0, 0.5), math.exp(1.969 * 0.25 + 0.2905 * 0.5))
    with pytest.raises(ValueError):
        sparse_learning_rate(1e-3, 0.0)


def test_generator_is_a_function_of_seed_step_and_site():
    draw = lambda *key: torch.randperm(50, generator=generator_for(*key)).tolist()  # noqa: E731
    assert draw(0, 4, "fc1.weight") == draw(0, 4, "fc1.weight")
    assert draw(0, 4, "fc1.weight") != draw(0, 8, "fc1.weight")
    assert draw(0, 4, "fc1.weight") != draw(0, 4, "fc2.weight")
    assert draw(0, 4, "fc1.weight") != draw(1, 4, "fc1.weight")


# ------------------------------------------------------------------------------ Algorithm 1
def test_random_block_init_at_the_final_density_with_zero_dead_weights():
    prog = compile_(density=0.25)
    for site in prog.sites:
        grid = kept_blocks(prog)[site.name]
        assert int(grid.sum()) == round(0.25 * grid.numel()), site.name
    assert prog.density() == 0.25
    for name, weight in prog.weights().items():
        assert bool((weight[prog.masks()[name] == 0] == 0).all()), name
    # seeded: the same seed gives the same pattern, another seed another one
    again = compile_(density=0.25)
    other = compile_(density=0.25, seed=7)
    assert all(torch.equal(prog.masks()[n], again.masks()[n]) for n in prog.masks())
    assert any(not torch.equal(prog.masks()[n], other.masks()[n]) for n in prog.masks())
    # the pattern is random, not the largest blocks
    assert explored_fraction(prog) == 0.25


def test_prune_and_regrow_keeps_the_density_exact_and_moves_blocks():
    prog = compile_(density=0.25)
    opt = torch.optim.Adam(prog.model_parameters(), lr=1e-2)
    train(prog, opt, 0, 3)
    before = kept_blocks(prog)
    x, y = batch(3)
    torch.nn.functional.mse_loss(prog(x), y).backward()
    opt.step()
    norms = {s.name: block_norm(prog.weights()[s.name], s.block, "l1") for s in prog.sites}
    prog.step()  # step 4: the first update, prune ratio p_r(4) of T = 40
    opt.zero_grad()
    after = kept_blocks(prog)
    ratio = prune_ratio_at(4, 40, 0.5)
    for site in prog.sites:
        b, a = before[site.name], after[site.name]
        assert int(a.sum()) == int(b.sum())
        k = math.floor(ratio * int(b.sum()) + 0.5)
        # the k kept blocks of smallest L1 norm are pruned, the other kept blocks stay ...
        kept = torch.nonzero(b.reshape(-1)).flatten()
        order = torch.sort(norms[site.name].reshape(-1)[kept], stable=True).indices
        pruned = torch.zeros_like(b).reshape(-1)
        pruned[kept[order[:k]]] = True
        stay = b & ~pruned.reshape(b.shape)
        assert bool((a[stay]).all())
        # ... and k blocks are drawn among the dead ones (a just-pruned block may be drawn again)
        assert int((a & ~stay).sum()) == k
    assert sum(int((after[n] & ~before[n]).sum()) for n in after) > 0
    assert prog.density() == 0.25
    train(prog, opt, 4, 36)
    assert prog.density() == 0.25
    assert explored_fraction(prog) > 0.25


def test_regrown_blocks_start_with_zero_weights_and_zero_adam_moments():
    prog = compile_(density=0.25)
    opt = torch.optim.Adam(prog.model_parameters(), lr=1e-2)
    train(prog, opt, 0, 3)
    before = kept_blocks(prog)
    x, y = batch(3)
    torch.nn.functional.mse_loss(prog(x), y).backward()
    opt.step()
    prog.step()  # step 4: update
    after = kept_blocks(prog)
    regrown_any = False
    for site in prog.sites:
        weight = prog.weights()[site.name]
        regrown = blocks.expand(after[site.name] & ~before[site.name], site.shape, site.block)
        dead = prog.masks()[site.name] == 0
        state = opt.state[weight]
        for where in (regrown, dead):
            assert bool((weight[where] == 0).all())
            assert bool((state["exp_avg"][where] == 0).all())
            assert bool((state["exp_avg_sq"][where] == 0).all())
        survived = blocks.expand(after[site.name] & before[site.name], site.shape, site.block)
        assert bool((state["exp_avg_sq"][survived] != 0).any())  # kept blocks keep their moments
        regrown_any |= bool(regrown.any())
    assert regrown_any
    opt.zero_grad()
    # dead weights get no gradient and stay zero while training on
    train(prog, opt, 4, 3)
    for name, weight in prog.weights().items():
        assert bool((weight[prog.masks()[name] == 0] == 0).all()), name


def test_sgd_momentum_of_regrown_blocks_is_zeroed():
    prog = compile_(density=0.25, schedule={"kind": "constant", "total": 40, "every": 2})
    opt = torch.optim.SGD(prog.model_parameters(), lr=1e-2, momentum=0.9)
    train(prog, opt, 0, 2)
    for name, weight in prog.weights().items():
        dead = prog.masks()[name] == 0
        assert bool((opt.state[weight]["momentum_buffer"][dead] == 0).all()), name


def test_prune_ratio_zero_is_static_sparsity():
    prog = compile_(density=0.25, prune_ratio=0.0)
    before = {n: m.clone() for n, m in prog.masks().items()}
    train(prog, torch.optim.Adam(prog.model_parameters(), lr=1e-2), 0, 12)
    assert all(torch.equal(before[n], m) for n, m in prog.masks().items())


def test_partial_edge_blocks_keep_the_element_count_exact():
    prog = compile_(density=0.3, block=(3, 3))  # 16 and 8 are not multiples of 3
    start = {n: int(m.sum()) for n, m in prog.masks().items()}
    train(prog, torch.optim.Adam(prog.model_parameters(), lr=1e-2), 0, 20)
    assert {n: int(m.sum()) for n, m in prog.masks().items()} == start


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_every_norm_trains(norm):
    prog = compile_(norm=norm)
    train(prog, torch.optim.Adam(prog.model_parameters(), lr=1e-2), 0, 8)
    assert prog.density() == 0.25


def test_group_lasso_is_decoupled_and_scaled_by_the_learning_rate():
    """Eq 2 as AdamW's decay: W <- W_adam - lr lambda w_std sqrt(B) W_before / ||block||, on the
    kept blocks, with nothing added to the loss."""
    lam, lr = 0.5, 1e-2
    prog = compile_(**{"lambda": lam})
    assert float(prog.regularization()) == 0.0   # not through the loss any more
    opt = torch.optim.Adam(prog.model_parameters(), lr=lr)
    train(prog, opt, 0, 2)                        # Adam has moments
    before = {n: w.detach().clone() for n, w in prog.weights().items()}
    x, y = batch(2)
    torch.nn.functional.mse_loss(prog(x), y).backward()
    opt.step()
    adam = {n: w.detach().clone() for n, w in prog.weights().items()}
    prog.step(optimizer=opt)                      # step 3: no mask update (every 4)
    for site in prog.sites:
        w0, mask = before[site.name], prog.masks()[site.name]
        norms = torch.sqrt(blocks.block_reduce(w0 * w0, site.block, "sum") + 1e-6)
        hand = adam[site.name] - lr * lam * 0.02 * math.sqrt(2.0) * w0 / blocks.expand(norms, site.shape, site.block)
        torch.testing.assert_close(prog.weights()[site.name].detach(), hand * mask)
    # SGD, one step, by hand: W1 = W0 - lr g - lr lambda w_std sqrt(B) W0 / ||block(W0)||
    prog = compile_(**{"lambda": lam})
    opt = torch.optim.SGD(prog.model_parameters(), lr=lr)
    prog.attach_optimizer(opt)
    w0 = prog.weights()["fc1.weight"].detach().clone()
    torch.nn.functional.mse_loss(prog(x), y).backward()
    g = prog.weights()["fc1.weight"].grad.clone()
    opt.step()
    prog.step()
    site = prog.sites[0]
    norms = blocks.expand(torch.sqrt(blocks.block_reduce(w0 * w0, site.block, "sum") + 1e-6), site.shape, site.block)
    hand = (w0 - lr * g - lr * lam * 0.02 * math.sqrt(2.0) * w0 / norms) * prog.masks()["fc1.weight"]
    torch.testing.assert_close(prog.weights()["fc1.weight"].detach(), hand)


def test_blocks_pruned_and_drawn_again_in_one_update_start_at_zero():
    """Algorithm 1: a block pruned at an update and re-allocated by the same update's random draw
    is a new block: zero weights and zero Adam moments (not the old ones)."""
    prog = compile_(density=0.75, block=(2, 2))
    opt = torch.optim.Adam(prog.model_parameters(), lr=1e-2)
    train(prog, opt, 0, 3)
    x, y = batch(3)
    torch.nn.functional.mse_loss(prog(x), y).backward()
    opt.step()
    old = kept_blocks(prog)
    # the blocks the update prunes, by hand: the round(p_r(4) * kept) smallest L1 norms of the kept
    ratio = prune_ratio_at(4, 40, 0.5)
    pruned = {}
    for site in prog.sites:
        norms = block_norm(prog.weights()[site.name], site.block, "l1").reshape(-1)
        kept = torch.nonzero(old[site.name].reshape(-1)).flatten()
        k = math.floor(ratio * kept.numel() + 0.5)
        grid = torch.zeros(norms.numel(), dtype=torch.bool)
        grid[kept[torch.sort(norms[kept], stable=True).indices[:k]]] = True
        pruned[site.name] = grid.reshape(old[site.name].shape)
    prog.step()  # step 4: update
    new = kept_blocks(prog)
    again = 0
    for site in prog.sites:
        both = blocks.expand(pruned[site.name] & new[site.name], site.shape, site.block)
        weight, state = prog.weights()[site.name], opt.state[prog.weights()[site.name]]
        assert bool((weight[both] == 0).all())
        assert bool((state["exp_avg"][both] == 0).all()) and bool((state["exp_avg_sq"][both] == 0).all())
        survived = blocks.expand(old[site.name] & ~pruned[site.name], site.shape, site.block)
        assert bool((state["exp_avg_sq"][survived] != 0).any())
        again += int(both.sum())
    assert again > 0  # the case happened


# --------------------------------------------------------------------------------- errors
def test_update_without_an_optimizer_is_a_clear_error():
    prog = compile_()
    prog.train()
    with pytest.raises(TrainingError, match="attach_optimizer"):
        for step in range(4):
            x, y = batch(step)
            torch.nn.functional.mse_loss(prog(x), y).backward()
            prog.step()


def test_weight_outside_the_optimizer_is_a_clear_error():
    prog = compile_()
    opt = torch.optim.Adam([prog.weights()["fc1.weight"]], lr=1e-2)
    with pytest.raises(TrainingError, match="not in the attached optimizer"):
        train(prog, opt, 0, 4)


def test_other_schedule_kinds_and_scopes_are_rejected():
    cubic = {"kind": "cubic", "total": 20, "warmup": 2, "cooldown": 4}
    with pytest.raises(SpecError, match="schedule.kind: 'cubic' is not supported by method 'dynsparse'"):
        compile_(schedule=cubic)
    with pytest.raises(SpecError, match="schedule.total"):
        compile_(schedule={"kind": "constant"})
    compile_(schedule={"kind": "constant"}, decay="constant")  # a constant ratio needs no T
    with pytest.raises(SpecError, match="'global' is not supported by method 'dynsparse'"):
        load_spec(spec_dict(["*"], method="dynsparse", scope="global"))


# --------------------------------------------------------------------------------- resume
def test_state_dict_resumes_bit_exactly():
    def opt_of(prog):
        return torch.optim.Adam(prog.model_parameters(), lr=1e-2)

    ref = compile_(**{"lambda": 0.1})
    ref_opt = opt_of(ref)
    train(ref, ref_opt, 0, 10)
    saved_prog, saved_opt = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())
    train(ref, ref_opt, 10, 14)

    resumed = compile_(model_seed=3, **{"lambda": 0.1})  # other initial weights: all come from the state
    resumed.load_state_dict(saved_prog)
    opt = opt_of(resumed)
    opt.load_state_dict(saved_opt)
    train(resumed, opt, 10, 14)
    assert any(k.endswith("_explored") for k in resumed.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ------------------------------------------------------------------------------- end to end
def test_end_to_end_training_the_mlp_with_the_documented_loop():
    prog = compile_(density=0.25, block=(2, 2), schedule={"kind": "constant", "total": 60, "every": 5})
    opt = torch.optim.AdamW(prog.model_parameters(), lr=sparse_learning_rate(3e-3, 0.25))
    losses = train(prog, opt, 0, 60)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert prog.density() == 0.25
    assert explored_fraction(prog) > 0.25
    plain = prog.finalize()
    assert not any(name.endswith("_explored") for name, _ in plain.named_buffers())
    prog.eval()
    torch.testing.assert_close(plain.eval()(mlp_input()), prog(mlp_input()))


# ------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize("block", [[4, 4], [8, 8], [16, 16]])
def test_spec_file_validates_with_the_papers_hyperparameters(block):
    spec = load_spec(SPECS / "dynsparse.toml")
    group = spec.groups[0]
    assert group.method == "dynsparse"
    assert group.density == 0.1 and tuple(group.block) == (16, 16)
    assert spec.schedule.kind == "constant" and spec.schedule.total // spec.schedule.every == 80
    # Appendix A: linear warm-up (10000 of 757k steps, scaled) then linear decay over the run
    assert spec.train.lr_schedule == "linear"
    assert spec.train.warmup_steps == round(10000 * spec.train.steps / 757000)
    text = (SPECS / "dynsparse.toml").read_text().replace("block = [16, 16]", f"block = {block}")
    import tomllib

    load_spec(tomllib.loads(text))


def test_spec_rejects_a_schedule_dynsparse_does_not_support():
    from sparsec.errors import SpecError
    from sparsec.spec import load_spec

    with pytest.raises(SpecError, match=r"schedule.kind: 'cubic' is not supported by method 'dynsparse'"):
        load_spec({"prune": [{"targets": ["*"], "method": "dynsparse", "density": 0.1}],
                   "schedule": {"kind": "cubic", "total": 100, "warmup": 10}})
