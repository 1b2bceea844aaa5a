"""Stage hessians: trained model + calibration sequences → raw GPTQ Hessians (+ hessians.log).

Run as ``torchrun --standalone --nproc_per_node=N -m stages.hessians``: each
rank collects its share and the sums are all-reduced. Calibration reads only
the list of *train* shards (``list_shards(..., "train")``) or samples from the
model itself; see pgolf/quant/hessians.py. Training-data calibration counts inside
the challenge's 10-minute training budget, so its time is in the metrics.
"""
from __future__ import annotations

import time
from pathlib import Path

from pgolf.model.checkpoint import build_model, load_checkpoint
from pgolf.config import from_params, to_dict
from pgolf.distributed import barrier, init_distributed
from pgolf.quant.hessians import (HessiansConfig, autoregressive_batches, collect_hessians, save_hessians,
                            train_calibration_batches)
from pgolf.io import write_json_atomic
from pgolf.precision import autocast, synchronize
from pgolf.progress import StageLog
from pgolf.data.shards import list_shards
from pgolf.pipeline.launch import launch_device, run_distributed, stage_main

CHECKPOINT = Path("artifacts/train/model.pt")
SHARD_DIR = Path("data/shards")
OUT = Path("artifacts/hessians/hessians.pt")
METRICS = Path("artifacts/hessians/metrics.json")
LOG = Path("artifacts/hessians/hessians.log")


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict:
    """Collect and (on rank 0) write the Hessians under ``root``; return the metrics."""
    cfg = from_params(HessiansConfig, p, "hessians")
    ctx = init_distributed(rank, world_size, local_rank, launch_device(p))
    with StageLog(root / LOG, enabled=ctx.is_main) as log:
        log.line(f"hessians: source {cfg.source}, world {world_size}, device {ctx.device.type}")
        started = time.perf_counter()
        ckpt = load_checkpoint(root / CHECKPOINT)
        model = build_model(ckpt, ctx.device).eval()
        if cfg.source == "train":
            batches = list(train_calibration_batches(list_shards(root / SHARD_DIR, "train"),
                                                     ckpt.model_config.vocab_size, cfg, rank, world_size))
        else:
            with autocast(ctx.device):
                batches = list(autoregressive_batches(model, cfg, rank, world_size, ctx.device, log))
        synchronize(ctx.device)
        sampled = time.perf_counter()
        hs = collect_hessians(model, batches, ctx.device, lambda: autocast(ctx.device), log)
        synchronize(ctx.device)
        finished = time.perf_counter()
        metrics = {"source": cfg.source, "num_sequences": hs.num_sequences, "num_tokens": hs.num_tokens,
                   "num_matrices": len(hs.hessians), "world_size": world_size, "device": ctx.device.type,
                   "seconds": round(finished - started, 3),
                   "seconds_data": round(sampled - started, 3),
                   "seconds_collect": round(finished - sampled, 3), "params": to_dict(cfg)}
        if ctx.is_main:
            save_hessians(root / OUT, hs)
            write_json_atomic(root / METRICS, metrics)
        log.line(summary(metrics))
    barrier()
    return metrics


def summary(m: dict) -> str:
    return (f"hessians ({m['source']}): {m['num_matrices']} matrices from {m['num_sequences']} "
            f"sequences / {m['num_tokens']} tokens in {m['seconds']:.1f} s "
            f"(data {m['seconds_data']:.1f} s, collection {m['seconds_collect']:.1f} s)")


@stage_main
def main() -> None:
    run_distributed(run)  # rank 0 logs the summary


if __name__ == "__main__":
    main()
