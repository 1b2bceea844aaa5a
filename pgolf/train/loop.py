"""The training loop: gradient accumulation, schedules, averaging, late QAT, time cap, resume.

One optimizer step consumes ``tokens_per_step`` tokens: each of the W ranks
runs ``A = tokens_per_step / (W · micro_batch_tokens)`` forward/backward
micro-steps (loss scaled by 1/A) and :class:`pgolf.train.optim.PgolfOptimizer`
averages the gradients across ranks, so one GPU reproduces the 8-GPU step.

Per step, in order: LR scale from :mod:`pgolf.train.schedule` (step-count or
wall-clock form); late QAT switches on the first time the scale drops below
``qat_lr_scale_threshold``, on the export grid's bits (``quantize.attn_bits`` /
``quantize.mlp_bits``, :class:`pgolf.quant.grid.GridBits`); micro-steps; optimizer step; EMA update; SWA
snapshot (when the scale is below the SWA threshold, every ``swa_every``
steps); then the ranks agree (all-reduce MAX, one sync per step) on whether to
stop: a non-finite loss or gradient norm on any rank, or the wall-clock cap.

Timing. ``elapsed`` counts training steps only (host clock after a device
sync), not compile warm-up, logging, resume-state writes or the final evaluation.
Compile warm-up (docs/RECIPE.md §3.3) runs ``compile_warmup_steps`` real steps to
trigger compilation, then restores the weights, optimizer state and loader
position it started from, so the measured run starts from the same state as
an unwarmed one (tested bit-for-bit on CPU).

At the end the live, EMA and SWA weights are scored on the held-out tail of
the train stream and one is chosen (:mod:`pgolf.train.select`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgolf.train.averaging import EMA, SWA
from pgolf.config import to_dict
from pgolf.distributed import DistContext, all_reduce_max_, all_reduce_mean_
from pgolf.errors import PgolfError
from pgolf.data.loader import TokenStream, TrainLoader, holdout_sequences
from pgolf.model.gpt import GPT, ModelConfig, param_roles
from pgolf.quant.grid import GridBits
from pgolf.train.optim import OptimConfig, PgolfOptimizer
from pgolf.precision import (autocast, compile_enabled, configure_backends, maybe_compile, peak_memory,
                             synchronize, training_compile_options)
from pgolf.train.schedule import recurrence_on, warmdown_scale_by_steps, warmdown_scale_by_time
from pgolf.train.config import TrainConfig, config_hash
from pgolf.train.log import TrainReporter
from pgolf.train.select import Choice, choose_weights, holdout_loss


LOSS_CURVE = "train_loss"


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes (rank 0); None disables that output."""
    log: Path | None = None
    live_dir: Path | None = None
    resume: Path | None = None


@dataclass
class TrainOutcome:
    model: GPT                                   # holds the chosen weights
    choice: Choice
    candidates: dict[str, dict[str, torch.Tensor] | None]  # live / ema / swa weights (swa None if absent)
    metrics: dict[str, Any]
    meta: dict[str, Any]                         # checkpoint meta: weights choice, QAT, run facts
    curve_rows: list[dict[str, float]] = field(default_factory=list)  # logged steps (rank 0), resume included


