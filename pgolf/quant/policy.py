"""Per-tensor quantisation: each tensor by its route, GPTQ for the solved ones; ``EncodeCache``.

Routes (which class, which grid) are pgolf/quant/routing.py's; row scales
pgolf/quant/clip.py's. Solved tensors (block matrices, and the tied embedding
when ``embed_method: gptq``) are rounded with full GPTQ (``method: gptq``) or
plain round-to-nearest (``rtn``). Under ``clip: search`` every clip candidate
is tried and the one with the lowest error for the whole matrix wins, the
error being the weight MSE or the Hessian-weighted ``tr((W−Ŵ) H (W−Ŵ)ᵀ) /
tokens`` (the mean squared output error per token) as ``clip_metric`` says;
under ``clip: sdclip`` the one SDClip scale is used. With ``awq_top_k`` the
most salient column groups (pgolf/quant/awq.py) ride along in the same GPTQ
pass on an int8 grid. ``quantize_block_matrices`` runs that for any widths,
so pgolf/quant/bit_allocation.py can demote matrices (``fit_to_limit``) with
the very same machinery.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch

from pgolf.errors import DataError
from pgolf.progress import Progress
from pgolf.quant.artifact import StoredTensor, dequantize_tensor, dtype_name
from pgolf.quant.clip import candidate_scales, protected_scales, row_quantiles, sdclip_scales
from pgolf.quant.gptq import FALLBACK_MORE_DAMPING, FALLBACK_ROUND_TO_NEAREST, gptq_quantize
from pgolf.quant.grid import PROTECTED_BITS, SCALE_FLOOR, quantize_to_grid, row_scales
from pgolf.quant.hessian_file import HEAD_HESSIAN_KEY
from pgolf.quant.quant_config import QuantizeConfig
from pgolf.quant.routing import GATE_BITS, hessian_key_of, sdclip_k, solved_bits, tensor_class

__all__ = ["QuantizeConfig", "QuantizeResult", "candidate_scales", "row_quantiles", "tensor_class",
           "quantize_state_dict", "quantize_block_matrices", "realised_weights"]


@dataclass(frozen=True)
class QuantizeResult:
    tensors: list[StoredTensor]
    report: list[dict]
    fallbacks: dict[str, int]


def _matrix_errors(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, h: torch.Tensor | None, num_tokens: int,
                   protect: torch.Tensor | None = None, scales_hi: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight MSE [B, C] and Hessian-weighted error per token [B, C] (None without H)."""
    mse, hess = [], []
    for c in range(q.shape[1]):
        s = scales[:, c].unsqueeze(-1)
        if protect is not None:
            s = torch.where(protect.unsqueeze(1), scales_hi[:, c].unsqueeze(-1), s)
        diff = w - q[:, c].float() * s
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


def _group_scales(w: torch.Tensor, classes: list[str], bits: int,
                  cfg: QuantizeConfig) -> tuple[torch.Tensor, list[float]]:
    """Scales [B, C, R] of every candidate, and the report's clip value per candidate or per matrix."""
    if cfg.clip == "sdclip":
        ks = [sdclip_k(cfg, cls) for cls in classes]
        return sdclip_scales(w, bits, torch.tensor(ks, device=w.device)), ks
    return candidate_scales(w, bits, cfg.clip_candidates), list(cfg.clip_candidates)


