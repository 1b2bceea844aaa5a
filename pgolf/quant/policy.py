"""Per-tensor quantisation policy: which tensor gets which grid, method and clip.

Applied to the *unbanked* state dict (conventional 2-D names, docs/RECIPE.md §4.1),
first matching rule wins:

1. not floating point, or ``numel <= passthrough_numel`` → passthrough (floats
   stored as fp16);
2. block matrices of class ``attn`` (pgolf/model/layout.py:
   ``blocks.{i}.attn.{c_q,c_k,c_v,proj}.weight``) → ``attn_bits`` per row;
3. block matrices of class ``mlp`` (``blocks.{i}.mlp.{fc,proj}.weight``) → ``mlp_bits`` per row;
4. anything else (embeddings) → ``embed_bits`` per row with the
   ``embed_clip_quantile`` clip (docs/RECIPE.md §4.4), round to nearest.

Block matrices (2, 3) are rounded with full GPTQ (``method: gptq``) or plain
round-to-nearest (``rtn``). Both search ``clip_candidates``: each candidate
``p`` sets row scales from the p-quantile of |w| per row, and the candidate
with the lowest error for the whole matrix wins, where the error is the
weight MSE or the Hessian-weighted ``tr((W−Ŵ) H (W−Ŵ)ᵀ) / tokens`` (the mean
squared output error per token) as ``clip_metric`` says.
``quantize_block_matrices`` runs that for any widths, so pgolf/quant/bit_allocation.py
can demote matrices (``fit_to_limit``) with the very same machinery.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch

from pgolf.quant.artifact import StoredTensor, dtype_name
from pgolf.quant.compression import check_compression
from pgolf.quant.lqer_factors import check_lqer
from pgolf.config import check
from pgolf.errors import DataError
from pgolf.quant.gptq import FALLBACK_MORE_DAMPING, FALLBACK_ROUND_TO_NEAREST, gptq_quantize
from pgolf.model.layout import block_weight
from pgolf.quant.hessian_file import hessian_key_for_weight
from pgolf.progress import Progress
from pgolf.quant.grid import SCALE_FLOOR, GridBits, quantize_to_grid, row_scales


@dataclass(frozen=True)
class QuantizeConfig:
    """Section ``quantize`` of params.yaml."""

    method: Literal["gptq", "rtn"]  # block matrices: full GPTQ or round-to-nearest
    damp: float  # λ in H += λ·mean(diag H)·I, applied once inside the solver
    block_size: int  # GPTQ columns per lazy-update block (speed only)
    act_order: bool  # GPTQ column order by descending diag H
    clip_candidates: tuple[float, ...]  # per-row |w| quantiles tried for block matrices
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
    # Defaults only serve direct construction; params.yaml must still name both keys.
    fit_to_limit: bool = False  # over the target: demote block matrices a bit at a time (pgolf/quant/bit_allocation.py)
    fit_min_bits: int = 5  # no block matrix is demoted below this many bits
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
        check_lqer(self.lqer_top_k, self.lqer_rank, self.lqer_group)
        check_compression(self.compression, self.compressor)
        check(not self.fit_to_limit or self.fit_min_bits < max(self.attn_bits, self.mlp_bits), "fit_min_bits",
              f"must be below attn_bits ({self.attn_bits}) or mlp_bits ({self.mlp_bits}) when fit_to_limit "
              "is on, else no matrix could be demoted")

    @property
    def grid_bits(self) -> GridBits:
        """The block matrices' bits per class, the setting late QAT shares."""
        return GridBits(self.attn_bits, self.mlp_bits)

    @property
    def compression_level(self) -> int:
        return self.zstd_level if self.compressor == "zstd" else self.lzma_preset


@dataclass(frozen=True)
class QuantizeResult:
    tensors: list[StoredTensor]
    report: list[dict]
    fallbacks: dict[str, int]


def tensor_class(name: str, tensor: torch.Tensor, cfg: QuantizeConfig) -> str:
    """``passthrough``, ``attn``, ``mlp`` or ``embed`` (module docstring's rules)."""
    if not tensor.is_floating_point() or tensor.numel() <= cfg.passthrough_numel:
        return "passthrough"
    found = block_weight(name)
    if found is not None and tensor.dim() == 2:
        return found[1].cls
    return "embed"


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


