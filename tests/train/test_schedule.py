"""LR warmdown (step and wall-clock forms) and Muon momentum warm-up."""
from __future__ import annotations

import pytest

from pgolf.train.schedule import momentum_warmup, warmdown_scale_by_steps, warmdown_scale_by_time


@pytest.mark.parametrize("total,warmdown", [(100, 30), (100, 100), (7, 1), (50, 0)])
def test_step_warmdown_starts_at_peak_and_ends_at_zero(total, warmdown):
    scales = [warmdown_scale_by_steps(t, total, warmdown) for t in range(total + 2)]
    assert scales[0] == 1.0
    assert scales[total] == 0.0 and scales[total + 1] == 0.0
    assert all(a >= b for a, b in zip(scales, scales[1:]))  # never increases
    # The line through 1 at step total − warmdown and 0 at step total (the records' convention,
    # so the window's first step is still at peak and warmdown − 1 steps run below it).
    assert sum(s < 1.0 for s in scales[:total]) == max(warmdown - 1, 0)
    for t in range(total - warmdown, total):
        assert scales[t] == pytest.approx((total - t) / warmdown)


def test_step_warmdown_longer_than_the_run_is_refused():
    # The records' failure (docs/RECIPE.md §3.3): a window longer than the run never reaches peak LR.
    with pytest.raises(ValueError, match="starts at peak"):
        warmdown_scale_by_steps(0, 2000, 3500)


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 1.0])
def test_time_warmdown_starts_at_peak_and_ends_at_zero(frac):
    cap = 600.0
    assert warmdown_scale_by_time(0.0, cap, frac) == 1.0
    assert warmdown_scale_by_time(cap, cap, frac) == 0.0
    assert warmdown_scale_by_time(cap + 5.0, cap, frac) == 0.0
    times = [cap * i / 1000 for i in range(1000)]
    scales = [warmdown_scale_by_time(t, cap, frac) for t in times]
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    if 0 < frac < 1:
        # Linear over the last frac of the cap: half-way through the window the scale is 0.5.
        assert warmdown_scale_by_time(cap * (1 - frac / 2), cap, frac) == pytest.approx(0.5)
        assert warmdown_scale_by_time(cap * (1 - frac) - 1e-6, cap, frac) == 1.0


def test_time_warmdown_rejects_bad_settings():
    with pytest.raises(ValueError, match="cap"):
        warmdown_scale_by_time(1.0, 0.0, 0.3)
    with pytest.raises(ValueError, match="warmdown_frac"):
        warmdown_scale_by_time(1.0, 600.0, 1.5)


def test_momentum_warmup_is_linear_then_flat():
    assert momentum_warmup(0, 0.92, 0.99, 1500) == pytest.approx(0.92)
    assert momentum_warmup(750, 0.92, 0.99, 1500) == pytest.approx(0.955)
    assert momentum_warmup(1500, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert momentum_warmup(9000, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert momentum_warmup(0, 0.92, 0.99, 0) == 0.99
