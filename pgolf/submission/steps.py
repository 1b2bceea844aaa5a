"""The phases of a submission run, as library calls: what the stages do, without their files.

The driver (:mod:`pgolf.submission.driver`) runs these in one process group;
each makes exactly the library calls of its stage (stages/hessians.py,
stages/quantize.py, stages/eval_sliding.py, stages/eval_ttt.py) in the same
order, so a bundle run and a pipeline run on the same data, params and seeds
give the same bytes and the same scores. Where a stage writes a file that the
next stage reads back (checkpoint, Hessians), the value is passed in memory:
the file round trip is exact (CPU tensors of the same dtype).

Data comes in the challenge's layout: ``fineweb_{train,val}_NNNNNN.bin`` in
one folder (:func:`pgolf.data.shards.challenge_sources`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.config import to_dict
from pgolf.data.bpb import ByteTables
from pgolf.data.shards import challenge_sources, read_shard
from pgolf.distributed import DistContext
from pgolf.eval.sliding import (SlidingConfig, nll_forward, prepare_tokens, score_nonoverlapping,
                                score_sliding_windows)
from pgolf.eval.ttt import TTTConfig, run_ttt
from pgolf.model.checkpoint import Checkpoint, build_model
from pgolf.model.gpt import unbank_state_dict
from pgolf.precision import autocast, compile_enabled, configure_backends, synchronize
from pgolf.progress import StageLog
from pgolf.quant.artifact import load_dequantized_model
from pgolf.quant.bit_allocation import fit_to_limit, outcome_metrics
from pgolf.quant.hessians import (HessianConfig, HessianSet, autoregressive_batches, collect_hessians,
                                  train_calibration_batches)
from pgolf.quant.policy import EncodeCache, QuantizeConfig, prune_to_target, quantize_state_dict

# Search settings of the byte budget stay out of the artifact's meta (as in stages/quantize.py).
UNRECORDED_QUANTIZE_KEYS = ("fit_to_limit", "fit_min_bits")


def checkpoint_in_memory(model_cfg, state_dict: dict[str, torch.Tensor], meta: dict) -> Checkpoint:
    """What save_checkpoint + load_checkpoint give: CPU copies of the weights."""
    return Checkpoint(model_config=model_cfg,
                      state_dict={k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
                      meta=dict(meta))


def calibrate(ckpt: Checkpoint, cfg: HessianConfig, ctx: DistContext, train_paths: list[Path],
              log: StageLog) -> tuple[HessianSet, dict]:
    """Raw GPTQ Hessians summed over ranks, and the hessians stage's metrics."""
    started = time.perf_counter()
    model = build_model(ckpt, ctx.device).eval()
    if cfg.source == "train":
        batches = list(train_calibration_batches(train_paths, ckpt.model_config.vocab_size, cfg,
                                                 ctx.rank, ctx.world_size))
    else:
        with autocast(ctx.device):
            batches = list(autoregressive_batches(model, cfg, ctx.rank, ctx.world_size, ctx.device, log))
    synchronize(ctx.device)
    sampled = time.perf_counter()
    hs = collect_hessians(model, batches, ctx.device, lambda: autocast(ctx.device), log)
    synchronize(ctx.device)
    finished = time.perf_counter()
    return hs, {"source": cfg.source, "num_sequences": hs.num_sequences, "num_tokens": hs.num_tokens,
                "num_matrices": len(hs.hessians), "world_size": ctx.world_size, "device": ctx.device.type,
                "seconds": round(finished - started, 3), "seconds_data": round(sampled - started, 3),
                "seconds_collect": round(finished - sampled, 3)}


@dataclass(frozen=True)
class Quantized:
    blob: bytes               # the artifact file's bytes
    metrics: dict[str, Any]


