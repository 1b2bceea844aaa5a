"""Wall-clock timing of one call for the benchmarks: the device drained before and after, so queued work counts."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

from pgolf.precision import synchronize

T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device | None = None, digits: int | None = None) -> tuple[T, float]:
    """(``fn()``, its seconds); ``device`` None for host-only work, ``digits`` to round the seconds."""
    if device is not None:
        synchronize(device)
    began = time.perf_counter()
    out = fn()
    if device is not None:
        synchronize(device)
    seconds = time.perf_counter() - began
    return out, seconds if digits is None else round(seconds, digits)
