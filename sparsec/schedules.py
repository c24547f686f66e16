"""Density schedules: pure functions of the optimizer step, kept apart from the code that
applies masks (as torch.ao.pruning does). Each takes the step `t` and the [schedule] settings and
returns the density (fraction of weights kept) that the masks must have at step t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ScheduleParams:
    """The [schedule] settings a schedule function reads; `final` is the group's density."""

    final: float
    total: int = 0
    warmup: int = 0
    cooldown: int = 0
    initial: float = 1.0
    iterations: int = 1


ScheduleFn = Callable[[int, ScheduleParams], float]
_SCHEDULES: dict[str, tuple[ScheduleFn, str]] = {}


def register(name: str, summary: str) -> Callable[[ScheduleFn], ScheduleFn]:
    def wrap(fn: ScheduleFn) -> ScheduleFn:
        _SCHEDULES[name] = (fn, summary)
        return fn
    return wrap


def names() -> list[str]:
    return list(_SCHEDULES)


def summary(name: str) -> str:
    return _SCHEDULES[name][1]


def density_at(kind: str, t: int, params: ScheduleParams) -> float:
    """Density asked at step t by schedule `kind`."""
    return _SCHEDULES[kind][0](t, params)


@register("constant", "the final density from step 0 (one-shot masks, recomputed every `every` steps)")
def constant(t: int, p: ScheduleParams) -> float:
    return p.final


@register("cubic", "cubic decay from `initial_density` to the final density after `warmup`, "
                   "held for the last `cooldown` steps (movement pruning Eq 5, PINS Eq 14)")
def cubic(t: int, p: ScheduleParams) -> float:
    """Movement pruning (Sanh et al. 2020) Eq 5 in its consistent form (PINS Eq 14, Zhu & Gupta):

        v_i                                                  0 <= t < t_i
        v_f + (v_i - v_f) (1 - (t - t_i) / (T - t_i - t_f))^3   t_i <= t < T - t_f
        v_f                                                  otherwise

    Eq 5 as printed subtracts t_f inside the bracket, which exceeds v_i at t = t_i (see
    shared/papers/README.md); here v is the density (fraction kept).
    """
    if t < p.warmup:
        return p.initial
    span = p.total - p.warmup - p.cooldown
    if span <= 0 or t >= p.total - p.cooldown:
        return p.final
    frac = 1.0 - (t - p.warmup) / span
    return p.final + (p.initial - p.final) * frac ** 3
