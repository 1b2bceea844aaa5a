"""The submission driver: the whole challenge run in one process group, as the bundle's train_gpt.py runs it.

``torchrun --standalone --nproc_per_node=N train_gpt.py`` (or plain ``python``
for one process), in a records folder with the challenge's data layout
(``bundle.data_dir``, ``bundle.tokenizer_path``, relative to the folder):

1. train under the cap and choose the final weights (pgolf/train/loop.py);
2. calibrate the GPTQ Hessians, all ranks together;
3. quantise on rank 0, fitting ``16,000,000 − len(train_gpt.py) (rounded up
   to bundle.reserve_quantum, as the pipeline) − quantize.prune_margin_bytes`` when ``fit_to_limit`` / ``prune`` are on,
   and write the artifact ``final_model.ptz``;
4. evaluate it, all ranks: sliding windows, then legal score-first TTT on a
   fresh copy.

Each phase makes the calls its pipeline stage makes (pgolf/submission/steps.py),
so the scores equal the pipeline's for the same params, data and seeds. It
prints the challenge's log lines (``final_int6_roundtrip_exact``,
``final_int6_sliding_window_exact``, ``legal_ttt_exact``, ``Total submission
size``; the training loop prints a line per logged step) and the two budgets
(pgolf/submission/budget.py); rank 0 writes ``logs/*.log`` and
``results.json`` (every figure, unrounded).

``--set section.key=value`` overrides an embedded param for this run (e.g.
``train.max_train_seconds=120``); the counted code is unchanged by it.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pgolf.config import from_params
from pgolf.data.loader import TokenStream
from pgolf.data.shards import challenge_sources, load_tokens
from pgolf.distributed import barrier, init_distributed, shutdown
from pgolf.errors import ParamError, PgolfError
from pgolf.eval.sliding import EvalSlidingConfig, evaluate_sliding, score_metrics
from pgolf.eval.test_time import run_eval_ttt
from pgolf.eval.ttt import EvalTTTConfig
from pgolf.io import write_bytes_atomic, write_json_atomic
from pgolf.model.gpt import ModelConfig
from pgolf.progress import StageLog
from pgolf.precision import compile_enabled
from pgolf.quant.hessians import HessiansConfig, calibrate_model
from pgolf.quant.pipeline import byte_target, quantize_loaded
from pgolf.pipeline.launch import launch_device
from pgolf.quant.grid import GridBits, grid_bits_from_params
from pgolf.quant.policy import QuantizeConfig
from pgolf.submission import steps
from pgolf.submission.budget import BudgetConfig, budget_lines, budget_report, over_budget_message
from pgolf.submission.limits import LIMIT_BYTES, reserved_code_bytes
from pgolf.submission.optional import group_of, missing_modules
from pgolf.train.config import TrainConfig
from pgolf.train.loop import RunFiles, run_training
from pgolf.train.optim import OptimConfig

ARTIFACT = Path("final_model.ptz")
LOGS = Path("logs")
RESULTS = Path("results.json")


@dataclass(frozen=True)
class BundleConfig:
    """Section ``bundle`` of params.yaml: where the bundle finds the challenge's data at run time."""

    data_dir: str        # folder of fineweb_{train,val}_NNNNNN.bin, relative to the records folder
    tokenizer_path: str  # the SentencePiece model of those shards
    strip_docstrings: bool  # pack modules minified (pgolf/submission/minify.py)
    reserve_quantum: int    # the fit sets aside the code bytes rounded up to this (limits.reserved_code_bytes)

    def __post_init__(self) -> None:
        if isinstance(self.reserve_quantum, bool) or not isinstance(self.reserve_quantum, int) \
                or self.reserve_quantum < 1:
            raise ParamError("bundle.reserve_quantum", f"must be an integer >= 1, got {self.reserve_quantum!r}")


