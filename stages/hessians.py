"""Stage hessians: trained model + calibration sequences → raw GPTQ Hessians (+ hessians.log).

Run by ``python -m pgolf.pipeline.launcher N stages.hessians`` (torchrun underneath): each
rank collects its share and the sums are all-reduced. Calibration reads only
the list of *train* shards (``list_shards(..., "train")``) or samples from the
model itself; see pgolf/quant/hessians.py. Training-data calibration counts inside
the challenge's 10-minute training budget, so its time is in the metrics.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import barrier, init_distributed
from pgolf.io import write_json_atomic
from pgolf.progress import StageLog
from pgolf.quant.hessian_file import save_hessians
from pgolf.quant.hessians import HessiansConfig, calibrate
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
        outcome = calibrate(cfg, root / CHECKPOINT, root / SHARD_DIR, ctx, log)
        if ctx.is_main:
            save_hessians(root / OUT, outcome.hessians)
            write_json_atomic(root / METRICS, outcome.metrics)
        log.line(summary(outcome.metrics))
    barrier()
    return outcome.metrics


def summary(m: dict) -> str:
    return (f"hessians ({m['source']}): {m['num_matrices']} matrices from {m['num_sequences']} "
            f"sequences / {m['num_tokens']} tokens in {m['seconds']:.1f} s "
            f"(data {m['seconds_data']:.1f} s, collection {m['seconds_collect']:.1f} s)")


@stage_main
def main() -> None:
    run_distributed(run)  # rank 0 logs the summary


if __name__ == "__main__":
    main()
