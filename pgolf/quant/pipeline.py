"""Trained weights + Hessians → the ``.ptz`` bytes, its report and metrics: the quantize stage's work.

In order: unbank the checkpoint (pgolf/model/layout.py); quantise every tensor
(pgolf/quant/policy.py, GPTQ in pgolf/quant/gptq.py); with
``quantize.fit_to_limit``, demote block matrices over the byte target a bit at
a time (pgolf/quant/bit_allocation.py); with ``quantize.prune``, the ±1
pruning takes what is left (pgolf/quant/pruning.py); with ``quantize.lqer_top_k``,
LQER factors on the realised weights (pgolf/quant/lqer.py); encode
(pgolf/quant/artifact.py, pgolf/quant/grouped.py with ``compression: grouped``).
Both aim at the byte target ``16,000,000 − code bytes − prune_margin_bytes``,
code bytes = the ``train_gpt.py`` bundle's counted bytes under ``code_root``
(pgolf/submission/bundle.py); the
size_check stage is the gate either way. LQER and the target: every probe of
the fit and the pruning encodes its tensors *with* the factors LQER fits to
them (the same deterministic function as the final step), so the factors'
bytes are counted exactly and the chosen tensors, corrected, meet the target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from pgolf.config import to_dict
from pgolf.model.checkpoint import Checkpoint, load_checkpoint
from pgolf.model.gpt import unbank_state_dict
from pgolf.model.layout import BLOCK_CLASSES
from pgolf.precision import synchronize
from pgolf.progress import StageLog
from pgolf.quant.artifact import StoredTensor, decode, require_finite
from pgolf.quant.bit_allocation import fit_to_limit, outcome_metrics
from pgolf.quant.encode_cache import EncodeCache
from pgolf.quant.hessian_file import HessianSet, load_hessians
from pgolf.quant.policy import QuantizeConfig, QuantizeResult, quantize_state_dict
from pgolf.quant.pruning import prune_to_target
from pgolf.quant.quant_config import frontier_defaults
from pgolf.quant.roles import role_of
from pgolf.submission.limits import LIMIT_BYTES
from pgolf.submission.size import bundle_reserved_bytes

# Search settings of the byte budget stay out of the artifact's meta: the bits of
# each tensor record their outcome, and a fit that demotes nothing then gives
# the same bytes as fit_to_limit: false.
UNRECORDED_KEYS = ("fit_to_limit", "fit_min_bits")


@dataclass(frozen=True)
class QuantizeOutcome:
    """Everything the quantize stage writes."""

    blob: bytes  # model.ptz, byte for byte
    report: list[dict]  # report.json: one row per tensor, with its compressed frame's bytes
    metrics: dict  # metrics.json


def trained_grid(meta: Mapping) -> dict[str, int] | None:
    """Late QAT's bits per class if the checkpoint's run switched it on (meta ``qat``), else None."""
    qat = meta.get("qat")
    if not (isinstance(qat, Mapping) and qat.get("enabled")):
        return None
    bits = qat["bits"]
    return {cls: int(bits[cls]) for cls in BLOCK_CLASSES} if isinstance(bits, Mapping) else {
        cls: int(bits) for cls in BLOCK_CLASSES}


def recorded_settings(cfg: QuantizeConfig) -> dict:
    """The quantize keys the artifact's meta records: not the byte search's, and a frontier
    key only when set away from its default (so runs without them keep their bytes)."""
    defaults = frontier_defaults()
    return {k: v for k, v in to_dict(cfg).items()
            if k not in UNRECORDED_KEYS and not (k in defaults and v == defaults[k])}


def routing_summary(report: list[dict]) -> dict:
    """Per class: tensors, bits and clip values used; and AWQ-lite's protected groups (metrics.json)."""
    classes: dict[str, dict] = {}
    for r in report:
        c = classes.setdefault(r["class"], {"tensors": 0, "bits": set(), "clip": set(), "method": set()})
        c["tensors"] += 1
        for key in ("bits", "clip", "method"):
            if r.get(key) is not None:
                c[key].add(r[key])
    return {"classes": {cls: {k: (sorted(v) if isinstance(v, set) else v) for k, v in c.items()}
                        for cls, c in sorted(classes.items())},
            "awq": [{"name": r["name"], **r["awq"]} for r in report if r.get("awq")]}


def layer_error_rows(report: list[dict]) -> list[dict]:
    """The error of each quantised block matrix (layer_error.json, a DVC plot)."""
    return [{"tensor": r["name"], "weight_mse": r["weight_mse"], "hessian_error": r["hessian_error"]}
            for r in report if r["class"] in BLOCK_CLASSES]