def _quantize_matrix_group(names: list[str], weights: list[torch.Tensor], hessians: list[torch.Tensor] | None,
                           bits: int, num_tokens: int, cfg: QuantizeConfig, device: torch.device,
                           fallbacks: dict[str, int], classes: list[str],
                           protect: Mapping[str, list[int]]) -> list[tuple[StoredTensor, dict]]:
    """Quantise same-shape matrices in one batch; returns (stored, report row) per matrix."""
    w = torch.stack([t.to(device=device, dtype=torch.float32) for t in weights])
    h = torch.stack([x.to(device=device, dtype=torch.float32) for x in hessians]) if hessians else None
    scales, clips = _group_scales(w, classes, bits, cfg)
    mask = hi = None
    if any(n in protect for n in names):
        mask = torch.zeros(w.shape[0], w.shape[2], dtype=torch.bool, device=device)
        for b, name in enumerate(names):
            for start in protect.get(name, []):
                mask[b, start:start + cfg.awq_group_size] = True
        ks = torch.tensor([sdclip_k(cfg, cls) for cls in classes], device=device)
        hi = protected_scales(w, ks)
    codes = torch.zeros(len(names), dtype=torch.int64)
    if cfg.method == "gptq":
        out = gptq_quantize(w, h, scales, bits, damp=cfg.damp, block_size=cfg.block_size,
                            act_order=cfg.act_order, protect=mask, scales_hi=hi)
        q, codes = out.q, out.fallback.cpu()
    else:
        q = quantize_to_grid(w.unsqueeze(1), scales, bits)
    mse, hess = _matrix_errors(w, q, scales, h, num_tokens, mask, hi)
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
        extra = None
        if name in protect:
            from pgolf.quant.protected import ProtectedColumns  # AWQ-lite only
            extra = ProtectedColumns(starts=torch.tensor(protect[name], dtype=torch.int16),
                                     size=cfg.awq_group_size, scale=hi[b, c].to(torch.float16).cpu().contiguous())
        stored = StoredTensor(name=name, shape=tuple(weights[b].shape), dtype=dtype_name(weights[b].dtype),
                              method=method, bits=bits, q=q[b, c].cpu().contiguous(),
                              scale=scales[b, c].to(torch.float16).cpu().contiguous(), protect=extra)
        row = _report_row(name, weights[b], classes[b], stored, clips[b] if cfg.clip == "sdclip" else clips[c],
                          float(mse[b, c]), None if hess is None else float(hess[b, c]), fallback)
        row["clip_rule"] = cfg.clip
        if extra is not None:
            row["awq"] = {"starts": list(protect[name]), "size": cfg.awq_group_size, "bits": PROTECTED_BITS}
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


def _quantize_gate(name: str, t: torch.Tensor) -> tuple[StoredTensor, dict]:
    """int8 per row, s = max|row|/127 on the fp16 grid, round to nearest (routing rule 1)."""
    w = t.float().reshape(t.shape[0], -1) if t.dim() >= 2 else t.float().reshape(1, -1)
    scale = row_scales(w, GATE_BITS)
    q = quantize_to_grid(w, scale, GATE_BITS)
    mse = float((w.double() - q.double() * scale.double().unsqueeze(-1)).pow(2).mean())
    stored = StoredTensor(name=name, shape=tuple(t.shape), dtype=dtype_name(t.dtype), method="rtn",
                          bits=GATE_BITS, q=q, scale=scale.to(torch.float16))
    return stored, _report_row(name, t, "gate", stored, 1.0, mse, None, "none")


def _passthrough(name: str, t: torch.Tensor) -> tuple[StoredTensor, dict]:
    raw = t.detach().cpu()
    raw = raw.to(torch.float16) if raw.is_floating_point() else raw
    stored = StoredTensor(name=name, shape=tuple(t.shape), dtype=dtype_name(t.dtype),
                          method="passthrough", raw=raw.contiguous())
    mse = float((t.detach().cpu().double() - raw.double()).pow(2).mean()) if t.numel() else 0.0
    return stored, _report_row(name, t, "passthrough", stored, None, mse, None, "none")


