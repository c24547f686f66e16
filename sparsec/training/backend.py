"""The trainer seam: what a training backend owns, apart from the loop that is the same everywhere.

The fine-pruning loop (sparsec.training.loop) follows the Program's contract on every backend:
forward, loss (+ distillation, regularization), backward, optimizer.step(), prog.step(),
zero_grad(). A backend owns what differs between machines and process layouts:

    place(prog)              move the Program (weights, masks, scores, teacher) where it trains and
                             return the module the loop calls (a wrapper, for data parallelism)
    batch(batch)             move one batch there
    autocast()               the precision context of the forward pass
    backward(loss)           loss.backward() (scaled, for fp16)
    step(optimizer, params, max_grad_norm)   clip and take the optimizer step
    is_main                  whether this process writes outputs and shows progress
    reduce_sum(values)       sums of evaluation statistics over processes

`LocalBackend` is one process on the CPU in float32: everything sparsec does today. GPU, mixed
precision and torch.distributed backends implement the same methods.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils import _pytree as pytree


class Backend:
    name = "backend"
    device = torch.device("cpu")

    def place(self, prog: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, batch: Any) -> Any:
        return pytree.tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, batch)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_grad_norm: float) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()

    @property
    def is_main(self) -> bool:
        return True

    def reduce_sum(self, values: list[float]) -> list[float]:
        return values


class LocalBackend(Backend):
    """One process, the CPU, float32."""

    name = "local"

    def place(self, prog: torch.nn.Module) -> torch.nn.Module:
        return prog.to(self.device)


def backend_for(train: Any) -> Backend:
    """The backend the spec's [train] table asks for (today: always one CPU process in float32)."""
    return LocalBackend()
