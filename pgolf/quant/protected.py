"""AWQ-lite's stored extra for one quantised tensor: the int8 column groups (docs/FRONTIER.md §4.5).

The artifact (pgolf/quant/artifact.py) holds, after a tensor's integers and
row scales, its group starts (int16 [k]) and one fp16 scale per row for the
protected columns, plus the group size in the index. Those columns' integers
lie in [-127, 127] on that finer grid; all others keep the tensor's own grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pgolf.errors import DataError
from pgolf.quant.grid import PROTECTED_BITS, dequantize_grid, qmax_for_bits

PROTECTED_QMAX = qmax_for_bits(PROTECTED_BITS)


@dataclass(frozen=True)
class ProtectedColumns:
    """int16 ``starts`` [k], ``size`` columns per group, fp16 ``scale`` [rows]."""

    starts: torch.Tensor
    size: int
    scale: torch.Tensor

    def mask(self, cols: int) -> torch.Tensor:
        """bool [cols]: True on the protected columns."""
        mask = torch.zeros(cols, dtype=torch.bool)
        for start in self.starts.tolist():
            mask[start:start + self.size] = True
        return mask

    def dequantize(self, q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` (q·s, [rows, cols]) with the protected columns re-read on their own scale."""
        mask = self.mask(q.shape[1])
        out = value.clone()
        out[:, mask] = dequantize_grid(q[:, mask], self.scale)
        return out


def parse_protected(spec: Any, read_array: Callable[[Any], torch.Tensor], at: str,
                    q: torch.Tensor) -> ProtectedColumns:
    """An index entry's ``protect`` block, checked against its integers q [rows, cols]."""
    rows, cols = q.shape
    size = spec.get("size") if isinstance(spec, dict) else None
    if not (isinstance(size, int) and 1 <= size <= cols):
        raise DataError(f"{at}: bad protected group {str(spec)[:80]}")
    starts, scale = read_array(spec.get("starts")), read_array(spec.get("scale"))
    if starts.dtype != torch.int16 or scale.dtype != torch.float16 or scale.numel() != rows:
        raise DataError(f"{at}: protected group arrays do not match {rows} rows")
    if starts.numel() and (int(starts.min()) < 0 or int(starts.max()) + size > cols):
        raise DataError(f"{at}: protected group starts {starts.tolist()} fall outside {cols} columns")
    if not bool(torch.isfinite(scale).all()):
        raise DataError(f"{at}: protected scales are not finite")
    protect = ProtectedColumns(starts=starts, size=size, scale=scale)
    fine = q[:, protect.mask(cols)]
    if fine.numel() and int(fine.min()) < -PROTECTED_QMAX:
        raise DataError(f"{at}: protected integers exceed ±{PROTECTED_QMAX}")
    return protect
