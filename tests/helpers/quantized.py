"""Quantised tensors for format and LQER tests: round to nearest per row (a valid tensor, not a good one)."""
from __future__ import annotations

import torch

from pgolf.quant.artifact import StoredTensor


def rtn_stored(name: str, w: torch.Tensor, bits: int = 6) -> StoredTensor:
    """``w`` [rows, cols] on the symmetric ``bits`` grid with fp16 row scales max|row| / qmax."""
    qmax = (1 << (bits - 1)) - 1
    s = (w.abs().amax(1) / qmax).to(torch.float16)
    q = torch.clamp(torch.round(w / s.float().unsqueeze(1)), -qmax, qmax).to(torch.int8)
    return StoredTensor(name, tuple(w.shape), "float32", "rtn", bits, q, s)
