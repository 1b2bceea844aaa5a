"""Partial rotary position embedding with one fixed base.

Only the first ``rope_dims`` of each head are rotated; the rest carry
position-free content. The rotated dims are split into two halves and dim
``i`` is paired with dim ``i + rope_dims/2``, rotated by ``pos * base^(-2i/rope_dims)``.

The base is a plain constant used identically in training, evaluation and
autoregressive sampling. The records instead rescale the base with the
sequence length (an NTK rule anchored at a hard-coded 1024), which makes the
effective base ≈22,082 at T=2048 but length-dependent during generation; we
do not reproduce that quirk (docs/RECIPE.md §2.3, §6.11).
"""
from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, rope_dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, rope_dims/2] fp32, for integer ``positions`` [T]."""
    half = rope_dims // 2
    exponents = torch.arange(half, dtype=torch.float32, device=positions.device) * (2.0 / max(rope_dims, 1))
    inv_freq = torch.pow(torch.tensor(float(base), dtype=torch.float32, device=positions.device), -exponents)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dims [0, 2·cos.shape[-1]) of ``x`` [B, T, heads, head_dim]; keep the rest.

    Tables are cast to ``x.dtype`` so a bf16 activation is not promoted to fp32.
    """
    half = cos.shape[-1]
    if half == 0:
        return x
    cos = cos.to(x.dtype)[None, :, None, :]
    sin = sin.to(x.dtype)[None, :, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:2 * half]
    rotated = (x1 * cos - x2 * sin, x1 * sin + x2 * cos)
    return torch.cat((*rotated, x[..., 2 * half:]), dim=-1)
