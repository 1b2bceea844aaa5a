"""Row scales of the block matrices: the clip-candidate search's and SDClip's.

``search`` (docs/RECIPE.md §4.3): each candidate ``p`` clips row r at the
p-quantile of |W_r| (linear interpolation, as ``torch.quantile``), scale =
clip/qmax on the fp16 grid; pgolf/quant/policy.py keeps the candidate with
the lowest matrix error.

``sdclip`` (docs/FRONTIER.md §4.3): one candidate, ``s_r = k·std(W_r)/qmax``
with the unbiased standard deviation of the original row and a per-class k
(``quantize.sdclip_k_attn``/``_mlp``/``_embed``), so the grid spans ±k·σ_row
and values beyond are clamped. Both round the scale to fp16 exactly as the
artifact stores it (pgolf/quant/grid.py).
"""
from __future__ import annotations

import torch

from pgolf.quant.grid import PROTECTED_BITS, row_scales


def row_quantiles(abs_w: torch.Tensor, probs: tuple[float, ...]) -> torch.Tensor:
    """Per-row linear-interpolation quantiles, as ``torch.quantile`` defines them.

    abs_w: [..., R, N] → [..., C, R] for the C probabilities. One sort serves
    all candidates (``torch.quantile`` also caps its input size).
    """
    ordered = torch.sort(abs_w, dim=-1).values
    n = abs_w.shape[-1]
    out = []
    for p in probs:
        pos = p * (n - 1)
        lo = min(int(pos), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(ordered[..., lo] + frac * (ordered[..., hi] - ordered[..., lo]))
    return torch.stack(out, dim=-2)


def candidate_scales(w: torch.Tensor, bits: int, probs: tuple[float, ...]) -> torch.Tensor:
    """fp16-grid scales [..., C, R] for w [..., R, N], one row of scales per clip candidate."""
    clips = row_quantiles(w.abs().float(), probs)
    return row_scales(w.unsqueeze(-3), bits, clip=clips)


def sdclip_range(w: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """The grid's half-range k·std(W_r) per row: w [..., R, N], k scalar or [...] → [..., R] float32."""
    k = torch.as_tensor(k, dtype=torch.float32, device=w.device)
    std = w.float().std(dim=-1, correction=1) if w.shape[-1] > 1 else torch.zeros(w.shape[:-1], device=w.device)
    return k.reshape(k.shape + (1,)) * std if k.dim() else k * std


def sdclip_scales(w: torch.Tensor, bits: int, k: torch.Tensor | float) -> torch.Tensor:
    """SDClip scales [..., 1, R] (one candidate) for w [..., R, N] on the fp16 grid."""
    return row_scales(w.unsqueeze(-3), bits, clip=sdclip_range(w, k).unsqueeze(-2))


def protected_scales(w: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """AWQ-lite's scales [..., 1, R] for protected columns: k·std(W_r)/127 on the fp16 grid."""
    return sdclip_scales(w, PROTECTED_BITS, k)