def _hessian_for(name: str, width: int, hessians: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    key = hessian_key_of(name)
    h = hessians.get(key)
    if h is None:
        hint = " (embed_method gptq needs hessians.head: true)" if key == HEAD_HESSIAN_KEY else ""
        raise DataError(f"{source}: no Hessian {key!r} for {name}{hint}")
    if tuple(h.shape) != (width, width):
        raise DataError(f"{source}: Hessian {key!r} has shape {tuple(h.shape)}, {name} needs ({width}, {width})")
    return h


def quantize_block_matrices(state: Mapping[str, torch.Tensor], bits_of: Mapping[str, int],
                            hessians: Mapping[str, torch.Tensor], num_tokens: int, cfg: QuantizeConfig,
                            device: torch.device, hessian_source: str = "hessians",
                            progress: Progress | None = None,
                            fallbacks: dict[str, int] | None = None,
                            protect: Mapping[str, list[int]] | None = None) -> dict[str, tuple[StoredTensor, dict]]:
    """GPTQ/RTN of the solved tensors named in ``bits_of`` at those bit widths.

    Same-shape, same-width matrices are quantised in one batch; returns
    (stored tensor, report row) per name. ``protect``: AWQ-lite's group starts
    per name. ``fallbacks`` (if given) counts the Cholesky fallbacks;
    ``progress`` (already started) advances per batch.
    """
    need_h = cfg.method == "gptq" or cfg.clip_metric == "hessian"
    fallbacks = {"more_damping": 0, "round_to_nearest": 0} if fallbacks is None else fallbacks
    protect = protect or {}
    groups: dict[tuple, list[str]] = {}
    for name in sorted(bits_of):
        groups.setdefault((tuple(state[name].shape), bits_of[name]), []).append(name)
    done: dict[str, tuple[StoredTensor, dict]] = {}
    for (shape, bits), names in sorted(groups.items()):
        # Hessians also feed the report's Hessian-weighted error when available.
        hs = None
        if need_h or all(hessian_key_of(n) in hessians for n in names):
            hs = [_hessian_for(name, shape[1], hessians, hessian_source) for name in names]
        classes = [tensor_class(n, state[n], cfg) for n in names]
        for name, (stored, row) in zip(names, _quantize_matrix_group(
                names, [state[n] for n in names], hs, bits, num_tokens, cfg, device, fallbacks, classes,
                protect)):
            done[name] = (stored, row)
        if progress is not None:
            progress.advance(len(names))
    return done


def awq_selection(state: Mapping[str, torch.Tensor], bits_of: Mapping[str, int],
                  act_rms: Mapping[str, torch.Tensor], cfg: QuantizeConfig,
                  source: str = "hessians") -> dict[str, tuple[list[int], list[float]]]:
    """AWQ-lite's chosen groups among the solved tensors (pgolf/quant/awq.py): name → (starts, scores)."""
    if cfg.awq_top_k == 0:
        return {}
    candidates = {}
    for name in bits_of:
        rms = act_rms.get(hessian_key_of(name))
        if rms is None:
            raise DataError(f"{source}: no activation RMS {hessian_key_of(name)!r} for {name} "
                            "(awq_top_k needs hessians.activation_rms: true)")
        candidates[name] = (state[name], rms)
    from pgolf.quant.awq import select_groups  # optional in the bundle (pgolf/submission/optional.py)
    return select_groups(candidates, cfg.awq_group_size, cfg.awq_top_k)


def quantize_state_dict(state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                        num_tokens: int, cfg: QuantizeConfig, device: torch.device,
                        hessian_source: str = "hessians", progress: Progress | None = None,
                        act_rms: Mapping[str, torch.Tensor] | None = None) -> QuantizeResult:
    """Quantise an unbanked state dict; tensors come back in sorted name order.

    ``hessians`` maps ``pgolf.quant.hessian_file`` keys to raw (undamped) H; solved
    tensors need theirs when GPTQ or the Hessian metric is used, and a
    missing or mis-shaped one is a DataError naming ``hessian_source``;
    ``act_rms`` (same keys) feeds AWQ-lite when ``awq_top_k`` is on.
    ``progress`` counts solved tensors, advancing per same-shape group.
    """
    bits_of = solved_bits(state, cfg)
    done: dict[str, tuple[StoredTensor, dict]] = {}
    for name in sorted(state):
        if name in bits_of:
            continue
        t = state[name]
        cls = tensor_class(name, t, cfg)
        route = {"passthrough": _passthrough, "gate": _quantize_gate}.get(cls)
        done[name] = route(name, t) if route is not None else _quantize_embedding(name, t, cfg)
    chosen = awq_selection(state, bits_of, act_rms or {}, cfg, hessian_source)
    fallbacks = {"more_damping": 0, "round_to_nearest": 0}
    if progress is not None:
        progress.start(f"quantize ({cfg.method})", len(bits_of), "matrices")
    done.update(quantize_block_matrices(state, bits_of, hessians, num_tokens, cfg, device, hessian_source,
                                        progress, fallbacks, {n: starts for n, (starts, _) in chosen.items()}))
    for name, (_, scores) in chosen.items():
        done[name][1]["awq"]["scores"] = scores
    ordered = [done[name] for name in sorted(done)]
    return QuantizeResult(tensors=[s for s, _ in ordered], report=[r for _, r in ordered],
                          fallbacks=fallbacks)


def realised_weights(state: Mapping[str, torch.Tensor], tensors: list[StoredTensor]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantised tensor: (original W, realised dequantised weight), both float32 [rows, cols].

    The realised weight is exactly what restore gives (protected columns on their
    own scale), so a later correction (e.g. a low-rank fit of W − Ŵ) sees the true error.
    """
    out = {}
    for t in tensors:
        if t.quantized:
            w = state[t.name].detach().float().cpu().reshape(t.q.shape)
            out[t.name] = (w, dequantize_tensor(dataclasses.replace(t, dtype="float32")).reshape(t.q.shape))
    return out
