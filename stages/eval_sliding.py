"""Stage eval_sliding: artifacts/quant/model.ptz + val shards → artifacts/eval_sliding/metrics.json.

Run by ``python -m pgolf.pipeline.launcher N stages.eval_sliding`` (torchrun underneath).
Scores the dequantised artifact (never the training weights) with exact
sliding windows (every target once; pgolf/eval/windows.py), then the cheap
non-overlapping eval as a diagnostic. bpb charges bytes from the val byte sidecar
when the shards have one (CaseOps), else from the tokenizer's byte tables.
Progress and the result go to artifacts/eval_sliding/eval_sliding.log.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.distributed import barrier, init_distributed
from pgolf.eval.inputs import load_eval_inputs
from pgolf.eval.sliding import EvalSlidingConfig, evaluate_sliding
from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import launch_config, run_distributed, stage_main
from pgolf.pipeline.paths import EVAL_SLIDING_DIR as OUT
from pgolf.pipeline.paths import SIZE_JSON
from pgolf.progress import StageLog
from pgolf.io import file_sha256
from pgolf.pipeline.paths import ARTIFACT
from pgolf.submission.budget import eval_timer
from pgolf.submission.size import warn_if_over


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict:
    """Evaluate and (on rank 0) write the metrics under ``root``; return them."""
    cfg = from_params(EvalSlidingConfig, p, "eval_sliding")
    ctx = init_distributed(rank, world_size, local_rank, launch_config(p).device)
    with StageLog(root / OUT / "eval_sliding.log", enabled=ctx.is_main) as log:
        inputs = load_eval_inputs(root, cfg, ctx.device)
        log.line(f"eval_sliding: {inputs.tokens.numel() - 1:,} targets, world {ctx.world_size}, "
                 f"device {ctx.device.type}")
        metrics = {**evaluate_sliding(inputs.model, inputs.tokens, inputs.byte_source, cfg, rank=ctx.rank,
                                      world_size=ctx.world_size, progress=log),
                   "world_size": ctx.world_size, "device": ctx.device.type}
        metrics.update(eval_timer(metrics["seconds"] + metrics["nonoverlap_seconds"], metrics["compile_seconds"], ctx.world_size))
        if ctx.is_main:
            metrics["size_warning"] = warn_if_over(root / SIZE_JSON)
            metrics["artifact_sha256"] = file_sha256(root / ARTIFACT)  # export pairs scores with this file
            write_json_atomic(root / OUT / "metrics.json", metrics)
        log.line(summary(metrics))
    barrier()
    return metrics


def summary(m: dict) -> str:
    return (f"eval_sliding: val_bpb {m['val_bpb']:.6f} (loss {m['val_loss']:.6f}) over "
            f"{m['scored_tokens']:,} targets, {m['bytes']:,} bytes in {m['seconds']:.1f} s "
            f"({m['tokens_per_s']:,.0f} tok/s); non-overlapping {m['nonoverlap_val_bpb']:.6f}")


@stage_main
def main() -> None:
    run_distributed(run)  # rank 0 logs the summary


if __name__ == "__main__":
    main()
