"""Iterative pruning schedules of loss modelling Algorithm 1 (linear, exponential) and one-shot:
densities after each iteration by hand, and when the iterations happen."""
from __future__ import annotations

import pytest

from sparsec.schedules import ScheduleParams, density_at, pruning_iteration

P = ScheduleParams(final=0.1, total=14, warmup=2, cooldown=2, iterations=5)  # span 10: every 2 steps


def test_iterations_split_the_pruning_span_evenly():
    assert [pruning_iteration(t, P) for t in range(15)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5, 5]
    # total = 0: every iteration at once (one-shot Algorithm 1 without training between iterations)
    assert pruning_iteration(0, ScheduleParams(final=0.1, iterations=7)) == 7


def test_linear_and_exponential_densities_by_hand():
    for i, t in enumerate([0, 2, 4, 6, 8, 10]):
        assert density_at("linear", t, P) == pytest.approx(1 - i * (1 - 0.1) / 5)
        assert density_at("exponential", t, P) == pytest.approx(0.1 ** (i / 5))
    assert density_at("exponential", 13, P) == 0.1
    # exponential prunes the same fraction of what remains at every iteration
    ratios = [density_at("exponential", t + 2, P) / density_at("exponential", t, P) for t in (2, 4, 6)]
    assert ratios == pytest.approx([0.1 ** 0.2] * 3)
    # from initial_density v_i: v_i (v_f / v_i)^(i / pi)
    q = ScheduleParams(final=0.1, total=14, warmup=2, cooldown=2, iterations=5, initial=0.5)
    assert density_at("exponential", 4, q) == pytest.approx(0.5 * 0.2 ** 0.4)
    assert density_at("linear", 4, q) == pytest.approx(0.5 - 2 * 0.4 / 5)


def test_one_shot():
    assert [density_at("one_shot", t, P) for t in (0, 1, 2, 9)] == [1.0, 1.0, 0.1, 0.1]