class FixedContext:
    """:class:`pgolf.train.context.TrainContext` when neither progressive context nor packed rows is on: rows
    of ``train.seq_len`` from start to end (no switch, no LR ramp), so that module is loaded only when used."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.length: int | None = None
        self.switches: list[dict[str, int]] = []

    def row_tokens(self, length: int) -> int:
        return length

    def warmup_lengths(self) -> list[int]:
        return [self.seq_len]

    def apply(self, length: int, model: GPT, loader: TrainLoader) -> None:
        loader.set_seq_len(length)
        self.length = length

    def step(self, step: int, elapsed_s: float, model: GPT, loader: TrainLoader) -> None:
        if self.length is None:  # the start sets the span; that is no change
            self.apply(self.seq_len, model, loader)

    def lr_factor(self, step: int) -> float:
        return 1.0


@dataclass
class _Progress:
    step: int = 0                 # optimizer steps completed
    elapsed_s: float = 0.0        # training-step time only
    qat_from_step: int | None = None
    recur_from_step: int | None = None  # first step with depth recurrence (model.recur_loops)
    resumed_from_step: int | None = None
    last_resume_step: int | None = None
    last_loss: float = math.nan


class Trainer:
    """Owns the model, optimizer, loader and averages of one run."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, cfg: TrainConfig, grid: GridBits,
                 ctx: DistContext, stream: TokenStream):
        self.cfg, self.optim_cfg, self.grid, self.ctx = cfg, optim_cfg, grid, ctx
        torch.manual_seed(cfg.seed)
        configure_backends(ctx.device)
        self.model = GPT(model_cfg).to(ctx.device)
        if cfg.qat_lr_scale_threshold > 0:
            # Put the (off) switch into the graph before compiling; see GPT.set_qat.
            self.model.set_qat(False, grid.by_class())
        # Depth recurrence waits for its switch point (pgolf.train.schedule.recurrence_on).
        self.recur_switch = model_cfg.recur_loops > 0 and cfg.recur_start_frac > 0
        self.model.set_recurrence(not self.recur_switch)
        self.optimizer = PgolfOptimizer(self.model.named_parameters(), param_roles(self.model), optim_cfg, ctx)
        self.accum = cfg.grad_accum(ctx.world_size)
        # Rows or packed rows, and progressive context (pgolf.train.context).
        if cfg.seq_len_schedule or cfg.packed_rows:
            from pgolf.train.context import TrainContext
            self.context: TrainContext | FixedContext = TrainContext(cfg, self.model)
        else:
            self.context = FixedContext(cfg.seq_len)
        self.loader = TrainLoader(stream, cfg.holdout_tokens, self.context.row_tokens(cfg.seq_len),
                                  cfg.micro_batch_tokens, ctx.rank, ctx.world_size)
        self.compiled = compile_enabled(cfg.compile, ctx.device)
        options = training_compile_options(cfg.mix_order_reduction, cfg.compile_mode)
        self.forward = maybe_compile(self.model, self.compiled, options)
        self.cuda_graphs = self.compiled and bool(options.get("triton.cudagraphs"))
        if self.cuda_graphs:
            # A CUDA-graph replay overwrites the previous replay's outputs. A parameter whose .grad is None
            # adopts the backward graph's output buffer as its .grad, so the next micro-step's replay would
            # overwrite the accumulated gradient (pytorch/pytorch#96693): accumulate into a private copy.
            for param in self.model.parameters():
                param.register_hook(torch.clone)
        self.ema = EMA(self.model, optim_cfg.ema_decay)
        self.swa = SWA(self.model, optim_cfg.swa_lr_scale_threshold, optim_cfg.swa_every,
                       on_cpu=optim_cfg.swa_on_cpu)
        self.progress = _Progress()

    # ------------------------------------------------------------- one step
    def lr_scale(self) -> float:
        """The warmdown's scale (before a context change's ramp, which QAT and SWA never see)."""
        cfg, p = self.cfg, self.progress
        if cfg.warmdown == "steps":
            return warmdown_scale_by_steps(p.step, cfg.max_steps, cfg.warmdown_steps, cfg.min_lr_scale)
        return warmdown_scale_by_time(p.elapsed_s, cfg.max_train_seconds, cfg.warmdown_frac, cfg.min_lr_scale)

    def train_step(self, lr_scale: float, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Micro-steps + optimizer step; returns (this rank's mean loss on device, optimizer stats)."""
        loss_sum = torch.zeros((), device=self.ctx.device)
        for _ in range(self.accum):
            x, y = self.loader.next_batch(pin_memory=self.ctx.device.type == "cuda")
            x = x.to(self.ctx.device, non_blocking=True)
            y = y.to(self.ctx.device, non_blocking=True)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-step's outputs are consumed
            with autocast(self.ctx.device):
                loss = self.forward(x, y)
            (loss / self.accum).backward()
            loss_sum += loss.detach()
        stats = self.optimizer.step(lr_scale, step)
        self.optimizer.zero_grad()
        return loss_sum / self.accum, stats

    def maybe_enable_recurrence(self) -> bool:
        """Switch depth recurrence on at its point of the run; True on the switching step."""
        cfg, p = self.cfg, self.progress
        if not self.recur_switch or self.model.looping:
            return False
        if not recurrence_on(p.step, cfg.max_steps, p.elapsed_s, cfg.max_train_seconds, cfg.recur_start_frac):
            return False
        self.model.set_recurrence(True)
        p.recur_from_step = p.step
        return True

    def compile_warmup(self) -> float:
        """Run the warm-up steps, restore the starting state; returns seconds spent."""
        steps = self.cfg.compile_warmup_steps
        if steps == 0:
            return 0.0
        started = time.perf_counter()
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        loader_state = self.loader.state_dict()
        for length in self.context.warmup_lengths():  # every row shape of progressive context
            self.context.apply(length, self.model, self.loader)
            for i in range(steps):
                self.train_step(1.0, i)
            if self.recur_switch:  # compile the looped graph too, then back to unlooped
                self.model.set_recurrence(True)
                for i in range(steps):
                    self.train_step(1.0, i)
                self.model.set_recurrence(False)
        self.context.length = None  # the first step applies its own length
        with torch.no_grad():
            self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.loader.load_state_dict(loader_state)
        synchronize(self.ctx.device)
        return time.perf_counter() - started

    def maybe_enable_qat(self, lr_scale: float) -> None:
        cfg, p = self.cfg, self.progress
        if p.qat_from_step is None and cfg.qat_lr_scale_threshold > 0 and lr_scale < cfg.qat_lr_scale_threshold:
            self.model.set_qat(True, self.grid.by_class())
            p.qat_from_step = p.step

    def agree(self, loss: torch.Tensor, grad_norm: float) -> tuple[bool, bool]:
        """(non-finite loss or gradient on any rank, time cap reached), the same on every rank.

        The elapsed time itself is agreed too (the MAX over ranks), so the
        wall-clock LR scale is identical everywhere and the weights never
        drift apart.
        """
        bad = (~torch.isfinite(loss)).double() + float(not math.isfinite(grad_norm))
        elapsed = torch.tensor(self.progress.elapsed_s, dtype=torch.float64, device=loss.device)
        bad, elapsed = all_reduce_max_(torch.stack([bad, elapsed])).tolist()
        self.progress.elapsed_s = elapsed
        return bad > 0, self.time_is_up()

    def time_is_up(self) -> bool:
        cap = self.cfg.max_train_seconds
        return cap > 0 and self.progress.elapsed_s >= cap

    # ------------------------------------------------------------ identity
    def run_hash(self, model_cfg: ModelConfig) -> str:
        # The grid's bits are hashed with the train section: late QAT trains on them.
        train = {**to_dict(self.cfg), **to_dict(self.grid)}
        return config_hash(to_dict(model_cfg), to_dict(self.optim_cfg), train,
                           self.ctx.world_size, self.loader.stream.shard_sizes)


# ------------------------------------------------------------------ the run
def run_training(model_cfg: ModelConfig, optim_cfg: OptimConfig, cfg: TrainConfig, grid: GridBits,
                 ctx: DistContext, stream: TokenStream, files: RunFiles) -> TrainOutcome:
    """Train (or resume) to the step or time limit, then choose the final weights.

    The resume file, if any, is left in place: the caller marks it finished
    (:func:`pgolf.train.resume.mark_finished`) once its outputs are written.
    """
    trainer = Trainer(model_cfg, optim_cfg, cfg, grid, ctx, stream)
    run_hash = trainer.run_hash(model_cfg)
    state, why = None, "resume state off"
    if files.resume is not None:  # the pipeline's train stage; the submission driver never resumes
        from pgolf.train.resume import load_resume_state, remove_stale_temporaries
        if ctx.is_main:
            remove_stale_temporaries(files.resume)
        state, why = load_resume_state(files.resume, run_hash)
    reporter = TrainReporter(files.log, files.live_dir, cfg.max_steps, enabled=ctx.is_main,
                             append=state is not None)
    try:
        reporter.line(f"train: {trainer.model.num_parameters():,} parameters, world {ctx.world_size}, "
                      f"grad accum {trainer.accum}, {cfg.tokens_per_step:,} tokens/step, device "
                      f"{ctx.device.type}, compile {trainer.compiled}; {why}")
        warmup_s = trainer.compile_warmup()
        if warmup_s:
            reporter.line(f"compile warm-up: {cfg.compile_warmup_steps} steps in {warmup_s:.1f}s "
                          "(untimed; state restored)")
        if state is not None:
            from pgolf.train.resume import restore_trainer
            restore_trainer(trainer, state)
            if state.curve_rows:
                trainer.progress.last_loss = float(state.curve_rows[-1][LOSS_CURVE])
            reporter.replay(state.curve_rows)
            del state
        _loop(trainer, reporter, files.resume, run_hash)
        outcome = _finish(trainer, reporter, run_hash, warmup_s)
    except BaseException:
        reporter.close(succeeded=False)  # the last good run's log and curves stay
        raise
    reporter.close()
    return outcome


def _loop(t: Trainer, reporter: TrainReporter, resume_path: Path | None, run_hash: str) -> None:
    cfg, ctx, p = t.cfg, t.ctx, t.progress
    while p.step < cfg.max_steps and not t.time_is_up():
        synchronize(ctx.device)
        started = time.perf_counter()
        lr_scale = t.lr_scale()
        t.maybe_enable_qat(lr_scale)
        if t.maybe_enable_recurrence():
            reporter.line(f"depth recurrence on from step {p.step} ({t.model.cfg.num_visits} virtual layers)")
        if (length := t.context.step(p.step, p.elapsed_s, t.model, t.loader)) is not None:
            reporter.line(f"{t.context.describe(length)} from step {p.step}")
        loss, stats = t.train_step(lr_scale * t.context.lr_factor(p.step), p.step)
        t.ema.update(t.model)
        p.step += 1
        t.swa.maybe_add(t.model, lr_scale, p.step)
        synchronize(ctx.device)
        p.elapsed_s += time.perf_counter() - started
        bad, time_up = t.agree(loss, stats["grad_norm"])
        if bad:
            kept = (f"the last good resume state is {resume_path} (step {p.last_resume_step})"
                    if p.last_resume_step is not None else "no resume state was written yet")
            raise PgolfError(f"train: non-finite loss or gradient at step {p.step} (loss {loss.item():.4g}, "
                             f"grad norm {stats['grad_norm']:.4g}); stopped, {kept}")
        last = time_up or p.step == cfg.max_steps
        tokens_per_s = p.step * cfg.tokens_per_step / max(p.elapsed_s, 1e-9)
        reporter.progress(p.step, tokens_per_s)
        if p.step % cfg.log_every == 0 or p.step == 1 or last:  # step 1: the curve's starting point
            p.last_loss = float(all_reduce_mean_(loss.clone()))
            qat = f" qat{t.grid.attn_bits}/{t.grid.mlp_bits}" if p.qat_from_step is not None else ""
            reporter.line(f"step {p.step}/{cfg.max_steps} loss {p.last_loss:.4f} lr_scale {lr_scale:.3f} "
                          f"grad_norm {stats['grad_norm']:.3f} tok/s {tokens_per_s:,.0f} "
                          f"train_time {p.elapsed_s:.1f}s swa {t.swa.count}{qat}")
            reporter.curve(p.step, {LOSS_CURVE: p.last_loss, "lr_scale": lr_scale,
                                    "grad_norm": stats["grad_norm"], "tokens_per_s": tokens_per_s,
                                    "train_seconds": p.elapsed_s})
        # The last step's resume state is written too, so the final choice can be redone
        # (e.g. with another train.final_weights) without retraining.
        if resume_path is not None and cfg.resume_every and (p.step % cfg.resume_every == 0 or last):
            from pgolf.train.resume import save_trainer_state
            save_trainer_state(t, resume_path, run_hash, reporter.rows)


def _finish(t: Trainer, reporter: TrainReporter, run_hash: str, warmup_s: float) -> TrainOutcome:
    cfg, ctx, p, model = t.cfg, t.ctx, t.progress, t.model
    # The weight choice reads training data after the clock: the challenge counts it in the 600 s.
    choice_started = time.perf_counter()
    x, y = holdout_sequences(t.loader.stream, cfg.holdout_tokens, cfg.seq_len)
    model.set_doc_span(0)  # later phases score rows of their own length, uncut
    model.set_recurrence(True)  # every later phase runs the looped model (docs/FRONTIER.md §2.3)
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    candidates: dict[str, dict[str, torch.Tensor] | None] = {
        "live": live,
        "ema": {**live, **t.ema.averaged_state()},
        "swa": {**live, **t.swa.average()} if t.swa.count else None}
    losses: dict[str, float | None] = {}
    with torch.no_grad():
        for name, weights in candidates.items():
            if weights is not None:
                model.load_state_dict(weights)
            losses[name] = (holdout_loss(model, x, y, ctx, cfg.micro_batch_tokens // cfg.seq_len)
                            if weights is not None else None)
        choice = choose_weights(losses, cfg.final_weights)
        model.load_state_dict(candidates[choice.name])
    synchronize(ctx.device)
    choice_s = time.perf_counter() - choice_started
    reporter.line(f"final weights: {choice.name} ({choice.reason}; {t.swa.count} SWA snapshots)")

    peak_bytes, peak_kind = peak_memory(ctx.device)
    peak = torch.tensor(float(peak_bytes), dtype=torch.float64, device=ctx.device)
    tokens = p.step * cfg.tokens_per_step
    stopped_by = "max_train_seconds" if t.time_is_up() else "max_steps"
    qat = {"enabled": p.qat_from_step is not None, "bits": t.grid.by_class(), "from_step": p.qat_from_step}
    metrics = {
        "steps": p.step, "tokens": tokens, "train_seconds": p.elapsed_s,
        "tokens_per_s": tokens / p.elapsed_s if p.elapsed_s > 0 else None,
        "ms_per_step": 1000 * p.elapsed_s / p.step if p.step else None,
        "compile_warmup_seconds": warmup_s, "choice_seconds": choice_s, "final_train_loss": p.last_loss,
        "holdout_loss_live": losses["live"], "holdout_loss_ema": losses["ema"],
        "holdout_loss_swa": losses["swa"], "final_weights": choice.name, "swa_count": t.swa.count,
        "ema_updates": t.ema.num_updates, "qat_enabled": qat["enabled"], "qat_from_step": p.qat_from_step,
        "recur_from_step": p.recur_from_step, "context_switches": t.context.switches,
        "stopped_by": stopped_by, "resumed_from_step": p.resumed_from_step,
        "world_size": ctx.world_size, "grad_accum": t.accum, "compiled": t.compiled,
        "peak_memory_bytes": int(all_reduce_max_(peak).item()),
        "peak_memory_kind": peak_kind}
    meta = {"weights": choice.name, "weights_reason": choice.reason, "holdout_loss": losses,
            "swa_count": t.swa.count, "qat": qat, "steps": p.step, "tokens": tokens,
            "stopped_by": stopped_by, "seed": cfg.seed, "config_hash": run_hash}
    return TrainOutcome(model=model, choice=choice, candidates=candidates, metrics=metrics, meta=meta,
                        curve_rows=list(reporter.rows))
