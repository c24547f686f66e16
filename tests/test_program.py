"""The Program's public contract: views of sites, weights, scores and masks; step() and the
schedule; masks recomputed only when due and never in forward; exact density at the end of the
schedule; bit-exact resume (also through safetensors); finalize()."""
from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file, save_file

import sparsec
from sparsec import Program, Site
from tests.helpers import compile_mlp, mlp, mlp_input, spec_dict

CUBIC = {"kind": "cubic", "total": 20, "warmup": 2, "cooldown": 4}


def _spec(**kwargs):
    kwargs.setdefault("schedule", CUBIC)
    return spec_dict(["fc*"], density=kwargs.pop("density", 0.25), **kwargs)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 8, generator=gen)
    return x, x[:, :4].sum(dim=1, keepdim=True).expand(8, 4) * 0.5


def optimizer(prog: Program) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"params": prog.model_parameters(), "lr": 1e-2},
                             {"params": prog.score_parameters(), "lr": 5e-2}])


def train(prog: Program, opt: torch.optim.Optimizer, start: int, steps: int) -> list[float]:
    prog.train()
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step)
        torch.manual_seed(step)  # dropout draws depend only on the step
        loss = torch.nn.functional.mse_loss(prog(x), y) + prog.regularization()
        loss.backward()
        opt.step()
        prog.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------------- contract
def test_public_views():
    model, prog = compile_mlp(_spec(block=(4, 4)))
    assert isinstance(prog, torch.nn.Module) and isinstance(prog.module, torch.fx.GraphModule)
    assert [s.name for s in prog.sites] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(isinstance(s, Site) and s.method == "movement" and s.block == (4, 4) for s in prog.sites)
    weights = prog.weights()
    assert weights["fc1.weight"] is model.fc1.weight  # the live parameter, shared with the model
    assert set(prog.scores()) == set(weights) == set(prog.masks())
    assert prog.scores()["fc2.weight"].shape == (4, 4)
    assert prog.masks()["fc2.weight"].shape == (16, 16)
    param_ids = {id(p) for p in prog.parameters()}
    assert all(id(s) in param_ids for s in prog.scores().values())
    assert all(id(w) in param_ids for w in weights.values())
    assert float(prog.regularization()) == 0.0
    assert prog.density() == 1.0  # cubic schedule: dense during warm-up
    keys = set(prog.state_dict())
    assert {"step_count", "module.fc1.weight", "module.fc1.weight_mask", "module.fc1.weight_scores"} <= keys


def test_magnitude_has_no_scores():
    _, prog = compile_mlp(spec_dict(["fc*"], method="magnitude", density=0.5))
    assert prog.scores() == {}
    assert prog.density() == 0.5  # constant schedule: pruned from step 0
    assert float(prog.regularization()) == 0.0


def test_masks_follow_the_schedule_at_step():
    _, prog = compile_mlp(_spec())
    densities = []
    for _ in range(22):
        densities.append(prog.density())
        prog.step()
    assert int(prog.step_count) == 22
    assert densities[:3] == [1.0, 1.0, 1.0]
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    assert densities[16] == 0.25 and prog.density() == 0.25
    assert abs(densities[8] - prog.target_density()) > 0.01  # still moving at step 8


def test_masks_recomputed_only_when_due():
    spec = _spec(schedule={"kind": "constant", "every": 3})
    _, prog = compile_mlp(spec)
    scores = prog.scores()["fc1.weight"]
    before = prog.masks()["fc1.weight"].clone()
    with torch.no_grad():
        scores.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)))
    prog(mlp_input())
    prog(mlp_input())
    assert torch.equal(prog.masks()["fc1.weight"], before), "forward must not recompute masks"
    prog.step()
    prog.step()
    assert torch.equal(prog.masks()["fc1.weight"], before), "not due before step 3"
    prog.step()
    after = prog.masks()["fc1.weight"]
    assert not torch.equal(after, before)
    assert prog.density() == 0.25


def test_masks_apply_in_forward():
    model, prog = compile_mlp(spec_dict(["fc1.*"], method="magnitude", density=0.5))
    prog.eval()
    x = mlp_input(4)
    mask = prog.masks()["fc1.weight"]
    h = torch.relu(torch.nn.functional.linear(x, model.fc1.weight * mask, model.fc1.bias))
    expected = model.fc3(torch.relu(model.fc2(h)))
    torch.testing.assert_close(prog(x), expected, rtol=0, atol=1e-6)


def test_density_exact_after_schedule_unstructured_and_blocks():
    _, prog = compile_mlp(_spec(density=0.1))
    opt = optimizer(prog)
    train(prog, opt, 0, 20)
    total = sum(m.numel() for m in prog.masks().values())  # 128 + 256 + 64
    assert sum(int(m.sum()) for m in prog.masks().values()) == round(0.1 * total)
    _, prog = compile_mlp(_spec(density=0.1, block=(4, 4)))
    opt = optimizer(prog)
    train(prog, opt, 0, 20)
    assert abs(prog.density() * total - 0.1 * total) <= 16
    assert prog.target_density() == 0.1


