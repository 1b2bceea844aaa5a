"""Learning-rate warmdown, Muon momentum warm-up, and what switches at fractions of the run.

There is no LR warm-up (docs/RECIPE.md §3.3): the scale is 1 until the warmdown
window, then falls linearly to 0 at the end of the run. Two ways to place the
window:

* step count: the last ``warmdown_steps`` of ``total_steps``;
* wall clock: the last ``warmdown_frac`` of the training-time cap.

The records' third form, ``warmdown_ms = WARMDOWN_ITERS × measured ms/step``,
is deliberately not offered: when steps are slower than planned the window is
longer than the run and the LR never reaches its peak (PR #960 started at
scale ≈ 0.57; docs/RECIPE.md §3.3 and §6.9). Both forms here give scale exactly 1 at
the start whenever the window fits in the run, and refuse a window that does
not fit instead of silently starting below peak.

``floor`` (the frontier's ``MIN_LR``, docs/FRONTIER.md §3.3) keeps the scale at or
above a minimum: ``max(line, floor)``, so with ``warmdown_frac`` 0.85 and
floor 0.1 the LR falls linearly from 15 % of the cap until the line meets 0.1
(at 91.5 %) and stays there to the end. Floor 0 is the plain decay to 0.
"""
from __future__ import annotations

import math


def _check_floor(floor: float) -> None:
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"the LR floor must be in [0, 1], got {floor}")


def _linear_to_floor(remaining: float, warmdown: float, floor: float) -> float:
    """1 while ``remaining`` ≥ ``warmdown``, then ``remaining / warmdown`` held at ``floor``; ``floor`` once
    nothing remains (both warmdown forms: in steps and in seconds)."""
    if remaining <= 0:
        return floor
    if remaining >= warmdown:
        return 1.0
    return max(remaining / warmdown, floor)


def warmdown_scale_by_steps(step: int, total_steps: int, warmdown_steps: int, floor: float = 0.0) -> float:
    """LR scale for optimizer step ``step`` (0-based) of ``total_steps``.

    The line through 1 at step ``total_steps − warmdown_steps`` and 0 at step
    ``total_steps`` (the records' convention): 1 before the window, then
    ``(total_steps − step) / warmdown_steps``, so the last step uses
    ``1/warmdown_steps``; 0 from ``total_steps`` on.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmdown_steps <= total_steps:
        raise ValueError(f"warmdown_steps must be in [0, total_steps={total_steps}] so the run "
                         f"starts at peak LR, got {warmdown_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_floor(floor)
    return _linear_to_floor(total_steps - step, warmdown_steps, floor)


def warmdown_scale_by_time(elapsed_s: float, cap_s: float, warmdown_frac: float, floor: float = 0.0) -> float:
    """LR scale after ``elapsed_s`` seconds of training under a ``cap_s`` cap.

    ``warmdown = warmdown_frac × cap_s``; scale = 1 while the remaining time is
    at least ``warmdown``, then ``remaining / warmdown``, and 0 at the cap.
    """
    if not (cap_s > 0 and math.isfinite(cap_s)):
        raise ValueError(f"the wall-clock warmdown needs a finite cap > 0 seconds, got {cap_s}")
    if not 0.0 <= warmdown_frac <= 1.0:
        raise ValueError(f"warmdown_frac must be in [0, 1], got {warmdown_frac}")
    if elapsed_s < 0:
        raise ValueError(f"elapsed_s must be >= 0, got {elapsed_s}")
    _check_floor(floor)
    return _linear_to_floor(cap_s - elapsed_s, warmdown_frac * cap_s, floor)


def momentum_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """``μ(t) = start + (end − start)·min(t / T, 1)``; ``T = 0`` means ``end`` from step 0."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return end
    return start + (end - start) * min(max(step, 0) / warmup_steps, 1.0)


def run_progress(step: int, max_steps: int, elapsed_s: float, cap_s: float) -> float:
    """The run's progress before optimizer step ``step`` (0-based): ``elapsed_s / cap_s`` under a
    wall-clock cap, else ``step / max_steps``."""
    return elapsed_s / cap_s if cap_s > 0 else step / max_steps


def recurrence_on(step: int, max_steps: int, elapsed_s: float, cap_s: float, start_frac: float) -> bool:
    """Whether depth recurrence runs in optimizer step ``step`` (0-based).

    On once :func:`run_progress` ≥ ``start_frac`` (the frontier's switch at
    35 % of the clock, docs/FRONTIER.md §2.3; from step
    ``ceil(start_frac · max_steps)`` in the step form).
    """
    return run_progress(step, max_steps, elapsed_s, cap_s) >= start_frac


def parse_seq_len_schedule(entries: tuple[str, ...] | list[str]) -> tuple[tuple[int, float], ...]:
    """``["1024@0.1", "2048@0.7", "3072@1.0"]`` → ``((1024, 0.1), (2048, 0.7), (3072, 1.0))``.

    Progressive context (docs/FRONTIER.md §3.3, P2014's ``TRAIN_SEQ_SCHEDULE``):
    entry ``L@f`` means length L while the run's progress is ≤ f. Fractions
    must rise strictly and the last must be 1; lengths are ≥ 1. Raises
    ValueError naming the bad entry. Empty = off.
    """
    schedule = []
    for entry in entries:
        length, sep, frac = str(entry).partition("@")
        try:
            parsed = (int(length), float(frac))
        except ValueError:
            parsed = None
        if not sep or parsed is None or parsed[0] < 1 or not 0 < parsed[1] <= 1:
            raise ValueError(f"entry {entry!r} is not LENGTH@FRACTION with LENGTH >= 1 and 0 < FRACTION <= 1")
        if schedule and parsed[1] <= schedule[-1][1]:
            raise ValueError(f"entry {entry!r}: fractions must rise strictly")
        schedule.append(parsed)
    if schedule and schedule[-1][1] != 1.0:
        raise ValueError(f"the last entry {entries[-1]!r} must end at fraction 1 (the whole run)")
    return tuple(schedule)


def scheduled_seq_len(schedule: tuple[tuple[int, float], ...], progress: float) -> int:
    """The length for a run at ``progress``: the first ``L@f`` with progress ≤ f (the last past the end).

    P2014's ``1024@0.100,2048@0.700,3072@1.000``: 1024 for f ≤ 0.10, 2048 for
    f ≤ 0.70, then 3072.
    """
    for length, frac in schedule:
        if progress <= frac:
            return length
    return schedule[-1][0]


def seq_change_ramp(step: int, changed_at: int | None, warmup_steps: int) -> float:
    """LR factor after a context-length change at step ``changed_at``: ``(step − changed_at + 1) / W``
    for the W = ``warmup_steps`` steps from the change, else 1 (P2014's ``SEQ_CHANGE_WARMUP_STEPS``)."""
    if changed_at is None or not 0 <= step - changed_at < warmup_steps:
        return 1.0
    return (step - changed_at + 1) / warmup_steps
