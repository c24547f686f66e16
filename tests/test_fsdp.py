"""FSDP2 underneath sparsec (`[train] parallel = "fsdp"`): what sparsec.training.fullview promises,
on two gloo processes. The end-to-end runs (five methods, kill -9 and resume) are in
tests/test_distributed.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsec.errors import SpecError, TrainingError
from sparsec.spec import load_spec
from sparsec.spec.model import TrainSpec
from sparsec.training import distributed
from sparsec.training.backend import ShardedBackend


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.frozen = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight          # tied
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        return self.head(self.frozen(torch.relu(self.mid(self.embed(ids)))))


def _check(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    passed = False
    try:
        from torch.distributed.tensor import DTensor

        torch.manual_seed(0)
        model = Tied()
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        backend = ShardedBackend(TrainSpec(steps=1, device="cpu", parallel="fsdp"))
        placed = backend.place(model)
        weight = model.mid.weight
        assert isinstance(weight, DTensor) and weight.to_local().shape == (3, 6)   # half each
        assert model.head.weight is model.embed.weight
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = torch.arange(8).view(2, 4) + rank
        placed(ids).square().mean().backward()
        opt.step()
        assert isinstance(opt.state[weight]["exp_avg"], DTensor)
        expected_mid = weight.full_tensor().detach().clone()
        expected_avg = opt.state[weight]["exp_avg"].full_tensor().detach().clone()

        with backend.whole(model, opt):
            plain = model.mid.weight
            assert type(plain) is torch.nn.Parameter and plain.shape == (6, 6)
            assert torch.equal(plain, expected_mid) and plain.grad is not None and plain.grad.shape == (6, 6)
            assert model.head.weight is model.embed.weight and not model.frozen.weight.requires_grad
            assert any(p is plain for g in opt.param_groups for p in g["params"])
            state = opt.state[plain]
            assert not isinstance(state["exp_avg"], DTensor) and torch.equal(state["exp_avg"], expected_avg)
            with torch.no_grad():      # what dynsparse does to a re-allocated block
                plain[4:].zero_()
                state["exp_avg"][4:].zero_()
                model.embed.weight[0].fill_(7.0)
        assert model.mid.weight is weight and isinstance(model.mid.weight, DTensor)
        expected_mid[4:] = 0
        assert torch.equal(weight.full_tensor(), expected_mid)          # the change reached the shards
        expected_avg[4:] = 0
        assert torch.equal(opt.state[weight]["exp_avg"].full_tensor(), expected_avg)
        assert torch.equal(model.head.weight.full_tensor()[0], torch.full((6,), 7.0))
        assert torch.equal(model.frozen.weight.full_tensor(), reference["frozen.weight"])  # never trained

        # a checkpoint loaded inside the view lands in the shards and the optimizer
        saved_model = {k: v.clone() for k, v in reference.items()}
        with backend.whole(model, opt, grads=False):
            model.load_state_dict(saved_model)
            saved_opt = opt.state_dict()
        with backend.whole(model, opt, grads=False):
            opt.load_state_dict(saved_opt)
        assert torch.equal(model.mid.weight.full_tensor(), reference["mid.weight"])
        assert isinstance(opt.state[model.mid.weight]["exp_avg"], DTensor)

        backend.release(model)
        assert type(model.mid.weight) is torch.nn.Parameter and model.head.weight is model.embed.weight
        assert torch.equal(model.mid.weight, reference["mid.weight"])
        assert not model.frozen.weight.requires_grad and model.mid.weight.requires_grad
        Path(f"{store}.ok{rank}").write_text("ok")
        passed = True
    finally:
        distributed.shutdown(clean=passed)
    # torch's teardown of the process's distributed objects at interpreter exit aborts now and then
    # ("terminate called without an active exception") after the work is done: skip it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_whole_gathers_and_writes_back_parameters_gradients_and_optimizer_state(tmp_path):
    mp.spawn(_check, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
    assert all((tmp_path / f"store.ok{rank}").exists() for rank in range(2))


def test_fsdp_in_fp16_is_refused_by_the_spec_and_the_backend():
    with pytest.raises(SpecError, match=r"train.precision.*fsdp"):
        load_spec({"prune": [{"targets": ["fc*"], "density": 0.5, "method": "magnitude"}],
                   "train": {"steps": 4, "parallel": "fsdp", "precision": "fp16"}})
    assert load_spec({"prune": [{"targets": ["fc*"], "density": 0.5, "method": "magnitude"}],
                      "train": {"steps": 4, "parallel": "fsdp", "precision": "bf16"}}).train.parallel == "fsdp"
    with pytest.raises(TrainingError, match="fsdp"):
        ShardedBackend.check_precision("fp16")
    ShardedBackend.check_precision("bf16")
