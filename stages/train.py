"""Stage train: train shards → artifacts/train/{model.pt,averages.pt,config.json,metrics.json,train.log}.

Run as ``torchrun --standalone --nproc_per_node=N -m stages.train``. Curves go
to artifacts/train/live (dvclive), their picture to artifacts/train/loss.png.
A resume state is kept in artifacts/train_resume/state.pt (a persistent DVC
output): re-running after a crash or ``kill -9`` continues from the last
checkpoint (pgolf/train/resume.py).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pgolf.model.checkpoint import save_checkpoint
from pgolf.config import from_params, to_dict
from pgolf.distributed import barrier, init_distributed
from pgolf.errors import DataError, ParamError
from pgolf.io import save_tensor_file, write_json_atomic
from pgolf.data.loader import open_train_stream
from pgolf.model.gpt import ModelConfig
from pgolf.train.optim import OptimConfig
from pgolf.tools.plots import plot_lines
from pgolf.train.loop import LOSS_CURVE, RunFiles, TrainOutcome, run_training
from pgolf.train.config import TrainConfig
from pgolf.train.resume import exclusive_run, mark_finished
from stages.common import launch_device, launch_facts, run_distributed, stage_main

SHARD_DIR = Path("data/shards")
TOKENIZER_META = Path("data/tokenizer/meta.json")
OUT = Path("artifacts/train")
RESUME = Path("artifacts/train_resume/state.pt")


def read_fields(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: data[key] for key in keys}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read {', '.join(keys)} ({type(exc).__name__})") from None


def check_vocab(meta_path: Path, model_cfg: ModelConfig) -> None:
    vocab = read_fields(meta_path, ("vocab_size",))["vocab_size"]
    if vocab != model_cfg.vocab_size:
        raise ParamError("model.vocab_size", f"{model_cfg.vocab_size} != the tokenizer's {vocab} ({meta_path})")


def check_shards(manifest_path: Path, meta_path: Path) -> None:
    """DataError unless the shards' manifest names the tokenizer of meta.json (vocabulary and file hash)."""
    shards = read_fields(manifest_path, ("vocab_size", "tokenizer_sha256"))
    tokenizer = read_fields(meta_path, ("vocab_size", "sha256"))
    if shards["vocab_size"] != tokenizer["vocab_size"]:
        raise DataError(f"{manifest_path}: shards have vocab_size {shards['vocab_size']}, the tokenizer "
                        f"({meta_path}) {tokenizer['vocab_size']}; re-run the shards stage")
    if shards["tokenizer_sha256"] != tokenizer["sha256"]:
        raise DataError(f"{manifest_path}: shards were cut by another tokenizer than {meta_path} "
                        f"(sha256 {shards['tokenizer_sha256'][:12]}… vs {tokenizer['sha256'][:12]}…); "
                        "re-run the shards stage")


def run(p: dict, root: Path = Path("."), rank: int = 0, world_size: int = 1, local_rank: int = 0,
        curves: bool = True) -> dict:
    """Train and (on rank 0) write the outputs under ``root``; return the metrics.

    ``curves=False`` skips the dvclive curves and loss.png (bench/pipeline.py runs where dvclive is absent).
    """
    model_cfg = from_params(ModelConfig, p, "model")
    optim_cfg = from_params(OptimConfig, p, "optim")
    cfg = from_params(TrainConfig, p, "train")
    ctx = init_distributed(rank, world_size, local_rank, launch_device(p))
    check_vocab(root / TOKENIZER_META, model_cfg)
    check_shards(root / SHARD_DIR / "manifest.json", root / TOKENIZER_META)
    stream = open_train_stream(root / SHARD_DIR, model_cfg.vocab_size)
    files = RunFiles(log=root / OUT / "train.log", live_dir=root / OUT / "live" if curves else None, resume=root / RESUME)
    with exclusive_run(root / RESUME) if ctx.is_main else contextlib.nullcontext():
        outcome = run_training(model_cfg, optim_cfg, cfg, ctx, stream, files)
        if ctx.is_main:
            _write_outputs(root, outcome, model_cfg, optim_cfg, cfg, ctx.world_size, curves)
    barrier()
    return outcome.metrics


def _write_outputs(root: Path, outcome: TrainOutcome, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                   cfg: TrainConfig, world_size: int, curves: bool) -> None:
    save_checkpoint(root / OUT / "model.pt", model_cfg, outcome.model.state_dict(), outcome.meta)
    save_tensor_file(root / OUT / "averages.pt", {
        "format": "pgolf-train-averages", "version": 1, "chosen": outcome.choice.name,
        "holdout_loss": outcome.choice.losses, "swa_count": outcome.metrics["swa_count"],
        "ema_updates": outcome.metrics["ema_updates"], "weights": outcome.candidates})
    write_json_atomic(root / OUT / "config.json", {"model": to_dict(model_cfg), "optim": to_dict(optim_cfg),
                                                    "train": to_dict(cfg), "world_size": world_size})
    write_json_atomic(root / OUT / "metrics.json", outcome.metrics)
    if curves:
        plot_loss(root / OUT / "loss.png", outcome.curve_rows, outcome.metrics)
    # Only now is the run safely on disk; until here a re-run resumes.
    mark_finished(root / RESUME, outcome.meta["config_hash"], outcome.metrics["steps"])


def plot_loss(path: Path, rows: list[dict], metrics: dict) -> None:
    """Training loss per logged step, with the final held-out losses of live/EMA/SWA as levels."""
    steps = [row["step"] for row in rows]
    series = {"train loss": (steps, [row[LOSS_CURVE] for row in rows])}
    ends = [steps[0], steps[-1]] if steps else []
    for name in ("live", "ema", "swa"):
        value = metrics.get(f"holdout_loss_{name}")
        if value is not None:
            series[f"held-out loss, {name} weights"] = (ends, [value] * len(ends))
    plot_lines(path, series, f"training (final weights: {metrics['final_weights']})", "step", "loss (nats)")


@stage_main
def main() -> None:
    m = run_distributed(run)
    if launch_facts()[0] == 0:
        swa = m["holdout_loss_swa"]
        print(f"train: {m['steps']} steps, {m['tokens']:,} tokens in {m['train_seconds']:.1f} s "
              f"({m['tokens_per_s'] or 0:,.0f} tok/s); held-out loss live {m['holdout_loss_live']:.4f} "
              f"ema {m['holdout_loss_ema']:.4f} swa {'n/a' if swa is None else f'{swa:.4f}'} "
              f"-> {m['final_weights']}")


if __name__ == "__main__":
    main()