def quantize_checkpoint(checkpoint: Path, hessians: Path, cfg: QuantizeConfig, device: torch.device,
                        code_root: Path, log: StageLog) -> QuantizeOutcome:
    """Quantise ``checkpoint`` with the Hessians in ``hessians`` (module docstring); the byte target
    counts the bundle under ``code_root`` (only read when fit_to_limit or prune is on)."""
    ckpt = load_checkpoint(checkpoint)
    hs = load_hessians(hessians)
    require_finite_inputs(ckpt, hs, str(checkpoint), str(hessians))  # before anything else is read
    target = None
    if cfg.fit_to_limit or cfg.prune:
        target = byte_target(bundle_reserved_bytes(code_root), cfg)  # the whole bundle, rounded up to bundle.reserve_quantum
    return quantize_loaded(ckpt, hs, cfg, device, target, str(checkpoint), str(hessians), log)


def require_finite_inputs(ckpt: Checkpoint, hs: HessianSet, checkpoint_source: str, hessian_source: str) -> None:
    """A NaN or Inf weight would score NaN instead of failing: refuse it, naming the tensor."""
    for name, tensor in ckpt.state_dict.items():
        require_finite(tensor, f"{checkpoint_source}: tensor {name}", "weight")
    for key, h in hs.hessians.items():
        require_finite(h, f"{hessian_source}: Hessian {key}", "Hessian")


def byte_target(code_bytes: int, cfg: QuantizeConfig) -> int:
    """What the artifact may take: the limit less the counted code and the safety margin."""
    return LIMIT_BYTES - code_bytes - cfg.prune_margin_bytes


def _no_lqer(tensors: Sequence[StoredTensor]) -> tuple[list[StoredTensor], list[dict]]:
    """``lqer_step``'s result with ``quantize.lqer_top_k: 0``: the same tensors, no records."""
    return list(tensors), []


def quantize_loaded(ckpt: Checkpoint, hs: HessianSet, cfg: QuantizeConfig, device: torch.device,
                    target: int | None, checkpoint_source: str, hessian_source: str,
                    log: StageLog) -> QuantizeOutcome:
    """:func:`quantize_checkpoint` on a loaded checkpoint and Hessians (the submission driver passes
    them in memory); ``target`` None when neither fit_to_limit nor prune is on."""
    started = time.perf_counter()
    _warn_if_trained_on_another_grid(ckpt.meta, cfg, log)
    require_finite_inputs(ckpt, hs, checkpoint_source, hessian_source)
    state = unbank_state_dict(ckpt.state_dict, ckpt.model_config)
    result = quantize_state_dict(state, hs.hessians, hs.num_tokens, cfg, device, hessian_source, log,
                                 act_rms=hs.act_rms)
    synchronize(device)
    quantized = time.perf_counter()

    meta = {"quantize": recorded_settings(cfg)}
    blobs = EncodeCache(ckpt.model_config.to_dict(), meta, cfg)
    with_lqer = _no_lqer
    if cfg.lqer_top_k > 0:  # an optional module of the bundle (pgolf/submission/optional.py)
        from pgolf.quant.lqer import lqer_step
        with_lqer = lqer_step(state, cfg.lqer_top_k, cfg.lqer_rank, cfg.lqer_group)
    tensors, report, budget_metrics = result.tensors, result.report, {}
    if cfg.fit_to_limit or cfg.prune:
        tensors, report, budget_metrics = _meet_byte_target(result, state, hs, cfg, device, target, blobs,
                                                            hessian_source, log, with_lqer)
    tensors, lqer_records = with_lqer(tensors)
    blob = blobs.encode(tensors)
    report, layout_metrics = layout_report(report, tensors, blob, blobs, cfg, lqer_records)
    finished = time.perf_counter()

    quantized_rows = [r for r in report if r["bits"] is not None]
    metrics = {
        "model_bytes": len(blob),
        "stored_bytes": sum(t.stored_bytes() for t in tensors),
        "num_tensors": len(tensors), "num_quantized": len(quantized_rows),
        "fallback_more_damping": result.fallbacks["more_damping"],
        "fallback_round_to_nearest": result.fallbacks["round_to_nearest"],
        "weight_mse_mean": sum(r["weight_mse"] for r in quantized_rows) / max(len(quantized_rows), 1),
        "hessian_error_total": sum(r["hessian_error"] or 0.0 for r in quantized_rows),
        "calibration_tokens": hs.num_tokens, "device": device.type,
        "seconds": round(finished - started, 3), "seconds_quantize": round(quantized - started, 3),
        **routing_summary(report), **budget_metrics, **layout_metrics, "params": to_dict(cfg)}
    return QuantizeOutcome(blob, report, metrics)


