"""Density schedules: the cubic schedule (movement pruning Eq 5 in its consistent form, PINS Eq 14)
and the constant one. v is the density (fraction kept):
    v_i                                                       t < t_i
    v_f + (v_i - v_f) (1 - (t - t_i) / (T - t_i - t_f))^3       t_i <= t < T - t_f
    v_f                                                       otherwise
"""
from __future__ import annotations

import pytest

from sparsec import schedules
from sparsec.schedules import ScheduleParams

P = ScheduleParams(final=0.1, total=100, warmup=10, cooldown=20, initial=1.0)


def cubic(t: int, p: ScheduleParams = P) -> float:
    return schedules.density_at("cubic", t, p)


def test_warmup_holds_initial_density():
    assert [cubic(t) for t in (0, 1, 9)] == [1.0, 1.0, 1.0]


def test_exactly_initial_at_end_of_warmup():
    assert cubic(10) == 1.0  # the printed Eq 5 would exceed v_i here


def test_middle_value_by_hand():
    # t = 45: span = 100 - 10 - 20 = 70, (t - t_i) / span = 35/70 = 0.5
    # v = 0.1 + 0.9 * 0.5^3 = 0.1 + 0.1125 = 0.2125
    assert cubic(45) == pytest.approx(0.2125, abs=1e-12)
    # t = 24: 14/70 = 0.2, v = 0.1 + 0.9 * 0.8^3 = 0.5608
    assert cubic(24) == pytest.approx(0.5608, abs=1e-12)


def test_final_at_start_of_cooldown_and_after():
    assert cubic(80) == 0.1   # T - t_f
    assert cubic(79) > 0.1
    assert [cubic(t) for t in (81, 99, 100, 1000)] == [0.1] * 4


def test_monotone_non_increasing():
    values = [cubic(t) for t in range(0, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == 1.0 and values[-1] == 0.1


def test_initial_density_below_one():
    p = ScheduleParams(final=0.2, total=50, warmup=0, cooldown=0, initial=0.8)
    assert cubic(0, p) == 0.8
    assert cubic(25, p) == pytest.approx(0.2 + 0.6 * 0.125)
    assert cubic(50, p) == 0.2


def test_no_room_between_warmup_and_cooldown_gives_final():
    p = ScheduleParams(final=0.3, total=10, warmup=5, cooldown=5)
    assert cubic(4, p) == 1.0
    assert cubic(5, p) == 0.3


def test_constant_schedule():
    p = ScheduleParams(final=0.25, total=100, warmup=10, cooldown=10)
    assert {schedules.density_at("constant", t, p) for t in (0, 5, 50, 1000)} == {0.25}


def test_registry_lists_the_schedules():
    assert {"constant", "cubic"} <= set(schedules.names())
    assert "Eq 5" in schedules.summary("cubic")
