"""The resolved spec: frozen dataclasses with every default filled (defaults come from the Fields of
sparsec.spec.fields, the one place they are written)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from sparsec.schedules import ScheduleParams
from sparsec.schema import default
from sparsec.spec.fields import CAPTURE_FIELDS, TRAIN_FIELDS, prune_fields, schedule_fields

DICT_SOURCE = "<dict>"
_SCHEDULE = schedule_fields()
_PRUNE = prune_fields()


@dataclass(frozen=True)
class PruneGroup:
    """One [[prune]] table: which sites, which criterion, how dense, in which geometry."""

    index: int
    targets: tuple[str, ...]
    exclude: tuple[str, ...]
    method: str
    density: float
    scope: str
    block: tuple[int, int]
    balanced: bool = default(_PRUNE, "balanced")
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "exclude": list(self.exclude),
            "method": self.method,
            "density": self.density,
            "scope": self.scope,
            "block": list(self.block),
            "balanced": self.balanced,
            **copy.deepcopy(dict(self.options)),
        }


@dataclass(frozen=True)
class ScheduleSpec:
    """The [schedule] table: how density moves from `initial_density` to each group's density."""

    kind: str = default(_SCHEDULE, "kind")
    total: int = default(_SCHEDULE, "total")
    warmup: int = default(_SCHEDULE, "warmup")
    cooldown: int = default(_SCHEDULE, "cooldown")
    every: int = default(_SCHEDULE, "every")
    iterations: int = default(_SCHEDULE, "iterations")
    at_once: bool = default(_SCHEDULE, "at_once")
    initial_density: float = default(_SCHEDULE, "initial_density")

    def params(self, final: float) -> ScheduleParams:
        """The schedule function's arguments for a group whose final density is `final`."""
        return ScheduleParams(final=final, total=self.total, warmup=self.warmup, cooldown=self.cooldown,
                              initial=self.initial_density, iterations=self.iterations,
                              at_once=self.at_once)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    """The [train] table: the fine-pruning loop that `sparsec compile` runs."""

    steps: int                  # required (defaults to schedule.total when resolved)
    batch_size: int = default(TRAIN_FIELDS, "batch_size")
    accumulate: int = default(TRAIN_FIELDS, "accumulate")
    lr: float = default(TRAIN_FIELDS, "lr")
    score_lr: float = default(TRAIN_FIELDS, "score_lr")
    lr_schedule: str = default(TRAIN_FIELDS, "lr_schedule")
    warmup_steps: int = default(TRAIN_FIELDS, "warmup_steps")
    score_lr_schedule: str = "constant"   # resolved from lr_schedule when absent
    score_warmup_steps: int = 0           # resolved from warmup_steps when absent
    freeze: tuple[str, ...] = ()
    optimizer: str = default(TRAIN_FIELDS, "optimizer")
    weight_decay: float = default(TRAIN_FIELDS, "weight_decay")
    momentum: float = default(TRAIN_FIELDS, "momentum")
    seed: int = default(TRAIN_FIELDS, "seed")
    log_every: int = default(TRAIN_FIELDS, "log_every")
    eval_every: int = default(TRAIN_FIELDS, "eval_every")
    max_grad_norm: float = default(TRAIN_FIELDS, "max_grad_norm")
    device: str = default(TRAIN_FIELDS, "device")
    precision: str = default(TRAIN_FIELDS, "precision")
    checkpoint_every: int = default(TRAIN_FIELDS, "checkpoint_every")
    tensorboard: bool = default(TRAIN_FIELDS, "tensorboard")
    check_ranks: bool = default(TRAIN_FIELDS, "check_ranks")
    parallel: str = default(TRAIN_FIELDS, "parallel")

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", tuple(self.freeze))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["freeze"] = list(self.freeze)
        return out


@dataclass(frozen=True)
class CaptureSpec:
    """The [capture] table: how the model becomes a torch.fx graph."""

    method: str = default(CAPTURE_FIELDS, "method")
    dynamic: bool = default(CAPTURE_FIELDS, "dynamic")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Spec:
    """A validated spec with every default filled. Equality ignores where it was read from."""

    groups: tuple[PruneGroup, ...]
    schedule: ScheduleSpec
    train: TrainSpec | None
    capture: CaptureSpec
    source: str = field(default=DICT_SOURCE, compare=False)
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False)  # registered extra tables

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as TOML-serializable data (no None); load_spec(to_dict()) == self."""
        out: dict[str, Any] = {
            "prune": [group.to_dict() for group in self.groups],
            "schedule": self.schedule.to_dict(),
        }
        if self.train is not None:
            out["train"] = self.train.to_dict()
        out["capture"] = self.capture.to_dict()
        out.update(copy.deepcopy(dict(self.extras)))
        return out
