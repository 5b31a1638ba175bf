"""Tests of the learning-rate schedules every job uses (vqkit.runtime.schedule)."""

from __future__ import annotations

import math

import pytest

from vqkit.runtime.schedule import Schedule, lr_factor


def test_constant_schedule_is_exactly_one():
    for step in (0, 1, 99, 10**6):
        assert lr_factor(step, total_steps=100) == 1.0


def test_warmup_then_cosine_matches_the_closed_form():
    total, warm, r = 110, 10, 0.1
    for step in range(total):
        f = lr_factor(step, total_steps=total, warmup_steps=warm, schedule="cosine", min_lr_ratio=r)
        if step < warm:
            want = (step + 1) / warm
        else:
            want = r + (1 - r) * (1 + math.cos(math.pi * (step - warm) / (total - warm))) / 2
        assert f == pytest.approx(want, rel=1e-12, abs=1e-15), step
    # continuous at the end of the warmup, ends near the floor, clamped past the end
    assert lr_factor(warm, total_steps=total, warmup_steps=warm, schedule="cosine") == 1.0
    assert lr_factor(
        total - 1, total_steps=total, warmup_steps=warm, schedule="cosine", min_lr_ratio=r
    ) == pytest.approx(r, abs=3e-3)
    assert lr_factor(10 * total, total_steps=total, schedule="cosine", min_lr_ratio=r) == r
    assert lr_factor(3, total_steps=total, warmup_steps=warm) == 0.4  # warmup, then constant
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=1, schedule="linear")


def test_schedule_warms_up_then_follows_its_kind():
    s = Schedule(total_steps=110, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert [s.lr(1.0, k) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3], abs=1e-15)
    assert s.lr(1.0, 9) == 1.0 and s.lr(1.0, 10) == 1.0  # end of warm-up: the peak
    assert math.isclose(s.lr(2.0, 60), 1.1)  # half way down the cosine: 2 * (1 + 0.1) / 2
    assert math.isclose(s.lr(1.0, 110), 0.1) and math.isclose(s.lr(1.0, 500), 0.1)
    assert Schedule(total_steps=5).lr(0.3, 4) == 0.3  # constant: the base rate exactly
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule(total_steps=5, kind="linear")
