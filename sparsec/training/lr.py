"""Learning-rate schedules of fine-pruning: torch's LambdaLR with one factor per parameter group, so
the weights and the scores each follow their own schedule ([train] lr_schedule / warmup_steps and
score_lr_schedule / score_warmup_steps).

The factors are those of Hugging Face's `get_constant_schedule_with_warmup`,
`get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (half a cosine): linear
warm-up from 0 over `warmup` optimizer steps, then constant, linear decay to 0 at `total`, or cosine
decay to 0 at `total`. The movement-pruning paper fine-prunes BERT with the linear one (Appendix A).
tests/test_lr.py checks them against transformers' own where it is installed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LrFactor:
    """The multiplier of a group's base learning rate after `step` optimizer steps (a picklable
    callable, as LambdaLR wants)."""

    kind: str
    warmup: int
    total: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r} (allowed: {', '.join(KINDS)})")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduler(optimizer: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of `make_optimizer`'s optimizer: its first group (the model) follows
    `lr_schedule`, its second (the scores, when there is one) `score_lr_schedule`. Step it once
    per optimizer step."""
    factors = [LrFactor(train.lr_schedule, train.warmup_steps, train.steps),
               LrFactor(train.score_lr_schedule, train.score_warmup_steps, train.steps)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[:len(optimizer.param_groups)])