def test_local_and_global_scope_counts():
    _, local = compile_mlp(spec_dict(["fc*"], method="magnitude", density=0.2, scope="local"))
    # per tensor: round(0.2 * 128) = 26, round(0.2 * 256) = 51, round(0.2 * 64) = 13
    assert local.site_densities() == {"fc1.weight": 26 / 128, "fc2.weight": 51 / 256, "fc3.weight": 13 / 64}
    _, glob = compile_mlp(spec_dict(["fc*"], method="magnitude", density=0.2, scope="global"))
    assert sum(int(m.sum()) for m in glob.masks().values()) == round(0.2 * 448)
    # fc1 (fan-in 8) is initialised with larger weights than fc2 / fc3 (fan-in 16): global
    # magnitude pruning keeps more of it
    densities = glob.site_densities()
    assert densities["fc1.weight"] > 0.2 > densities["fc2.weight"]


def test_scores_learn_by_straight_through_gradient():
    _, prog = compile_mlp(_spec())
    opt = optimizer(prog)
    train(prog, opt, 0, 3)
    assert all(bool(s.abs().sum() > 0) for s in prog.scores().values())


# --------------------------------------------------------------------------------------- resume
def _state(prog: Program, opt: torch.optim.Optimizer):
    # Optimizer.state_dict() references the live moment tensors: copy them
    return {k: v.clone() for k, v in prog.state_dict().items()}, copy.deepcopy(opt.state_dict())


def _assert_same_program(a: Program, b: Program) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert int(a.step_count) == int(b.step_count)
    for name in a.masks():
        assert torch.equal(a.masks()[name], b.masks()[name])
        assert torch.equal(a.scores()[name], b.scores()[name])
        assert torch.equal(a.weights()[name], b.weights()[name])


def _fresh(spec) -> Program:
    return sparsec.compile(mlp(seed=123, p=0.2), spec, (mlp_input(),))


def test_exact_resume_from_state_dict():
    spec = _spec(block=(2, 2))
    straight = sparsec.compile(mlp(p=0.2), spec, (mlp_input(),))
    opt = optimizer(straight)
    train(straight, opt, 0, 12)
    saved, saved_opt = _state(straight, opt)
    train(straight, opt, 12, 8)

    resumed = _fresh(spec)   # different initial weights: everything must come from the state
    opt2 = optimizer(resumed)
    resumed.load_state_dict(saved)
    opt2.load_state_dict(saved_opt)
    assert int(resumed.step_count) == 12
    train(resumed, opt2, 12, 8)
    _assert_same_program(straight, resumed)


def test_exact_resume_through_safetensors(tmp_path):
    spec = _spec()
    straight = sparsec.compile(mlp(p=0.2), spec, (mlp_input(),))
    opt = optimizer(straight)
    train(straight, opt, 0, 7)
    save_file(straight.state_dict(), str(tmp_path / "program.safetensors"))
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    train(straight, opt, 7, 6)

    resumed = _fresh(spec)
    opt2 = optimizer(resumed)
    resumed.load_state_dict(load_file(str(tmp_path / "program.safetensors")))
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train(resumed, opt2, 7, 6)
    _assert_same_program(straight, resumed)


# ------------------------------------------------------------------------------------- finalize
def test_finalize():
    model, prog = compile_mlp(_spec(schedule={"kind": "constant"}, block=(2, 2)))
    opt = optimizer(prog)
    train(prog, opt, 0, 3)
    prog.eval()
    final = prog.finalize()
    assert isinstance(final, torch.nn.Module) and not isinstance(final, Program)
    keys = set(final.state_dict())
    assert not any(k.endswith(("_mask", "_scores")) for k in keys)
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= keys
    assert not any(n.endswith("_scores") for n, _ in final.named_parameters())
    x = mlp_input(6)
    torch.testing.assert_close(final(x), prog(x), rtol=0, atol=1e-6)
    for name, mask in prog.masks().items():
        weight = final.get_parameter(name)
        assert bool((weight[mask == 0] == 0).all()), name
        assert torch.equal(weight[mask == 1], prog.weights()[name][mask == 1])
    # the Program itself is untouched and keeps training
    assert prog.weights()["fc1.weight"] is model.fc1.weight
    assert prog.scores()


def test_finalize_returns_the_model_in_eval_mode_even_from_a_training_program():
    _, prog = compile_mlp(_spec(schedule={"kind": "constant"}), p=0.5)   # with dropout
    prog.train()
    final = prog.finalize()
    assert not final.training and not any(m.training for m in final.modules())
    x = mlp_input(6)
    torch.testing.assert_close(final(x), final(x), rtol=0, atol=0)    # no dropout draws
    assert prog.training


def test_groups_methods_and_site_states_are_public_views_of_the_live_tensors():
    _, prog = compile_mlp(_spec(method="movement"))
    (group,) = prog.groups
    assert group.method == "movement" and group.sites == ("fc1.weight", "fc2.weight", "fc3.weight")
    assert prog.method(0).name == "movement" and prog.schedule.kind == "cubic"
    states = prog.site_states(0)
    assert [st.site.name for st in states] == list(group.sites) == [st.site.name for st in prog.site_states()]
    st = prog.state_of("fc1.weight")
    assert st.weight is prog.weights()["fc1.weight"] and st.mask is prog.masks()["fc1.weight"]
    assert st.scores is prog.scores()["fc1.weight"] and st.buffers == {}
    assert prog.density_at(0, 0) == 1.0 and prog.density_at(0, 20) == 0.25
