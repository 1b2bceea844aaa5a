"""Stage eval_ttt: legal score-first TTT → artifacts/eval_ttt/{metrics.json,chunks.json}.

Run as ``torchrun --standalone --nproc_per_node=N -m stages.eval_ttt``.
Same inputs and windows as eval_sliding (its ``eval_sliding`` params), then
pgolf/eval/ttt.py. ``gain_vs_sliding`` = eval_sliding's val_bpb − this val_bpb
(positive: TTT helped). chunks.json is the per-chunk running-bpb series,
running_bpb.png its offline picture; progress goes to eval_ttt.log.
"""
from __future__ import annotations

import json
from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import barrier, init_distributed
from pgolf.errors import DataError
from pgolf.eval.sliding import SlidingConfig
from pgolf.io import write_json_atomic
from pgolf.tools.plots import plot_lines
from pgolf.precision import compile_enabled
from pgolf.progress import StageLog
from pgolf.submission.budget import projected_8gpu_seconds
from pgolf.submission.size import file_sha256, warn_if_over
from pgolf.eval.ttt import TTTConfig, run_ttt
from stages.common import launch_device, run_distributed, stage_main
from stages.eval_sliding import OUT as SLIDING_OUT
from stages.eval_sliding import ARTIFACT, SIZE_JSON, load_eval_inputs

OUT = Path("artifacts/eval_ttt")


def sliding_bpb(path: Path) -> float:
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["val_bpb"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read val_bpb ({type(exc).__name__}); run eval_sliding first") from None


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict:
    """Run TTT and (on rank 0) write the outputs under ``root``; return the metrics."""
    windows = from_params(SlidingConfig, p, "eval_sliding")
    cfg = from_params(TTTConfig, p, "eval_ttt")
    device = launch_device(p)  # every param is checked before any file is read
    baseline = sliding_bpb(root / SLIDING_OUT / "metrics.json")
    ctx = init_distributed(rank, world_size, local_rank, device)
    with StageLog(root / OUT / "eval_ttt.log", enabled=ctx.is_main) as log:
        model, tokens, tables = load_eval_inputs(root, windows, ctx)
        log.line(f"eval_ttt: {tokens.numel() - 1:,} targets, {cfg.optimizer} lr {cfg.lr:g} x {cfg.epochs} "
                 f"epochs, world {ctx.world_size}, device {ctx.device.type}")
        result = run_ttt(model, tokens, tables, windows, cfg, rank=ctx.rank, world_size=ctx.world_size,
                         progress=log, warmup=compile_enabled(windows.compile, ctx.device))
        metrics = {
            "val_loss": result.sums.val_loss, "val_bpb": result.sums.val_bpb,
            "scored_tokens": result.sums.scored_tokens, "bytes": result.sums.byte_sum,
            "seconds": round(result.seconds, 3), "compile_seconds": round(result.compile_seconds, 3),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "windows": result.windows, "chunks": result.num_chunks, "train_steps": result.train_steps,
            "sliding_val_bpb": baseline, "gain_vs_sliding": baseline - result.sums.val_bpb,
            "world_size": ctx.world_size, "device": ctx.device.type,
            # The challenge's eval timer sees the warm-up too (forward and backward on a val batch).
            "timer_seconds": round(result.seconds + result.compile_seconds, 3),
            "projected_8gpu_seconds": round(projected_8gpu_seconds(result.seconds, result.compile_seconds,
                                                                   ctx.world_size), 3),
        }
        if ctx.is_main:
            metrics["size_warning"] = warn_if_over(root / SIZE_JSON)
            metrics["artifact_sha256"] = file_sha256(root / ARTIFACT)  # export pairs scores with this file
            write_json_atomic(root / OUT / "chunks.json", result.chunks)
            plot_running_bpb(root / OUT / "running_bpb.png", result.chunks, baseline)
            write_json_atomic(root / OUT / "metrics.json", metrics)
        log.line(summary(metrics))
    barrier()
    return metrics


def plot_running_bpb(path: Path, chunks: list[dict], sliding: float) -> None:
    """Running and per-chunk bpb against the chunk index, with eval_sliding's bpb as the reference."""
    index = [row["chunk"] for row in chunks]
    ends = [index[0], index[-1]] if index else []
    plot_lines(path, {"running bpb (scored so far)": (index, [row["running_bpb"] for row in chunks]),
                      "chunk bpb": (index, [row["chunk_bpb"] for row in chunks]),
                      "sliding, no TTT": (ends, [sliding] * len(ends))},
               "score-first TTT", "chunk", "bits per byte")


def summary(m: dict) -> str:
    return (f"eval_ttt: val_bpb {m['val_bpb']:.6f} (sliding {m['sliding_val_bpb']:.6f}, gain "
            f"{m['gain_vs_sliding']:+.6f}) over {m['scored_tokens']:,} targets in {m['seconds']:.1f} s "
            f"({m['tokens_per_s']:,.0f} tok/s), {m['train_steps']} steps")


@stage_main
def main() -> None:
    run_distributed(run)  # rank 0 logs the summary


if __name__ == "__main__":
    main()
