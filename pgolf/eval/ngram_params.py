"""The n-gram tilt's params and the one place a scorer builds its tilt.

The tilt itself (pgolf/eval/ngram_tilt.py) is an optional module of the
submission bundle (pgolf/submission/optional.py): it is imported here, inside
:func:`build_tilt`, only when a section turns ``ngram_tilt`` on, so a run with
the tilt off never imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pgolf.config import check

if TYPE_CHECKING:
    from pgolf.eval.ngram_tilt import NgramTilt


@dataclass(frozen=True, kw_only=True)
class NgramTiltConfig:
    """The tilt params, shared by the ``eval_sliding`` and ``eval_ttt`` sections (off by default)."""

    ngram_tilt: bool = False        # tilt the scored distribution toward the stream's n-gram hint
    ngram_order: int = 16           # n: the context is the previous n - 1 tokens (P2135: 16)
    ngram_threshold: float = 0.8    # gate: top_count / total >= this (P2135: 0.8)
    ngram_beta: float = 2.625       # tilt strength β (P2135: 2.625)

    def __post_init__(self) -> None:
        check(self.ngram_order >= 2, "ngram_order", "must be >= 2 (a context of at least one token)")
        check(0.0 < self.ngram_threshold <= 1.0, "ngram_threshold", "must be in (0, 1]")
        check(math.isfinite(self.ngram_beta), "ngram_beta", "must be finite")


def build_tilt(tokens: torch.Tensor, cfg: NgramTiltConfig) -> NgramTilt | None:
    """The tilt of ``tokens`` (on their device) when ``cfg.ngram_tilt``, else None (nothing imported)."""
    if not cfg.ngram_tilt:
        return None
    from pgolf.eval.ngram_tilt import NgramTilt
    return NgramTilt.build(tokens, cfg)
