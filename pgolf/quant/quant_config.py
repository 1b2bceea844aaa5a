"""Section ``quantize`` of params.yaml: :class:`QuantizeConfig`, read by the quantize stage and the fit.

What each key does lives with its code: routing (pgolf/quant/routing.py), clip
rules (pgolf/quant/clip.py), GPTQ (pgolf/quant/gptq.py), AWQ-lite
(pgolf/quant/awq.py), the byte target (pgolf/quant/pruning.py,
pgolf/quant/bit_allocation.py) and the file (pgolf/quant/artifact.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pgolf.config import check
from pgolf.quant.grid import GridBits


@dataclass(frozen=True)
class QuantizeConfig:
    """Section ``quantize`` of params.yaml."""

    method: Literal["gptq", "rtn"]  # block matrices: full GPTQ or round-to-nearest
    damp: float  # λ in H += λ·mean(diag H)·I, applied once inside the solver
    block_size: int  # GPTQ columns per lazy-update block (speed only)
    act_order: bool  # GPTQ column order by descending diag H
    clip_candidates: tuple[float, ...]  # per-row |w| quantiles tried for block matrices (clip: search)
    clip_metric: Literal["weight_mse", "hessian"]  # how the best candidate is chosen
    attn_bits: int
    mlp_bits: int
    embed_bits: int
    embed_clip_quantile: float
    passthrough_numel: int  # tensors with at most this many values stay fp16
    compressor: Literal["zstd", "lzma", "brotli", "zpaq"]  # brotli/zpaq: grouped only, optional packages
    zstd_level: int
    lzma_preset: int
    prune: bool  # selective ±1 pruning down to the byte target (docs/RECIPE.md §4.6)
    prune_margin_bytes: int  # target = 16,000,000 − code bytes − this margin
    # Defaults only serve direct construction; params.yaml must still name every key.
    fit_to_limit: bool = False  # over the target: demote block matrices a bit at a time (pgolf/quant/bit_allocation.py)
    fit_min_bits: int = 5  # no block matrix is demoted below this many bits
    # docs/FRONTIER.md §4.1–§4.5; the defaults are today's behaviour.
    clip: Literal["search", "sdclip"] = "search"  # row scales: clip-candidate search or k·std(row)
    sdclip_k_attn: float = 13.0
    sdclip_k_mlp: float = 11.5
    sdclip_k_embed: float = 14.0
    embed_method: Literal["rtn", "gptq"] = "rtn"  # gptq: the tied embedding through GPTQ (needs hessians.head)
    gate_int8: bool = False  # attention gates int8 per row instead of fp16 passthrough
    awq_top_k: int = 0  # AWQ-lite: column groups kept at int8 model-wide (0 = off; needs hessians.activation_rms)
    awq_group_size: int = 64
    lqer_top_k: int = 0  # LQER on this many worst tensors (pgolf/quant/lqer.py); 0 = off
    lqer_rank: int = 4
    lqer_group: int = 64  # B's INT4 group
    compression: Literal["plain", "grouped"] = "plain"  # grouped: format 3 (pgolf/quant/grouped.py)

    def __post_init__(self) -> None:
        check(self.damp >= 0, "damp", "must be >= 0")
        check(self.block_size >= 1, "block_size", "must be >= 1")
        check(len(self.clip_candidates) >= 1, "clip_candidates", "needs at least one value")
        check(all(0 < p <= 1 for p in self.clip_candidates), "clip_candidates", "values must be in (0, 1]")
        GridBits(self.attn_bits, self.mlp_bits)  # checks both, as for late QAT
        check(2 <= self.embed_bits <= 8, "embed_bits", "must be in 2..8")
        check(0 < self.embed_clip_quantile <= 1, "embed_clip_quantile", "must be in (0, 1]")
        check(self.passthrough_numel >= 0, "passthrough_numel", "must be >= 0")
        check(1 <= self.zstd_level <= 22, "zstd_level", "must be in 1..22")
        check(0 <= self.lzma_preset <= 9, "lzma_preset", "must be in 0..9")
        check(self.prune_margin_bytes >= 0, "prune_margin_bytes", "must be >= 0")
        check(2 <= self.fit_min_bits <= 8, "fit_min_bits", "must be in 2..8")
        check(not self.fit_to_limit or self.fit_min_bits < max(self.attn_bits, self.mlp_bits), "fit_min_bits",
              f"must be below attn_bits ({self.attn_bits}) or mlp_bits ({self.mlp_bits}) when fit_to_limit "
              "is on, else no matrix could be demoted")
        check(self.clip in ("search", "sdclip"), "clip", "must be search or sdclip")
        for key in ("sdclip_k_attn", "sdclip_k_mlp", "sdclip_k_embed"):
            check(getattr(self, key) > 0, key, "must be > 0")
        check(self.embed_method in ("rtn", "gptq"), "embed_method", "must be rtn or gptq")
        check(self.awq_top_k >= 0, "awq_top_k", "must be >= 0")
        check(self.awq_group_size >= 1, "awq_group_size", "must be >= 1")
        check(self.awq_top_k == 0 or self.clip == "sdclip", "awq_top_k",
              "needs clip: sdclip (the protected columns' range is k·std(row), docs/FRONTIER.md §4.5)")
        check(self.awq_top_k == 0 or self.method == "gptq", "awq_top_k", "needs method: gptq")
        check(self.lqer_top_k >= 0, "lqer_top_k", "must be >= 0 (0 = off)")
        check(self.lqer_rank >= 1, "lqer_rank", "must be >= 1")
        check(self.lqer_group >= 1, "lqer_group", "must be >= 1")
        if self.compression != "plain" or self.compressor not in ("zstd", "lzma"):  # else nothing to check there,
            from pgolf.quant.compression import check_compression  # and a bundle may leave the module out
            check_compression(self.compression, self.compressor)

    @property
    def grid_bits(self) -> GridBits:
        """The block matrices' bits per class, the setting late QAT shares."""
        return GridBits(self.attn_bits, self.mlp_bits)

    @property
    def compression_level(self) -> int:
        return self.zstd_level if self.compressor == "zstd" else self.lzma_preset


# The frontier keys: recorded in the artifact's meta only when set away from their
# default, so a run with them off writes the same bytes as before they existed.
FRONTIER_KEYS = ("clip", "sdclip_k_attn", "sdclip_k_mlp", "sdclip_k_embed", "embed_method", "gate_int8",
                 "awq_top_k", "awq_group_size", "lqer_top_k", "lqer_rank", "lqer_group", "compression")


def frontier_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(QuantizeConfig) if f.name in FRONTIER_KEYS}
