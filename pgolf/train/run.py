"""The train stage's work, from files to files: check the inputs, train (or resume), write the outputs.

Outputs (rank 0) under ``root/artifacts/train``: ``model.pt`` (the trained
weights, the checkpoint), ``averages.pt`` (live / EMA / SWA candidates and
their held-out losses), ``config.json``, ``metrics.json``, ``train.log``,
dvclive curves in ``live/`` and their picture ``loss.png``. The resume state
(``artifacts/train_resume/state.pt``) is marked finished only after all of
them are on disk, so a crash while writing them resumes instead of retraining.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path


from pgolf.config import to_dict
from pgolf.data.loader import open_train_stream
from pgolf.distributed import DistContext, barrier
from pgolf.errors import DataError, ParamError
from pgolf.io import save_tensor_file, write_json_atomic
from pgolf.model.checkpoint import save_checkpoint
from pgolf.model.gpt import ModelConfig
from pgolf.quant.grid import GridBits
from pgolf.pipeline.paths import CHECKPOINT, RESUME_STATE, SHARD_DIR, SHARDS_MANIFEST, TOKENIZER_META, TRAIN_DIR
from pgolf.tools.plots import plot_lines
from pgolf.train.averaging import AVERAGES_FORMAT
from pgolf.train.config import TrainConfig
from pgolf.train.loop import LOSS_CURVE, RunFiles, TrainOutcome, run_training
from pgolf.train.optim import OptimConfig
from pgolf.train.resume import exclusive_run, mark_finished

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


def train_to_files(root: Path, model_cfg: ModelConfig, optim_cfg: OptimConfig, cfg: TrainConfig,
                   grid: GridBits, ctx: DistContext, curves: bool = True) -> dict:
    """Train on ``root``'s shards and (rank 0) write the outputs under ``root``; return the metrics.

    ``curves=False`` skips the dvclive curves and loss.png (for runs where dvclive is absent).
    """
    check_vocab(root / TOKENIZER_META, model_cfg)
    check_shards(root / SHARDS_MANIFEST, root / TOKENIZER_META)
    stream = open_train_stream(root / SHARD_DIR, model_cfg.vocab_size)
    files = RunFiles(log=root / TRAIN_DIR / "train.log", live_dir=root / TRAIN_DIR / "live" if curves else None,
                     resume=root / RESUME_STATE)
    with exclusive_run(root / RESUME_STATE) if ctx.is_main else contextlib.nullcontext():
        outcome = run_training(model_cfg, optim_cfg, cfg, grid, ctx, stream, files)
        if ctx.is_main:
            write_outputs(root, outcome, model_cfg, optim_cfg, cfg, ctx.world_size, curves)
    barrier()
    return outcome.metrics


def write_outputs(root: Path, outcome: TrainOutcome, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                  cfg: TrainConfig, world_size: int, curves: bool) -> None:
    out = root / TRAIN_DIR
    save_checkpoint(root / CHECKPOINT, model_cfg, outcome.model.state_dict(), outcome.meta)
    save_tensor_file(out / "averages.pt", {
        "format": AVERAGES_FORMAT, "version": 1, "chosen": outcome.choice.name,
        "holdout_loss": outcome.choice.losses, "swa_count": outcome.metrics["swa_count"],
        "ema_updates": outcome.metrics["ema_updates"], "weights": outcome.candidates})
    write_json_atomic(out / "config.json", {"model": to_dict(model_cfg), "optim": to_dict(optim_cfg),
                                            "train": to_dict(cfg), "world_size": world_size})
    write_json_atomic(out / "metrics.json", outcome.metrics)
    if curves:
        plot_loss(out / "loss.png", outcome.curve_rows, outcome.metrics)
    # Only now is the run safely on disk; until here a re-run resumes.
    mark_finished(root / RESUME_STATE, outcome.meta["config_hash"], outcome.metrics["steps"])


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
