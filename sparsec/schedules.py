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
    at_once: bool = False


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


def pruning_iteration(t: int, p: ScheduleParams) -> int:
    """How many of the `iterations` pruning iterations pi are done at step t.

    The steps between `warmup` and `total - cooldown` are split into pi equal spans; iteration i
    (1 <= i <= pi) happens at the first step of span i, i.e. at step t_i + ceil((i - 1) * span / pi)
    where span = total - warmup - cooldown. So iteration 1 is at step `warmup`, all pi are done
    before the cool-down. With `total = 0` all pi iterations are due at step `warmup`; without
    `at_once` they then collapse into one selection (pi = 1). With `at_once` all pi iterations happen
    inside the one `prog.step()` at step `warmup`, each after a fresh estimate (Algorithm 1:
    no training between iterations; sparsec.estimation.before_pruning runs the first pi - 1).
    """
    if t < p.warmup:
        return 0
    if p.at_once:
        return p.iterations
    span = p.total - p.warmup - p.cooldown
    if span <= 0 or t >= p.total - p.cooldown:
        return p.iterations
    return min(p.iterations, (t - p.warmup) * p.iterations // span + 1)


@register("linear", "iterative pruning in `iterations` equal steps of density, "
                    "1 - i (1 - d_final) / pi after iteration i (loss modelling, Algorithm 1)")
def linear(t: int, p: ScheduleParams) -> float:
    """Loss modelling (Laurent et al. 2020) Algorithm 1, linear steps: every iteration prunes the
    same number of weights, density v_i - i (v_i - v_f) / pi after iteration i of pi
    (with v_i = 1: 1 - i (1 - d_final) / pi). See `pruning_iteration` for when iterations happen."""
    return _linear_after(pruning_iteration(t, p), p)


def _linear_after(i: int, p: ScheduleParams) -> float:
    return p.initial - i * (p.initial - p.final) / p.iterations


@register("exponential", "iterative pruning in `iterations` steps that each prune the same "
                         "fraction of what remains: d_final^(i / pi) after iteration i "
                         "(loss modelling, Algorithm 1)")
def exponential(t: int, p: ScheduleParams) -> float:
    """Loss modelling (Laurent et al. 2020) Algorithm 1, exponential steps (line 5 is garbled in
    the paper; see shared/papers/README.md): density v_i (v_f / v_i)^(i / pi) after iteration i of
    pi, i.e. d_final^(i / pi) from a dense start. See `pruning_iteration` for when."""
    return _exponential_after(pruning_iteration(t, p), p)


def _exponential_after(i: int, p: ScheduleParams) -> float:
    if i >= p.iterations:
        return p.final
    return p.initial * (p.final / p.initial) ** (i / p.iterations)


ITERATIVE = {"linear": _linear_after, "exponential": _exponential_after}


def density_after_iteration(kind: str, i: int, p: ScheduleParams) -> float:
    """Density after pruning iteration i (0 <= i <= pi) of an iterative schedule (`linear` or
    `exponential`); for the other kinds, `initial` before the first iteration and `final` after."""
    if kind in ITERATIVE:
        return ITERATIVE[kind](i, p)
    return p.initial if i <= 0 else p.final


@register("one_shot", "`initial_density` for the first `warmup` steps, then the final density "
                      "at once (one-shot pruning, loss modelling section 5.3)")
def one_shot(t: int, p: ScheduleParams) -> float:
    """One-shot pruning: a single pruning step at step `warmup` (loss modelling, Algorithm 1 with
    pi = 1; the reference of section 5.3)."""
    return p.initial if t < p.warmup else p.final
