"""The symmetric per-row integer grid shared by late QAT, GPTQ and packing.

One definition of the grid keeps training-time fake quantisation and the
exported integers identical (the records clamped QAT to [-32, 31] but exported
on [-31, 31]). A ``bits``-bit tensor stores integers in [-qmax, qmax] with
``qmax = 2**(bits-1) - 1`` in an int8 container, and one fp16 scale per row.

The bits of each block-matrix class (:class:`GridBits`: ``quantize.attn_bits``,
``quantize.mlp_bits``) are one setting, read by the quantize stage and by
training's late QAT alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch

from pgolf.config import check, from_params
from pgolf.errors import ParamError

GRID_SECTION = "quantize"  # the params section that holds GridBits' keys

# Scales are stored as fp16; the floor keeps an all-zero row from dividing by 0
# while staying far below any scale a trained row produces.
SCALE_FLOOR = 2.0 ** -24
PROTECTED_BITS = 8  # AWQ-lite's protected columns' grid (pgolf.quant.protected)


@dataclass(frozen=True)
class GridBits:
    """The grid's bits per block-matrix class (pgolf.model.layout.BLOCK_CLASSES)."""

    attn_bits: int
    mlp_bits: int

    def __post_init__(self) -> None:
        for key in ("attn_bits", "mlp_bits"):
            check(2 <= getattr(self, key) <= 8, key, "must be in 2..8")

    def by_class(self) -> dict[str, int]:
        return {"attn": self.attn_bits, "mlp": self.mlp_bits}


def grid_bits_from_params(params: Mapping) -> GridBits:
    """Just GridBits' keys of the ``quantize`` section (late QAT reads no other quantize key)."""
    section = params.get(GRID_SECTION)
    if not isinstance(section, Mapping):
        raise ParamError(GRID_SECTION, "missing section")
    keys = [f.name for f in dataclasses.fields(GridBits)]
    return from_params(GridBits, {GRID_SECTION: {k: section[k] for k in keys if k in section}}, GRID_SECTION)


def qmax_for_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


def round_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest fp16 value (ties to even), as float32.

    Equals ``x.to(float16).to(float32)`` for |x| <= 65504, but is written with
    integer bit operations: torch.compile's inductor drops an fp32→fp16→fp32
    cast pair as redundant (unless ``emulate_precision_casts``), which made
    compiled late-QAT scales differ from the exported ones.
    """
    x = x.float()
    bits = x.view(torch.int32)
    # Drop the 13 low mantissa bits of fp32 (23 → fp16's 10), rounding half to even.
    lsb = (bits >> 13) & 1
    normal = ((bits + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)
    # Below fp16's smallest normal (2^-14) the spacing is fixed at 2^-24.
    subnormal = torch.round(x * 2.0 ** 24) * 2.0 ** -24
    return torch.where(x.abs() < 2.0 ** -14, subnormal, normal)


def row_scales(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None,
               scale_floor: float = SCALE_FLOOR) -> torch.Tensor:
    """Per-row scale ``fp16(max(clip_r / qmax, floor))`` returned as float32.

    ``w`` is (..., rows, cols); ``clip`` defaults to the row's max |w|.
    Rounding through fp16 makes the scale exactly what the artifact stores.
    """
    qmax = qmax_for_bits(bits)
    if clip is None:
        clip = w.detach().abs().amax(dim=-1)
    scale = torch.clamp(clip.float() / qmax, min=scale_floor)
    return round_to_fp16(scale)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``clamp(round(w / s), -qmax, qmax)`` as int8 (scale per row)."""
    qmax = qmax_for_bits(bits)
    q = torch.round(w.float() / scale.unsqueeze(-1))
    return q.clamp_(-qmax, qmax).to(torch.int8)


def dequantize_grid(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def fake_quantize_ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Straight-through fake quantisation on the export grid (row-max clip).

    Forward value is the dequantised weight; the gradient passes to ``w`` as
    if the rounding were the identity.
    """
    scale = row_scales(w, bits)
    qmax = qmax_for_bits(bits)
    wq = torch.clamp(torch.round(w / scale.unsqueeze(-1).to(w.dtype)), -qmax, qmax) * scale.unsqueeze(-1).to(w.dtype)
    return w + (wq - w).detach()