def quantize_checkpoint(ckpt: Checkpoint, hs: HessianSet, cfg: QuantizeConfig, device: torch.device,
                        target_bytes: int, log: StageLog) -> Quantized:
    """GPTQ, then fit_to_limit / pruning towards ``target_bytes`` when enabled; the encoded artifact."""
    started = time.perf_counter()
    state = unbank_state_dict(ckpt.state_dict, ckpt.model_config)
    result = quantize_state_dict(state, hs.hessians, hs.num_tokens, cfg, device, "hessians", log)
    synchronize(device)
    meta = {"quantize": {k: v for k, v in to_dict(cfg).items() if k not in UNRECORDED_QUANTIZE_KEYS}}
    blobs = EncodeCache(ckpt.model_config.to_dict(), meta, cfg)
    tensors, metrics = result.tensors, {}

    def encoded_size(ts: list, what: str) -> int:
        size = len(blobs.encode(ts))
        log.line(f"{what} probe: {size:,} bytes ({size - target_bytes:+,} vs target)")
        return size

    if cfg.fit_to_limit or cfg.prune:
        log.line(f"byte target {target_bytes:,}")
    if cfg.fit_to_limit:
        fit = fit_to_limit(result, state, hs.hessians, hs.num_tokens, cfg, device, target_bytes,
                           lambda ts: encoded_size(ts, "fit"), "hessians", log.line, log,
                           frame_sizes=lambda ts: [len(f) for f in blobs.frames(ts)])
        tensors = fit.tensors
        metrics.update(outcome_metrics(fit))
    if cfg.prune:
        outcome = prune_to_target(tensors, target_bytes, lambda ts: encoded_size(ts, "prune"))
        tensors = outcome.tensors
        metrics.update(pruned=outcome.pruned, prune_fits=outcome.fits, prune_target_bytes=outcome.target_bytes)
    blob = blobs.encode(tensors)
    metrics.update(model_bytes=len(blob), num_tensors=len(tensors),
                   num_quantized=sum(t.quantized for t in tensors),
                   seconds=round(time.perf_counter() - started, 3), target_bytes=target_bytes)
    return Quantized(blob=blob, metrics=metrics)


def load_val_tokens(data_dir: Path, vocab_size: int) -> np.ndarray:
    """The challenge's val split as one array (what load_split gives for pgolf's own shard names)."""
    parts = [np.asarray(read_shard(p, vocab_size)) for p in challenge_sources(data_dir, "val")]
    return np.concatenate(parts)


def _eval_inputs(artifact: Path, val: np.ndarray, windows: SlidingConfig, ctx: DistContext,
                 source: str) -> tuple[torch.nn.Module, torch.Tensor]:
    configure_backends(ctx.device)
    model = load_dequantized_model(artifact, ctx.device)
    return model, prepare_tokens(val, windows.seq_len, windows.trim_to_seq_len, ctx.device, source)


def evaluate_sliding(artifact: Path, val: np.ndarray, tables: ByteTables, windows: SlidingConfig,
                     ctx: DistContext, source: str, log: StageLog) -> dict:
    """eval_sliding's metrics (sliding windows, then the non-overlapping diagnostic)."""
    model, tokens = _eval_inputs(artifact, val, windows, ctx, source)
    shared = dict(rank=ctx.rank, world_size=ctx.world_size, progress=log,
                  forward=nll_forward(model, windows.compile, ctx.device))
    sliding = score_sliding_windows(model, tokens, tables, windows, **shared,
                                    warmup=compile_enabled(windows.compile, ctx.device))
    plain = score_nonoverlapping(model, tokens, tables, windows, **shared)
    return {"val_loss": sliding.sums.val_loss, "val_bpb": sliding.sums.val_bpb,
            "scored_tokens": sliding.sums.scored_tokens, "seconds": round(sliding.seconds, 3),
            "compile_seconds": round(sliding.compile_seconds, 3),
            "nonoverlap_val_loss": plain.sums.val_loss, "nonoverlap_val_bpb": plain.sums.val_bpb,
            "nonoverlap_seconds": round(plain.seconds, 3), "world_size": ctx.world_size}


def evaluate_ttt(artifact: Path, val: np.ndarray, tables: ByteTables, windows: SlidingConfig, cfg: TTTConfig,
                 ctx: DistContext, source: str, log: StageLog) -> dict:
    """eval_ttt's metrics: legal score-first TTT on a fresh copy of the artifact's model."""
    model, tokens = _eval_inputs(artifact, val, windows, ctx, source)
    result = run_ttt(model, tokens, tables, windows, cfg, rank=ctx.rank, world_size=ctx.world_size,
                     progress=log, warmup=compile_enabled(windows.compile, ctx.device))
    return {"val_loss": result.sums.val_loss, "val_bpb": result.sums.val_bpb,
            "scored_tokens": result.sums.scored_tokens, "seconds": round(result.seconds, 3),
            "compile_seconds": round(result.compile_seconds, 3), "chunks": result.num_chunks,
            "train_steps": result.train_steps, "world_size": ctx.world_size}
