"""What fine-pruning optimizes: the spec's optimizer over two parameter groups (the model's weights
and the learned scores, each with its own learning rate and schedule, sparsec.training.lr), after
the parameters that `[train] freeze` names are taken out of training."""
from __future__ import annotations

import contextlib
from fnmatch import fnmatchcase
from typing import Any, Iterator

import torch

from sparsec.errors import SpecError, TrainingError


def make_optimizer(prog: Any, train: Any) -> torch.optim.Optimizer:
    """The spec's optimizer with two groups: the model at `lr`, the scores at `score_lr` without
    weight decay. Parameters that do not require gradients (frozen) are left out."""
    model_params = [p for p in prog.model_parameters() if p.requires_grad]
    score_params = [p for p in prog.score_parameters() if p.requires_grad]
    groups = [{"params": model_params, "lr": train.lr, "weight_decay": train.weight_decay}]
    if score_params:
        groups.append({"params": score_params, "lr": train.score_lr, "weight_decay": 0.0})
    if train.optimizer in ("adamw", "adam"):
        return _fused_where_possible(torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam,
                                     groups, train.lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    raise TrainingError(f"unknown optimizer {train.optimizer!r} (allowed: adamw, adam, sgd)")


def _fused_where_possible(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]],
                          lr: float) -> torch.optim.Optimizer:
    """torch's fused implementation (one kernel over every tensor: on the CPU about 3x faster than
    the default per-tensor loop, which matters with one score per weight) when every parameter is
    a floating-point CPU or CUDA tensor (FSDP's sharded DTensors included, so that a run under FSDP
    computes what the same run under DDP does); the default implementation otherwise. The two
    compute Adam's update and may differ in the last bit."""
    params = [p for group in groups for p in group["params"]]
    if all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params):
        try:
            return cls(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):   # a torch without it for this device or dtype
            pass
    return cls(groups, lr=lr)


@contextlib.contextmanager
def frozen(prog: Any, globs: tuple[str, ...] | list[str]) -> Iterator[list[str]]:
    """Stop the parameters whose names match `globs` from training while the block runs (their
    `requires_grad` is restored after); yields their names. A glob that matches no parameter is a
    spec error naming it."""
    named = dict(prog.module.named_parameters())
    chosen: dict[str, torch.nn.Parameter] = {}
    for index, glob in enumerate(globs):
        hits = {name: p for name, p in named.items() if fnmatchcase(name, glob)}
        if not hits:
            example = next(iter(named), "fc.weight")
            raise SpecError([f"train.freeze[{index}]: {glob!r} matches no parameter (parameters are "
                             f"named like {example!r})"])
        chosen.update(hits)
    before = {name: p.requires_grad for name, p in chosen.items()}
    for p in chosen.values():
        p.requires_grad_(False)
    try:
        yield sorted(chosen)
    finally:
        now = dict(prog.module.named_parameters())   # a sharded trainer may have replaced them
        for name, p in chosen.items():
            now.get(name, p).requires_grad_(before[name])