def _matrix_errors(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                   h: torch.Tensor | None, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight MSE [B, C] and Hessian-weighted error per token [B, C] (None without H)."""
    mse, hess = [], []
    for c in range(q.shape[1]):
        diff = w - q[:, c].float() * scales[:, c].unsqueeze(-1)
        mse.append(diff.double().pow(2).mean(dim=(-2, -1)))
        if h is not None:
            proj = (diff.double() @ h.double()) * diff.double()
            hess.append(proj.sum(dim=(-2, -1)) / max(num_tokens, 1))
    return torch.stack(mse, 1), (torch.stack(hess, 1) if h is not None else None)


def _report_row(name: str, t: torch.Tensor, cls: str, stored: StoredTensor, clip: float | None,
                mse: float, hess: float | None, fallback: str) -> dict:
    row = {"name": name, "shape": list(t.shape), "class": cls, "method": stored.method,
           "bits": stored.bits, "clip": clip, "weight_mse": mse, "hessian_error": hess,
           "fallback": fallback, "stored_bytes": stored.stored_bytes()}
    if stored.quantized:
        s = stored.scale.float()
        row.update(scale_min=float(s.min()), scale_mean=float(s.mean()), scale_max=float(s.max()),
                   rows_at_scale_floor=int((s <= SCALE_FLOOR).sum()))
    return row


def _quantize_matrix_group(names: list[str], weights: list[torch.Tensor], hessians: list[torch.Tensor] | None,
                           bits: int, num_tokens: int, cfg: QuantizeConfig, device: torch.device,
                           fallbacks: dict[str, int]) -> list[tuple[StoredTensor, dict]]:
    """Quantise same-shape matrices in one batch; returns (stored, report row) per matrix."""
    w = torch.stack([t.to(device=device, dtype=torch.float32) for t in weights])
    h = torch.stack([x.to(device=device, dtype=torch.float32) for x in hessians]) if hessians else None
    scales = candidate_scales(w, bits, cfg.clip_candidates)
    codes = torch.zeros(len(names), dtype=torch.int64)
    if cfg.method == "gptq":
        out = gptq_quantize(w, h, scales, bits, damp=cfg.damp, block_size=cfg.block_size,
                            act_order=cfg.act_order)
        q, codes = out.q, out.fallback.cpu()
    else:
        q = quantize_to_grid(w.unsqueeze(1), scales, bits)
    mse, hess = _matrix_errors(w, q, scales, h, num_tokens)
    score = hess if cfg.clip_metric == "hessian" else mse
    best = torch.argmin(score, dim=1).cpu()
    results = []
    for b, name in enumerate(names):
        c = int(best[b])
        code = int(codes[b])
        fallback = {FALLBACK_MORE_DAMPING: "more_damping", FALLBACK_ROUND_TO_NEAREST: "round_to_nearest"}.get(code, "none")
        if fallback != "none":
            fallbacks[fallback] += 1
        method = cfg.method if fallback != "round_to_nearest" else "rtn"
        stored = StoredTensor(name=name, shape=tuple(weights[b].shape), dtype=dtype_name(weights[b].dtype),
                              method=method, bits=bits, q=q[b, c].cpu().contiguous(),
                              scale=scales[b, c].to(torch.float16).cpu().contiguous())
        row = _report_row(name, weights[b], "", stored, cfg.clip_candidates[c], float(mse[b, c]),
                          None if hess is None else float(hess[b, c]), fallback)
        results.append((stored, row))
    return results


def _quantize_embedding(name: str, t: torch.Tensor, cfg: QuantizeConfig) -> tuple[StoredTensor, dict]:
    w = t.float().reshape(t.shape[0], -1) if t.dim() == 2 else t.float().reshape(1, -1)
    clip = row_quantiles(w.abs(), (cfg.embed_clip_quantile,))[0]
    scale = row_scales(w, cfg.embed_bits, clip=clip)
    q = quantize_to_grid(w, scale, cfg.embed_bits)
    mse = float((w.double() - q.double() * scale.double().unsqueeze(-1)).pow(2).mean())
    stored = StoredTensor(name=name, shape=tuple(t.shape), dtype=dtype_name(t.dtype), method="rtn",
                          bits=cfg.embed_bits, q=q, scale=scale.to(torch.float16))
    return stored, _report_row(name, t, "embed", stored, cfg.embed_clip_quantile, mse, None, "none")


def _passthrough(name: str, t: torch.Tensor) -> tuple[StoredTensor, dict]:
    raw = t.detach().cpu()
    raw = raw.to(torch.float16) if raw.is_floating_point() else raw
    stored = StoredTensor(name=name, shape=tuple(t.shape), dtype=dtype_name(t.dtype),
                          method="passthrough", raw=raw.contiguous())
    mse = float((t.detach().cpu().double() - raw.double()).pow(2).mean()) if t.numel() else 0.0
    return stored, _report_row(name, t, "passthrough", stored, None, mse, None, "none")


def _hessian_for(name: str, width: int, hessians: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    key = hessian_key_for_weight(name)
    h = hessians.get(key)
    if h is None:
        raise DataError(f"{source}: no Hessian {key!r} for {name}")
    if tuple(h.shape) != (width, width):
        raise DataError(f"{source}: Hessian {key!r} has shape {tuple(h.shape)}, {name} needs ({width}, {width})")
    return h


def quantize_block_matrices(state: Mapping[str, torch.Tensor], bits_of: Mapping[str, int],
                            hessians: Mapping[str, torch.Tensor], num_tokens: int, cfg: QuantizeConfig,
                            device: torch.device, hessian_source: str = "hessians",
                            progress: Progress | None = None,
                            fallbacks: dict[str, int] | None = None) -> dict[str, tuple[StoredTensor, dict]]:
    """GPTQ/RTN of the block matrices named in ``bits_of`` at those bit widths.

    Same-shape, same-width matrices are quantised in one batch; returns
    (stored tensor, report row) per name. ``fallbacks`` (if given) counts the
    Cholesky fallbacks; ``progress`` (already started) advances per batch.
    """
    need_h = cfg.method == "gptq" or cfg.clip_metric == "hessian"
    fallbacks = {"more_damping": 0, "round_to_nearest": 0} if fallbacks is None else fallbacks
    groups: dict[tuple, list[str]] = {}
    for name in sorted(bits_of):
        groups.setdefault((tuple(state[name].shape), bits_of[name]), []).append(name)
    done: dict[str, tuple[StoredTensor, dict]] = {}
    for (shape, bits), names in sorted(groups.items()):
        # Hessians also feed the report's Hessian-weighted error when available.
        hs = None
        if need_h or all(hessian_key_for_weight(n) in hessians for n in names):
            hs = [_hessian_for(name, shape[1], hessians, hessian_source) for name in names]
        for name, (stored, row) in zip(names, _quantize_matrix_group(
                names, [state[n] for n in names], hs, bits, num_tokens, cfg, device, fallbacks)):
            row["class"] = tensor_class(name, state[name], cfg)
            done[name] = (stored, row)
        if progress is not None:
            progress.advance(len(names))
    return done


def quantize_state_dict(state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                        num_tokens: int, cfg: QuantizeConfig, device: torch.device,
                        hessian_source: str = "hessians", progress: Progress | None = None) -> QuantizeResult:
    """Quantise an unbanked state dict; tensors come back in sorted name order.

    ``hessians`` maps ``pgolf.quant.hessian_file`` keys to raw (undamped) H; block
    matrices need theirs when GPTQ or the Hessian metric is used, and a
    missing or mis-shaped one is a DataError naming ``hessian_source``.
    ``progress`` counts block matrices, advancing per same-shape group.
    """
    class_bits = cfg.grid_bits.by_class()
    bits_of: dict[str, int] = {}
    done: dict[str, tuple[StoredTensor, dict]] = {}
    for name in sorted(state):
        t = state[name]
        cls = tensor_class(name, t, cfg)
        if cls == "passthrough":
            done[name] = _passthrough(name, t)
        elif cls == "embed":
            done[name] = _quantize_embedding(name, t, cfg)
        else:
            bits_of[name] = class_bits[cls]
    fallbacks = {"more_damping": 0, "round_to_nearest": 0}
    if progress is not None:
        progress.start(f"quantize ({cfg.method})", len(bits_of), "matrices")
    done.update(quantize_block_matrices(state, bits_of, hessians, num_tokens, cfg, device, hessian_source,
                                        progress, fallbacks))
    ordered = [done[name] for name in sorted(done)]
    return QuantizeResult(tensors=[s for s, _ in ordered], report=[r for _, r in ordered],
                          fallbacks=fallbacks)


@dataclass(frozen=True)
class PruneOutcome:
    tensors: list[StoredTensor]
    candidates: int  # block-matrix entries with |q| = 1
    pruned: int  # how many of them were zeroed
    target_bytes: int
    size_bytes: int  # encoded size of ``tensors``
    fits: bool
    probes: int  # encodings tried


def _zero_cheapest(tensors: list[StoredTensor], owner: torch.Tensor, flat: torch.Tensor,
                   count: int) -> list[StoredTensor]:
    """Copy of ``tensors`` with the first ``count`` (owner, flat index) entries set to 0."""
    out = list(tensors)
    chosen_owner, chosen_flat = owner[:count], flat[:count]
    for i in torch.unique(chosen_owner).tolist():
        t = out[i]
        q = t.q.clone()
        q.view(-1)[chosen_flat[chosen_owner == i]] = 0
        out[i] = StoredTensor(name=t.name, shape=t.shape, dtype=t.dtype, method=t.method,
                              bits=t.bits, q=q, scale=t.scale)
    return out


def prune_order(tensors: list[StoredTensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block-matrix entry with |q| = 1 as (tensor index, flat index), cheapest first.

    The cost of zeroing an entry of row r is ``s_r²``; ties keep tensor order,
    then position, so the order is deterministic.
    """
    none = torch.zeros(0, dtype=torch.int64)
    owners, flats, costs = [none], [none], [torch.zeros(0)]
    for i, t in enumerate(tensors):
        if t.quantized and block_weight(t.name) is not None:
            flat = torch.nonzero(t.q.reshape(-1).abs() == 1).squeeze(1)
            owners.append(torch.full_like(flat, i))
            flats.append(flat)
            costs.append(t.scale.float()[flat // t.q.shape[1]].pow(2))
    order = torch.argsort(torch.cat(costs), stable=True)
    return torch.cat(owners)[order], torch.cat(flats)[order]


def prune_to_target(tensors: list[StoredTensor], target_bytes: int,
                    encoded_size: Callable[[list[StoredTensor]], int]) -> PruneOutcome:
    """Selective ±1 pruning (docs/RECIPE.md §4.6) down to ``target_bytes`` (decimal bytes).

    Zeroing a ±1 integer of row r adds ``s_r²`` to the squared weight error,
    so block-matrix entries with |q| = 1 are zeroed cheapest first (ties by
    tensor order, then position); a search over the count finds the fewest
    that bring ``encoded_size`` to the target (exactly, when the size falls
    monotonically with the count). Each probe is a full encode (~30 s for the
    record model), so the search interpolates: the size falls about linearly
    with the count, so the next probe is where the line through the bracket's
    ends crosses the target; a probe that does not halve the bracket is
    followed by a bisection, so it never needs much more than twice a binary
    search's probes and usually needs a handful. When even zeroing all of them
    is not enough, nothing is pruned and ``fits`` is False.
    """
    owner, flat = prune_order(tensors)
    total = int(owner.numel())
    probes = 1
    size = encoded_size(tensors)
    if size <= target_bytes:
        return PruneOutcome(tensors, total, 0, target_bytes, size, True, probes)
    probes += 1
    enough_size = encoded_size(_zero_cheapest(tensors, owner, flat, total))
    if enough_size > target_bytes:
        return PruneOutcome(tensors, total, 0, target_bytes, size, False, probes)
    too_few, few_size, enough = 0, size, total  # invariant: size(too_few) > target >= size(enough)
    interpolate = True
    while enough - too_few > 1:
        width = enough - too_few
        if interpolate and few_size > enough_size:
            crossing = (few_size - target_bytes) / (few_size - enough_size)
            mid = min(max(too_few + math.ceil(crossing * width), too_few + 1), enough - 1)
        else:
            mid = (too_few + enough) // 2
        probes += 1
        mid_size = encoded_size(_zero_cheapest(tensors, owner, flat, mid))
        if mid_size <= target_bytes:
            enough, enough_size = mid, mid_size
        else:
            too_few, few_size = mid, mid_size
        interpolate = enough - too_few <= width // 2
    return PruneOutcome(_zero_cheapest(tensors, owner, flat, enough), total, enough, target_bytes,
                        enough_size, True, probes)
