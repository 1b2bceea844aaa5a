"""LQER factors of one matrix: their quantisation, storage entry and dense value.

The error correction of pgolf/quant/lqer.py is a low-rank product ``Â·B̂``
(A: rows × r, B: r × cols) stored beside the matrix's own integers; at load
``W = q·s + Â·B̂`` is materialised densely (docs/FRONTIER.md §4.4).

Two storage modes, both in int8 containers with fp16 scales:

- ``asym`` (B.numel a multiple of the group): A on the INT2 grid {−2, −1, 0, 1}
  with one scale for the matrix, s_A = max|A| / 1.5; B flattened row-major
  into groups of ``group`` consecutive values, each on the INT4 grid [−8, 7]
  with s_g = max|group| / 7.5. The scale is rounded to fp16 first and the
  values are rounded with the stored scale: q = clamp(round(x / s), lo, hi).
- ``sym`` (the fallback when B.numel is not a multiple of the group): A and B
  each symmetric per row at ``FALLBACK_BITS`` (±7), s_row = max|row| / 7.

A zero maximum gets scale 1 (all its values are 0 either way). This module
knows nothing of the artifact; pgolf/quant/artifact.py stores ``arrays()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pgolf.errors import DataError

MODES = ("asym", "sym")
A_RANGE = (-2, 1)  # INT2
B_RANGE = (-8, 7)  # INT4
A_DIVISOR, B_DIVISOR = 1.5, 7.5
FALLBACK_BITS = 4
FALLBACK_QMAX = (1 << (FALLBACK_BITS - 1)) - 1


@dataclass(frozen=True)
class LqerFactors:
    mode: str  # "asym" | "sym"
    group: int  # B's group (asym); the requested group, unused, for sym
    a_q: torch.Tensor  # int8 [rows, r]
    a_scale: torch.Tensor  # fp16 [1] (asym) or [rows] (sym)
    b_q: torch.Tensor  # int8 [r, cols]
    b_scale: torch.Tensor  # fp16 [r·cols / group] (asym) or [r] (sym)

    @property
    def rank(self) -> int:
        return int(self.a_q.shape[1])

    def arrays(self) -> tuple[torch.Tensor, ...]:
        """The stored arrays in file order."""
        return self.a_q, self.a_scale, self.b_q, self.b_scale

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays())

    def a_hat(self) -> torch.Tensor:
        if self.mode == "asym":
            return self.a_q.float() * self.a_scale.float()
        return self.a_q.float() * self.a_scale.float().unsqueeze(1)

    def b_hat(self) -> torch.Tensor:
        if self.mode == "asym":
            flat = self.b_q.float().reshape(-1, self.group) * self.b_scale.float().unsqueeze(1)
            return flat.reshape(self.b_q.shape)
        return self.b_q.float() * self.b_scale.float().unsqueeze(1)

    def dense(self) -> torch.Tensor:
        """Â·B̂ in float32 [rows, cols]."""
        return self.a_hat() @ self.b_hat()

    def entry(self, ref: Callable[[torch.Tensor], dict]) -> dict:
        """The index entry; ``ref`` places each array in the data section, in ``arrays()`` order."""
        a, a_s, b, b_s = (ref(t) for t in self.arrays())
        return {"mode": self.mode, "group": self.group, "a": a, "a_scale": a_s, "b": b, "b_scale": b_s}


def _fp16_scale(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    scale = (amax / divisor).to(torch.float16)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _grid(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(x.double() / scale.double()), lo, hi).to(torch.int8)


def quantize_factors(a: torch.Tensor, b: torch.Tensor, group: int) -> LqerFactors:
    """A [rows, r] and B [r, cols] (float) on the module docstring's grids."""
    a, b = a.double(), b.double()
    if b.numel() % group == 0:
        a_scale = _fp16_scale(a.abs().max().reshape(1), A_DIVISOR)
        groups = b.reshape(-1, group)
        b_scale = _fp16_scale(groups.abs().amax(dim=1), B_DIVISOR)
        return LqerFactors("asym", group, _grid(a, a_scale, *A_RANGE), a_scale,
                           _grid(groups, b_scale.unsqueeze(1), *B_RANGE).reshape(b.shape), b_scale)
    a_scale = _fp16_scale(a.abs().amax(dim=1), FALLBACK_QMAX)
    b_scale = _fp16_scale(b.abs().amax(dim=1), FALLBACK_QMAX)
    return LqerFactors("sym", group, _grid(a, a_scale.unsqueeze(1), -FALLBACK_QMAX, FALLBACK_QMAX), a_scale,
                       _grid(b, b_scale.unsqueeze(1), -FALLBACK_QMAX, FALLBACK_QMAX), b_scale)


def parse_factors(entry: Any, read: Callable[[Any], torch.Tensor], shape: list[int], at: str) -> LqerFactors:
    """The factors an index entry describes (``read`` turns a reference into its array); a bad one is a DataError."""
    if not isinstance(entry, dict) or entry.get("mode") not in MODES or len(shape) != 2:
        raise DataError(f"{at}: bad LQER entry {str(entry)[:80]}")
    group = entry.get("group")
    if not isinstance(group, int) or group < 1:
        raise DataError(f"{at}: bad LQER group {group!r}")
    a_q, a_s, b_q, b_s = (read(entry.get(k)) for k in ("a", "a_scale", "b", "b_scale"))
    rows, cols = shape
    if a_q.dtype != torch.int8 or b_q.dtype != torch.int8 or a_s.dtype != torch.float16 or b_s.dtype != torch.float16:
        raise DataError(f"{at}: LQER arrays must be int8 values with fp16 scales")
    if a_q.numel() % max(rows, 1) or (rows and a_q.numel() // rows * cols != b_q.numel()):
        raise DataError(f"{at}: LQER factors do not match shape {shape}")
    rank = a_q.numel() // rows if rows else 0
    a_q, b_q = a_q.reshape(rows, rank), b_q.reshape(rank, cols)
    asym = entry["mode"] == "asym"
    if asym:
        a_lo, a_hi, b_lo, b_hi = *A_RANGE, *B_RANGE
        want = (1, b_q.numel() // group)
        bad = b_q.numel() % group != 0
    else:
        a_lo, a_hi, b_lo, b_hi = -FALLBACK_QMAX, FALLBACK_QMAX, -FALLBACK_QMAX, FALLBACK_QMAX
        want, bad = (rows, rank), False
    if bad or (a_s.numel(), b_s.numel()) != want:
        raise DataError(f"{at}: LQER scales do not match the factors ({entry['mode']}, group {group})")
    for q, lo, hi, what in ((a_q, a_lo, a_hi, "A"), (b_q, b_lo, b_hi, "B")):
        if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
            raise DataError(f"{at}: LQER {what} values outside [{lo}, {hi}]")
    for s in (a_s, b_s):
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise DataError(f"{at}: LQER scales are not finite")
    return LqerFactors(entry["mode"], group, a_q, a_s, b_q, b_s)