def layout_report(report: list[dict], tensors: list[StoredTensor], blob: bytes, blobs: EncodeCache,
                  cfg: QuantizeConfig, lqer_records: list[dict]) -> tuple[list[dict], dict]:
    """The report rows with each tensor's compressed bytes (plain: its own frame; grouped: None, and
    its ``group``) and LQER record, and the metrics of the layout: frames (grouped) and LQER choices."""
    metrics: dict = {}
    if cfg.compression == "plain":
        frame_bytes = {t.name: len(f) for t, f in zip(tensors, blobs.frames(tensors))}
        report = [{**r, "compressed_bytes": frame_bytes.get(r["name"])} for r in report]
    else:
        frames = [dict(f) for f in decode(blob, "encoded artifact").frames]  # also proves the round trip
        # A quantised matrix with a role lies in its role's frame (its scales in the remainder).
        grouped = {t.name: role_of(t.name) for t in tensors if t.quantized and len(t.shape) == 2}
        frame_of = {f["frame"]: f for f in frames}
        report = [{**r, "compressed_bytes": None, "group": (g := grouped.get(r["name"]) or "remainder"),
                   "group_compressor": frame_of[g]["compressor"], "group_frame_bytes": frame_of[g]["bytes"]}
                  for r in report]
        metrics.update(compression="grouped", compressor=cfg.compressor, frames=frames)
    if lqer_records:
        by_name = {rec["name"]: {k: v for k, v in rec.items() if k != "name"} for rec in lqer_records}
        report = [{**r, "lqer": by_name[r["name"]]} if r["name"] in by_name else r for r in report]
        metrics.update(lqer=lqer_records, lqer_bytes=sum(rec["factor_bytes"] for rec in lqer_records))
    return report, metrics


def _warn_if_trained_on_another_grid(meta: Mapping, cfg: QuantizeConfig, log: StageLog) -> None:
    """Train reads the same grid keys, so only a stale or hand-made checkpoint differs."""
    trained = trained_grid(meta)
    if trained is None or trained == cfg.grid_bits.by_class():
        return
    widths = sorted(set(trained.values()))
    at = (f"{widths[0]} bits" if len(widths) == 1
          else ", ".join(f"{cls} {bits} bits" for cls, bits in trained.items()))
    log.warning(f"the model was trained with late QAT at {at} but quantize uses "
                f"attn_bits={cfg.attn_bits}, mlp_bits={cfg.mlp_bits}")


def _meet_byte_target(result: QuantizeResult, state: Mapping[str, torch.Tensor], hs: HessianSet,
                      cfg: QuantizeConfig,
                      device: torch.device, target: int, blobs: EncodeCache, hessian_source: str,
                      log: StageLog, with_lqer: Callable) -> tuple[list[StoredTensor], list[dict], dict]:
    """fit_to_limit, then prune, as ``cfg`` says: (tensors, report, their ``fit_*``/``prune_*`` metrics)."""
    code = LIMIT_BYTES - cfg.prune_margin_bytes - target
    log.line(f"byte target {target:,} (code {code:,}, margin {cfg.prune_margin_bytes:,})")

    def probe(what: str) -> Callable[[list[StoredTensor]], int]:
        def encoded_size(ts: list[StoredTensor]) -> int:
            began = time.perf_counter()
            size = len(blobs.encode(with_lqer(ts)[0]))  # the factors' bytes count
            log.line(f"{what} probe: {size:,} bytes ({size - target:+,} vs target) in "
                     f"{time.perf_counter() - began:.1f} s")
            return size
        return encoded_size

    tensors, report, metrics = result.tensors, result.report, {"target_bytes": target}
    if cfg.fit_to_limit:
        fit = fit_to_limit(result, state, hs.hessians, hs.num_tokens, cfg, device, target, probe("fit"),
                           hessian_source, log.line, log, frame_sizes=lambda ts: [len(f) for f in blobs.frames(ts)])
        tensors, report = fit.tensors, fit.report
        metrics.update(outcome_metrics(fit), fit_code_bytes=code)
        if not fit.fits:
            log.warning(f"fit_to_limit left the artifact at {fit.size_bytes:,} bytes, over the target "
                        f"{target:,} ({fit.demoted} matrices demoted, fit_min_bits {cfg.fit_min_bits})")
    if cfg.prune:
        estimate = None if cfg.compression == "plain" else lambda ts: blobs.grouped.estimate(with_lqer(ts)[0])
        outcome = prune_to_target(tensors, target, probe("prune"), estimate)
        tensors = outcome.tensors
        metrics.update(prune_candidates=outcome.candidates, pruned=outcome.pruned,
                       prune_target_bytes=outcome.target_bytes, prune_fits=outcome.fits,
                       prune_probes=outcome.probes, prune_code_bytes=code)
        if not outcome.fits:
            log.warning(f"pruning every ±1 entry cannot reach {outcome.target_bytes:,} bytes")
    return tensors, report, metrics
