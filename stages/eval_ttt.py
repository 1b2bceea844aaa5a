"""Stage eval_ttt: legal score-first TTT → artifacts/eval_ttt/{metrics.json,chunks.json}.

Run by ``python -m pgolf.pipeline.launcher N stages.eval_ttt`` (torchrun underneath).
Same inputs and windows as eval_sliding (its ``eval_sliding`` params), then
pgolf/eval/ttt.py (``eval_ttt.mode: chunked``) or pgolf/eval/doc_ttt.py
(``doc_lora``: per-document LoRA TTT with phased global SGD; its chunks.json
series is per batch of documents). ``gain_vs_sliding`` = eval_sliding's val_bpb − this val_bpb
(positive: TTT helped). chunks.json is the per-chunk running-bpb series,
running_bpb.png its offline picture; progress goes to eval_ttt.log.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import barrier, init_distributed
from pgolf.eval.inputs import load_eval_inputs, read_sliding_bpb
from pgolf.eval.sliding import EvalSlidingConfig, score_metrics
from pgolf.eval.test_time import run_eval_ttt
from pgolf.eval.ttt import EvalTTTConfig
from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import launch_config, run_distributed, stage_main
from pgolf.pipeline.paths import EVAL_TTT_DIR as OUT
from pgolf.pipeline.paths import SIZE_JSON
from pgolf.precision import compile_enabled
from pgolf.progress import StageLog
from pgolf.io import file_sha256
from pgolf.pipeline.paths import ARTIFACT
from pgolf.submission.budget import eval_timer
from pgolf.submission.size import warn_if_over
from pgolf.tools.plots import plot_running_bpb


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict:
    """Run TTT and (on rank 0) write the outputs under ``root``; return the metrics."""
    windows = from_params(EvalSlidingConfig, p, "eval_sliding")
    cfg = from_params(EvalTTTConfig, p, "eval_ttt")
    device = launch_config(p).device  # every param is checked before any file is read
    baseline = read_sliding_bpb(root)
    ctx = init_distributed(rank, world_size, local_rank, device)
    with StageLog(root / OUT / "eval_ttt.log", enabled=ctx.is_main) as log:
        inputs = load_eval_inputs(root, windows, ctx.device)
        log.line(f"eval_ttt: {inputs.tokens.numel() - 1:,} targets, {cfg.mode} {cfg.optimizer} lr {cfg.lr:g}, "
                 f"world {ctx.world_size}, device {ctx.device.type}")
        result, extra, why = run_eval_ttt(inputs.model, inputs.tokens, inputs.byte_source, windows, cfg,
                                          rank=ctx.rank, world_size=ctx.world_size, progress=log,
                                          warmup=compile_enabled(windows.compile, ctx.device))
        if why is not None:
            log.warning(why)
        metrics = {**score_metrics(result), **extra, "sliding_val_bpb": baseline,
                   "gain_vs_sliding": baseline - result.sums.val_bpb, "world_size": ctx.world_size,
                   "device": ctx.device.type}
        metrics.update(eval_timer(metrics["seconds"], metrics["compile_seconds"], ctx.world_size))
        if ctx.is_main:
            metrics["size_warning"] = warn_if_over(root / SIZE_JSON)
            metrics["artifact_sha256"] = file_sha256(root / ARTIFACT)  # export pairs scores with this file
            write_json_atomic(root / OUT / "chunks.json", result.chunks)
            plot_running_bpb(root / OUT / "running_bpb.png", result.chunks, baseline)
            write_json_atomic(root / OUT / "metrics.json", metrics)
        log.line(summary(metrics))
    barrier()
    return metrics


def summary(m: dict) -> str:
    return (f"eval_ttt: val_bpb {m['val_bpb']:.6f} (sliding {m['sliding_val_bpb']:.6f}, gain "
            f"{m['gain_vs_sliding']:+.6f}) over {m['scored_tokens']:,} targets in {m['seconds']:.1f} s "
            f"({m['tokens_per_s']:,.0f} tok/s), {m['train_steps']} steps")


@stage_main
def main() -> None:
    run_distributed(run)  # rank 0 logs the summary


if __name__ == "__main__":
    main()
