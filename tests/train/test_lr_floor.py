"""The warmdown's LR floor (frontier MIN_LR, docs/FRONTIER.md §3.3)."""
from __future__ import annotations

import pytest

from pgolf.train.schedule import warmdown_scale_by_steps, warmdown_scale_by_time


def frontier_lr_mul(f: float) -> float:
    """docs/FRONTIER.md §3.3 written out: 1 if f < 0.15 else max((1 − f)/0.85, 0.10)."""
    return 1.0 if f < 0.15 else max((1.0 - f) / 0.85, 0.10)


@pytest.mark.parametrize("f", [0.0, 0.1, 0.15, 0.3, 0.5, 0.9, 0.914, 0.915, 0.916, 0.95, 0.999, 1.0, 1.2])
def test_time_warmdown_with_floor_is_the_frontier_schedule(f):
    assert warmdown_scale_by_time(f * 600.0, 600.0, 0.85, floor=0.1) == pytest.approx(frontier_lr_mul(f), abs=1e-12)


def test_floor_holds_to_the_end_and_zero_floor_is_unchanged():
    assert warmdown_scale_by_time(599.9, 600.0, 0.85, floor=0.1) == 0.1
    assert warmdown_scale_by_time(600.0, 600.0, 0.85, floor=0.1) == 0.1
    assert warmdown_scale_by_time(599.9, 600.0, 0.85) == pytest.approx(0.1 / (0.85 * 600))
    assert warmdown_scale_by_time(600.0, 600.0, 0.85) == 0.0
    assert warmdown_scale_by_steps(95, 100, 50, floor=0.2) == 0.2
    assert warmdown_scale_by_steps(70, 100, 50, floor=0.2) == pytest.approx(0.6)
    assert warmdown_scale_by_steps(100, 100, 50, floor=0.2) == 0.2
    assert warmdown_scale_by_steps(95, 100, 50) == pytest.approx(0.1)


def test_floor_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="floor"):
        warmdown_scale_by_time(1.0, 10.0, 0.5, floor=1.5)
    with pytest.raises(ValueError, match="floor"):
        warmdown_scale_by_steps(1, 10, 5, floor=-0.1)