@dataclass(frozen=True)
class RunConfig:
    """Every section the driver reads, validated before any work starts."""

    device: str
    bundle: BundleConfig
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    grid: GridBits          # late QAT's grid: the quantize section's bits
    hessians: HessiansConfig
    quantize: QuantizeConfig
    sliding: EvalSlidingConfig
    ttt: EvalTTTConfig
    budget: BudgetConfig

    @classmethod
    def from_params(cls, p: dict) -> "RunConfig":
        return cls(device=launch_device(p), bundle=from_params(BundleConfig, p, "bundle"),
                   model=from_params(ModelConfig, p, "model"), optim=from_params(OptimConfig, p, "optim"),
                   train=from_params(TrainConfig, p, "train"), grid=grid_bits_from_params(p),
                   hessians=from_params(HessiansConfig, p, "hessians"),
                   quantize=from_params(QuantizeConfig, p, "quantize"),
                   sliding=from_params(EvalSlidingConfig, p, "eval_sliding"), ttt=from_params(EvalTTTConfig, p, "eval_ttt"),
                   budget=from_params(BudgetConfig, p, "budget"))


def apply_overrides(params: dict, items: list[str]) -> dict:
    """A copy of ``params`` with ``section.key=value`` items applied (values parsed as YAML)."""
    out = copy.deepcopy(params)
    for item in items:
        key, sep, raw = item.partition("=")
        section, _, leaf = key.partition(".")
        if not sep or not leaf:
            raise ParamError(item, "override must look like section.key=value")
        if not isinstance(out.get(section), dict) or leaf not in out[section]:
            raise ParamError(key, "unknown key")
        try:
            out[section][leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ParamError(key, f"cannot parse value {raw!r}") from None
    return out


def challenge_line(name: str, metrics: dict, loss: str = "val_loss", bpb: str = "val_bpb") -> str:
    return f"{name} val_loss:{metrics[loss]:.8f} val_bpb:{metrics[bpb]:.8f}"


def run(p: dict, code_path: Path, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict:
    """The whole job (see the module docstring); returns results.json's content."""
    cfg = RunConfig.from_params(p)
    for module, condition in missing_modules(p):  # e.g. a run-time --set that turns a feature on
        raise PgolfError(f"{condition} needs {module}, which this bundle does not carry (build it with these params)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ParamError("launch.device", "cuda, but CUDA is not available here (--set launch.device=cpu?)")
    folder = Path(".")
    data_dir, tokenizer = folder / cfg.bundle.data_dir, folder / cfg.bundle.tokenizer_path
    # Inputs are checked before any work: a missing shard or tokenizer fails in seconds, not after training.
    train_paths, val_paths = challenge_sources(data_dir, "train"), challenge_sources(data_dir, "val")
    tables = steps.val_byte_source(data_dir, tokenizer, cfg.model.vocab_size)
    code_bytes = code_path.stat().st_size
    ctx = init_distributed(rank, world_size, local_rank, cfg.device)
    main = ctx.is_main
    results: dict[str, Any] = {"code_bytes": code_bytes, "world_size": ctx.world_size,
                               "device": ctx.device.type, "params": p}
    started = time.perf_counter()

    outcome = run_training(cfg.model, cfg.optim, cfg.train, cfg.grid, ctx, TokenStream(train_paths, cfg.model.vocab_size),
                           RunFiles(log=LOGS / "train.log"))
    results["train"] = outcome.metrics
    ckpt = steps.checkpoint_in_memory(cfg.model, outcome.model.state_dict(), outcome.meta)
    del outcome

    with StageLog(LOGS / "hessians.log", enabled=main) as log:
        calibrated = calibrate_model(cfg.hessians, ckpt, train_paths, ctx, log)
        hs, results["hessians"] = calibrated.hessians, calibrated.metrics
        log.line(f"hessians ({cfg.hessians.source}): {hs.num_tokens:,} tokens in "
                 f"{results['hessians']['seconds']:.1f} s")

    target = byte_target(reserved_code_bytes(code_bytes, cfg.bundle.reserve_quantum), cfg.quantize)  # as quantize
    if main:
        with StageLog(LOGS / "quantize.log") as log:
            q = quantize_loaded(ckpt, hs, cfg.quantize, ctx.device, target, "the trained weights", "the Hessians",
                                log)
            write_bytes_atomic(folder / ARTIFACT, q.blob)
            results["artifact_sha256"] = hashlib.sha256(q.blob).hexdigest()
            results["quantize"] = q.metrics
            total = len(q.blob) + code_bytes
            results["size"] = {"model_bytes": len(q.blob), "code_bytes": code_bytes, "total_bytes": total,
                               "limit": LIMIT_BYTES, "fits": total <= LIMIT_BYTES}
            log.line(f"Serialized model {cfg.quantize.compressor}: {len(q.blob)} bytes")
            log.line(f"Total submission size: {total} bytes (model {len(q.blob)} + code {code_bytes}; "
                     f"limit {LIMIT_BYTES}, {'fits' if total <= LIMIT_BYTES else 'OVER THE LIMIT'})")
    del ckpt, hs
    barrier()
    results["seconds_to_artifact"] = time.perf_counter() - started

    val = load_tokens(val_paths, cfg.model.vocab_size)  # the challenge's val split, as load_split reads pgolf's
    source = str(val_paths[0].parent)
    with StageLog(LOGS / "eval_sliding.log", enabled=main) as log:
        model, tokens = steps.eval_inputs(folder / ARTIFACT, val, cfg.sliding, ctx, source)
        results["eval_sliding"] = sliding = {
            **evaluate_sliding(model, tokens, tables, cfg.sliding, rank=ctx.rank, world_size=ctx.world_size,
                               progress=log), "world_size": ctx.world_size}
        log.line(challenge_line("final_int6_roundtrip_exact", sliding, "nonoverlap_val_loss", "nonoverlap_val_bpb"))
        log.line(challenge_line("final_int6_sliding_window_exact", sliding))
    with StageLog(LOGS / "eval_ttt.log", enabled=main) as log:
        model, tokens = steps.eval_inputs(folder / ARTIFACT, val, cfg.sliding, ctx, source)
        result, extra, why = run_eval_ttt(model, tokens, tables, cfg.sliding, cfg.ttt, rank=ctx.rank,
                                          world_size=ctx.world_size, progress=log,
                                          warmup=compile_enabled(cfg.sliding.compile, ctx.device))
        if why is not None:
            log.warning(why)
        results["eval_ttt"] = ttt = {**score_metrics(result), **extra, "world_size": ctx.world_size}
        log.line(challenge_line("legal_ttt_exact", ttt))

    budget = budget_report(results["train"], results["hessians"], sliding, ttt)
    results["budget"] = budget
    if main:
        for line in budget_lines(budget):
            print(line, flush=True)
        write_json_atomic(folder / RESULTS, results)
    message = over_budget_message(budget)
    if message is not None:
        if cfg.budget.enforce:
            raise PgolfError(f"budget: {message} (budget.enforce is true)")
        if main:
            print(f"warning: budget: {message}", file=sys.stderr, flush=True)
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_gpt.py", description="pgolf submission run (see the docstring)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override an embedded param")
    return parser.parse_args(argv)


def main(params: dict, argv: list[str], code_path: str) -> int:
    """Entry point of the bundle's stub: one ``error:`` line and exit 1 on an expected failure."""
    args = parse_args(argv)
    env = os.environ
    rank, world_size, local_rank = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    try:
        run(apply_overrides(params, args.set), Path(code_path), rank, world_size, local_rank)
        return 0
    except PgolfError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("pgolf."):
            raise
        # An optional module the bundle left out, reached where its condition says it is not (a gap in
        # pgolf/submission/optional.py): one clear line, not a traceback.
        if rank == 0:
            print(f"error: this bundle does not carry {exc.name} (packed only when {group_of(exc.name)})",
                  file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()

