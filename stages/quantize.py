"""Stage quantize: trained weights + Hessians → artifacts/quant/{model.ptz,report.json,metrics.json}.

Also layer_error.{json,png} (the error of each quantised block matrix, a DVC
plot and its offline picture) and quantize.log.

Policy and solver: pgolf/quant/policy.py, pgolf/quant/gptq.py; file format:
pgolf/quant/artifact.py. With ``quantize.fit_to_limit`` block matrices over the
target are demoted a bit at a time (pgolf/quant/bit_allocation.py), then with
``quantize.prune`` the ±1 pruning takes what is left; both aim at
``16,000,000 − code bytes − prune_margin_bytes`` (code bytes: the bundle's
size, from the bundle stage's counted_bytes.json). The size_check stage is the gate either way.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pgolf.quant.bit_allocation import fit_to_limit, outcome_metrics
from pgolf.model.checkpoint import load_checkpoint
from pgolf.config import from_params, to_dict
from pgolf.distributed import resolve_device
from pgolf.quant.hessians import load_hessians
from pgolf.io import write_bytes_atomic, write_json_atomic
from pgolf.model.gpt import unbank_state_dict
from pgolf.tools.plots import plot_bars
from pgolf.precision import synchronize
from pgolf.progress import StageLog
from pgolf.quant.policy import EncodeCache, QuantizeConfig, prune_to_target, quantize_state_dict
from pgolf.submission.size import LIMIT_BYTES, bundle_counted_bytes
from stages.common import launch_device, params, stage_main

CHECKPOINT = Path("artifacts/train/model.pt")
HESSIANS = Path("artifacts/hessians/hessians.pt")
OUT_DIR = Path("artifacts/quant")
LOG = OUT_DIR / "quantize.log"
BLOCK_CLASSES = ("attn", "mlp")  # pgolf.quant.policy.tensor_class of the GPTQ block matrices
# Search settings of the byte budget stay out of the artifact's meta: the bits of
# each tensor record their outcome, and a fit that demotes nothing then gives
# the same bytes as fit_to_limit: false.
UNRECORDED_KEYS = ("fit_to_limit", "fit_min_bits")


def qat_bits(meta: dict) -> int | None:
    """Bits of late QAT if the checkpoint's run switched it on (meta ``qat``), else None."""
    qat = meta.get("qat")
    if isinstance(qat, dict) and qat.get("enabled"):
        return int(qat["bits"])
    return None


def run(p: dict, root: Path = Path(".")) -> dict:
    """Quantise the checkpoint under ``root``; return the metrics."""
    cfg = from_params(QuantizeConfig, p, "quantize")
    device = resolve_device(launch_device(p))
    with StageLog(root / LOG) as log:
        metrics = _quantize(cfg, device, root, log)
        log.line(summary(metrics))
    return metrics


def _quantize(cfg: QuantizeConfig, device: torch.device, root: Path, log: StageLog) -> dict:
    started = time.perf_counter()
    ckpt = load_checkpoint(root / CHECKPOINT)
    trained_bits = qat_bits(ckpt.meta)
    # Compares the configured class bits: matrices demoted by fit_to_limit do not warn.
    if trained_bits is not None and trained_bits not in (cfg.attn_bits, cfg.mlp_bits):
        log.warning(f"the model was trained with late QAT at {trained_bits} bits but quantize uses "
                    f"attn_bits={cfg.attn_bits}, mlp_bits={cfg.mlp_bits}")
    hs = load_hessians(root / HESSIANS)
    state = unbank_state_dict(ckpt.state_dict, ckpt.model_config)
    result = quantize_state_dict(state, hs.hessians, hs.num_tokens, cfg, device, str(root / HESSIANS), log)
    synchronize(device)
    quantized = time.perf_counter()

    model_config = ckpt.model_config.to_dict()
    meta = {"quantize": {k: v for k, v in to_dict(cfg).items() if k not in UNRECORDED_KEYS}}
    tensors, report, fit_metrics, prune_metrics = result.tensors, result.report, {}, {}
    blobs = EncodeCache(model_config, meta, cfg)
    if cfg.fit_to_limit or cfg.prune:
        code = bundle_counted_bytes(root)
        target = LIMIT_BYTES - code - cfg.prune_margin_bytes
        log.line(f"byte target {target:,} (code {code:,}, margin {cfg.prune_margin_bytes:,})")

        def encoded_size(ts: list, what: str) -> int:
            began = time.perf_counter()
            size = len(blobs.encode(ts))
            log.line(f"{what} probe: {size:,} bytes ({size - target:+,} vs target) in "
                     f"{time.perf_counter() - began:.1f} s")
            return size

    if cfg.fit_to_limit:
        fit = fit_to_limit(result, state, hs.hessians, hs.num_tokens, cfg, device, target,
                           lambda ts: encoded_size(ts, "fit"), str(root / HESSIANS), log.line, log,
                           frame_sizes=lambda ts: [len(f) for f in blobs.frames(ts)])
        tensors, report = fit.tensors, fit.report
        fit_metrics = {**outcome_metrics(fit), "fit_code_bytes": code}
        if not fit.fits:
            log.warning(f"fit_to_limit left the artifact at {fit.size_bytes:,} bytes, over the target "
                        f"{target:,} ({fit.demoted} matrices demoted, fit_min_bits {cfg.fit_min_bits})")
    if cfg.prune:
        outcome = prune_to_target(tensors, target, lambda ts: encoded_size(ts, "prune"))
        tensors = outcome.tensors
        prune_metrics = {"prune_candidates": outcome.candidates, "pruned": outcome.pruned,
                         "prune_target_bytes": outcome.target_bytes, "prune_fits": outcome.fits,
                         "prune_probes": outcome.probes, "prune_code_bytes": code}
        if not outcome.fits:
            log.warning(f"pruning every ±1 entry cannot reach {outcome.target_bytes:,} bytes")
    blob = blobs.encode(tensors)
    # Each tensor's exact share of the file: its own compressed frame (format v2).
    frame_bytes = {t.name: len(f) for t, f in zip(tensors, blobs.frames(tensors))}
    report = [{**r, "compressed_bytes": frame_bytes.get(r["name"])} for r in report]
    write_bytes_atomic(root / OUT_DIR / "model.ptz", blob)
    model_bytes = len(blob)
    finished = time.perf_counter()

    quantized_rows = [r for r in report if r["bits"] is not None]
    metrics = {
        "model_bytes": model_bytes,
        "stored_bytes": sum(t.stored_bytes() for t in tensors),
        "num_tensors": len(tensors), "num_quantized": len(quantized_rows),
        "fallback_more_damping": result.fallbacks["more_damping"],
        "fallback_round_to_nearest": result.fallbacks["round_to_nearest"],
        "weight_mse_mean": sum(r["weight_mse"] for r in quantized_rows) / max(len(quantized_rows), 1),
        "hessian_error_total": sum(r["hessian_error"] or 0.0 for r in quantized_rows),
        "calibration_tokens": hs.num_tokens, "device": device.type,
        "seconds": round(finished - started, 3), "seconds_quantize": round(quantized - started, 3),
        **fit_metrics, **prune_metrics, "params": to_dict(cfg)}
    write_json_atomic(root / OUT_DIR / "report.json", report)
    write_layer_error(root / OUT_DIR, report)
    write_json_atomic(root / OUT_DIR / "metrics.json", metrics)
    return metrics


def write_layer_error(out_dir: Path, report: list[dict]) -> None:
    """layer_error.json (the DVC plot) and layer_error.png: one entry per quantised block matrix."""
    rows = [{"tensor": r["name"], "weight_mse": r["weight_mse"], "hessian_error": r["hessian_error"]}
            for r in report if r["class"] in BLOCK_CLASSES]
    write_json_atomic(out_dir / "layer_error.json", rows)
    # The output error per token when every matrix has a Hessian: what GPTQ minimises.
    key = "hessian_error" if rows and all(r["hessian_error"] is not None for r in rows) else "weight_mse"
    plot_bars(out_dir / "layer_error.png", [r["tensor"].removesuffix(".weight") for r in rows],
              [r[key] for r in rows], f"quantisation error per block matrix ({key})",
              "tr((W-Q)H(W-Q)^T) / tokens" if key == "hessian_error" else "mean (W-Q)^2")


def summary(m: dict) -> str:
    return (f"quantize: {m['num_quantized']}/{m['num_tensors']} tensors quantised, artifact "
            f"{m['model_bytes']:,} bytes in {m['seconds']:.1f} s; fallbacks: "
            f"{m['fallback_more_damping']} more damping, {m['fallback_round_to_nearest']} round-to-nearest")


@stage_main
def main() -> None:
    run(params())  # logs the summary line


if __name__ == "__main__":
    main()
