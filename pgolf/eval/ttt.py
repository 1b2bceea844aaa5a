"""Legal score-first test-time training over the validation stream (docs/RECIPE.md §5.3, §5.4).

The targets are cut into chunks of ``chunk_tokens``. For chunk c, in order:

1. score every sliding window of chunk c (a window belongs to the chunk of
   the first target it scores) under ``torch.inference_mode()`` with the
   current weights, which have only been trained on chunks 0..c-1;
2. unless c is the last chunk, train for ``epochs`` on chunk c's targets,
   cut into sequences of ``seq_len``.

So no weight ever saw a target before that target was scored. With learning
rate 0 the weights never move and the result equals ``eval_sliding``. The
n-gram tilt (``eval_ttt.ngram_*``, pgolf/eval/ngram_tilt.py) changes only the
scores; training always uses the untilted loss.

Distributed: each rank scores a contiguous share of each chunk's windows;
for training, each optimizer step's sequences are shared out and every rank
normalises its summed loss by the *global* token count of the step, so one
SUM all-reduce of the flattened gradients gives exactly the single-process
mean gradient and every rank applies the same update. Per-chunk score sums
stay on the device and are all-reduced once at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from pgolf.data.bpb import ByteTables
from pgolf.config import check
from pgolf.distributed import all_reduce_sum_, shard_range
from pgolf.eval.ngram_params import NgramTiltConfig
from pgolf.eval.sliding import (EvalSums, Forward, Observer, EvalSlidingConfig, WindowScorer, nll_forward,
                                tilt_for)
from pgolf.precision import autocast, synchronize
from pgolf.progress import Progress
from pgolf.eval.windows import chunk_sequences, chunk_window_bounds, plan_sliding

if TYPE_CHECKING:
    from pgolf.eval.frozen_blocks import FrozenBlocks
    from pgolf.eval.ngram_tilt import NgramTilt

LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")  # the modules eval_ttt.lora_targets may adapt (pgolf/eval/lora.py)


@dataclass(frozen=True)
class EvalTTTConfig(NgramTiltConfig):
    """``eval_ttt`` params (the windows are ``eval_sliding``'s; the tilt keys are its own)."""

    chunk_tokens: int     # targets per chunk: scored, then trained on
    epochs: int           # passes over each chunk's sequences
    optimizer: Literal["sgd", "adamw"]
    lr: float             # peak learning rate (chunk 0)
    lr_schedule: Literal["cosine", "constant"]   # cosine: lr·½(1+cos(π·c/(chunks-1)))
    momentum: float       # SGD momentum; AdamW beta1
    beta2: float          # AdamW beta2 (unused by SGD)
    weight_decay: float   # SGD: L2 added to the gradient; AdamW: decoupled
    freeze_blocks: int    # the first N transformer blocks stay fixed; 0 adapts everything
    grad_clip: float      # max global gradient norm after averaging; 0 = off
    batch_seqs: int       # sequences per optimizer step, all ranks together
    # mode doc_lora: per-document LoRA TTT + phased global SGD (pgolf/eval/doc_ttt.py, docs/FRONTIER.md §5.2-5.3).
    # It reads chunk_tokens (targets per chunk), lr, momentum (beta1), beta2, weight_decay and adam_eps
    # for its AdamW; epochs, lr_schedule, freeze_blocks, grad_clip and batch_seqs are chunked-only.
    mode: Literal["chunked", "doc_lora"] = "chunked"
    adam_eps: float = 1e-8
    batch_docs: int = 64            # documents per batch (per rank)
    short_doc_chunks: tuple[tuple[int, int], ...] = ()  # (max doc targets, chunk) pairs for short batches
    lora_rank: int = 80
    lora_alpha: float = 144.0       # adapter output scale alpha / rank
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "head")
    lora_warm_a: bool = True        # keep A across batches (B and AdamW state are reset per batch)
    lora_seed: int = 0              # A's random init (per rank and phase)
    prefix_docs: int = 0            # phased global SGD on the first P scored documents; 0 = off
    phases: int = 0
    global_lr: float = 0.001
    global_momentum: float = 0.9
    global_grad_clip: float = 1.0
    global_chunk_tokens: int = 32768
    # doc_lora only (the chunked mode compiles with eval_sliding.compile): torch.compile the per-chunk forward +
    # backward on padded shapes and global SGD's forward (pgolf/eval/lora_forward.py); CUDA only, CPU stays eager.
    compile: bool = False
    compile_width_step: int = 256   # widths padded to multiples of this (powers of two below); 0 = dynamic width, rows

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.chunk_tokens >= 1, "chunk_tokens", "must be >= 1")
        check(self.epochs >= 0, "epochs", "must be >= 0")
        check(self.lr >= 0 and math.isfinite(self.lr), "lr", "must be finite and >= 0")
        check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        check(0.0 <= self.beta2 < 1.0, "beta2", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.freeze_blocks >= 0, "freeze_blocks", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
        check(self.batch_seqs >= 1, "batch_seqs", "must be >= 1")
        check(self.adam_eps > 0, "adam_eps", "must be > 0")
        check(self.mode == "chunked" or self.optimizer == "adamw", "optimizer", "mode doc_lora needs adamw")
        check(self.batch_docs >= 1, "batch_docs", "must be >= 1")
        check(all(m >= 1 and c >= 1 for m, c in self.short_doc_chunks), "short_doc_chunks",
              "pairs must be [max targets >= 1, chunk >= 1]")
        check(self.lora_rank >= 1 and self.lora_alpha > 0, "lora_rank", "need lora_rank >= 1 and lora_alpha > 0")
        check(len(self.lora_targets) > 0 and set(self.lora_targets) <= set(LORA_TARGETS)
              and len(set(self.lora_targets)) == len(self.lora_targets), "lora_targets",
              f"must be distinct names from {list(LORA_TARGETS)}")
        check(self.prefix_docs >= 0 and self.phases >= 0, "prefix_docs", "prefix_docs and phases must be >= 0")
        check(self.global_lr >= 0 and 0 <= self.global_momentum < 1 and self.global_grad_clip >= 0,
              "global_lr", "need global_lr >= 0, global_momentum in [0, 1), global_grad_clip >= 0")
        check(self.global_chunk_tokens >= 1, "global_chunk_tokens", "must be >= 1")
        check(self.compile_width_step >= 0, "compile_width_step", "must be >= 0 (0 = dynamic width)")


def chunk_lr(cfg: EvalTTTConfig, chunk: int, chunks: int) -> float:
    """Learning rate while training on ``chunk`` (the records' cosine over chunk index)."""
    if cfg.lr_schedule == "constant" or chunks <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (chunks - 1)))


class AllTrainable:
    """:class:`pgolf.eval.frozen_blocks.FrozenBlocks` with no block frozen (``eval_ttt.freeze_blocks: 0``):
    every parameter that requires grad adapts, so that module is loaded only when blocks are frozen."""

    def __init__(self, model: torch.nn.Module):
        self.trainable = [param for param in model.parameters() if param.requires_grad]

    def restore_(self) -> None:
        pass

    def remove(self) -> None:
        pass


def make_optimizer(params: list[torch.nn.Parameter], cfg: EvalTTTConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


class ChunkTrainer:
    """Trains the model on one chunk's sequences; identical updates on every rank."""

    def __init__(self, model: torch.nn.Module, forward: Forward, tokens: torch.Tensor, seq_len: int,
                 cfg: EvalTTTConfig, params: list[torch.nn.Parameter], frozen: FrozenBlocks | AllTrainable,
                 rank: int, world_size: int):
        self.model, self.forward, self.tokens = model, forward, tokens
        self.device = tokens.device
        self.num_targets = tokens.numel() - 1
        self.seq_len, self.cfg = seq_len, cfg
        self.params, self.frozen = params, frozen
        self.rank, self.world_size = rank, world_size
        self.optimizer = make_optimizer(params, cfg)
        for p in params:   # grads live for the whole run: zeroed, never freed
            p.grad = torch.zeros_like(p)
        self.cols = torch.arange(seq_len + 1, device=self.device)
        self.row_index = torch.arange(-(-cfg.batch_seqs // world_size), device=self.device)
        self.steps = 0

    def train_chunk(self, chunk: int, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        starts, lengths = chunk_sequences(chunk, self.cfg.chunk_tokens, self.num_targets, self.seq_len)
        self.model.train()
        for _ in range(self.cfg.epochs):
            for a in range(0, starts.size, self.cfg.batch_seqs):
                self._step(starts[a:a + self.cfg.batch_seqs], lengths[a:a + self.cfg.batch_seqs])

    def warm_up(self) -> float:
        """Forward and backward on chunk 0's first batch, then zero the gradients again.

        Builds a compiled training graph before the timed run; no weight,
        gradient or optimizer state is left changed. Returns its seconds.
        """
        synchronize(self.device)
        began = time.perf_counter()
        starts, lengths = chunk_sequences(0, self.cfg.chunk_tokens, self.num_targets, self.seq_len)
        self.model.train()
        self._accumulate_grads(starts[:self.cfg.batch_seqs], lengths[:self.cfg.batch_seqs])
        self.optimizer.zero_grad(set_to_none=False)
        synchronize(self.device)
        return time.perf_counter() - began

    def _step(self, starts: np.ndarray, lengths: np.ndarray) -> None:
        """One optimizer step on consecutive sequences (``starts`` spaced by seq_len)."""
        self.optimizer.zero_grad(set_to_none=False)
        self._accumulate_grads(starts, lengths)
        if self.world_size > 1:
            all_reduce_grads_(self.params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.frozen.restore_()
        self.steps += 1

    def _accumulate_grads(self, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Backward of this rank's share of the batch's mean token loss into the grads."""
        step_tokens = int(lengths.sum())
        lo, hi = shard_range(starts.size, self.rank, self.world_size)
        if hi > lo:
            # This rank's rows, built on the device (a host copy would stall the GPU
            # every step); every rank uses the same row count, extra rows train nothing.
            rows = -(-starts.size // self.world_size)
            end = int(starts[hi - 1] + lengths[hi - 1])
            row_starts = int(starts[lo]) + self.seq_len * self.row_index[:rows]
            row_lengths = (end - row_starts).clamp_(0, self.seq_len)
            index = (row_starts[:, None] + self.cols).clamp_(max=self.num_targets)
            window = self.tokens[index]
            ids, targets = window[:, :-1].contiguous(), window[:, 1:].contiguous()
            with autocast(self.device):
                nll = self.forward(ids, targets)
            trained = self.cols[:-1] < row_lengths[:, None]
            loss = torch.where(trained, nll, 0.0).sum() / step_tokens
            loss.backward()


def all_reduce_grads_(params: list[torch.nn.Parameter]) -> None:
    """SUM every gradient across ranks with one collective per dtype, not one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_sum_(flat)
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(piece.view_as(grad))


@dataclass(frozen=True)
class TTTResult:
    sums: EvalSums
    windows: int
    seconds: float            # scoring + training (after the warm-up, when one ran)
    train_steps: int          # optimizer steps per rank
    num_chunks: int
    chunks: list[dict]        # {chunk, running_bpb, chunk_bpb} for chunks that scored bytes
    compile_seconds: float = 0.0  # warm-up: one discarded scoring batch + one zeroed backward
    tilt: NgramTilt | None = None  # the n-gram tilt of the scores, if any (its hint pass is in ``seconds``)

    @property
    def tokens_per_s(self) -> float:
        return self.sums.scored_tokens / self.seconds if self.seconds > 0 else math.nan


def chunk_series(per_chunk: np.ndarray) -> list[dict]:
    """Per-chunk and running bpb from per-chunk (Σ NLL, targets, bytes) rows."""
    running = np.cumsum(per_chunk, axis=0)
    series = []
    for c, (row, total) in enumerate(zip(per_chunk, running)):
        if row[2] > 0:
            series.append({"chunk": c, "running_bpb": float(total[0] / math.log(2.0) / total[2]),
                           "chunk_bpb": float(row[0] / math.log(2.0) / row[2])})
    return series


def run_ttt(model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables,
            windows: EvalSlidingConfig, cfg: EvalTTTConfig, *, rank: int = 0, world_size: int = 1,
            forward: Forward | None = None, observer: Observer | None = None,
            progress: Progress | None = None, warmup: bool = False, tilt: NgramTilt | None = None
            ) -> TTTResult:
    """Score-first TTT over ``tokens``; ``model`` is trained in place.

    One ``forward`` (default ``nll_forward(model, windows.compile, …)``) serves
    scoring and training: compiled, it holds an inference and a training graph.
    ``progress`` advances once per chunk (scored and trained), by the chunk's
    targets over all ranks. ``warmup`` first runs one discarded scoring batch
    and one backward whose gradients are zeroed (no weight moves), so a
    compiled forward's two graphs exist before the timed run; its seconds are
    ``compile_seconds``. With ``cfg.ngram_tilt`` the scores (not the training
    loss) are tilted by ``tilt`` (built here when None); its hint pass counts
    in ``seconds``.
    """
    forward = forward or nll_forward(model, windows.compile, tokens.device)
    tilt, tilted = tilt_for(model, tokens, windows.compile, cfg, tilt)
    scorer = WindowScorer(model, tokens, tables, windows.batch_windows, forward, observer, tilted=tilted)
    plan = plan_sliding(scorer.num_targets, windows.seq_len, windows.stride)
    bounds = chunk_window_bounds(plan, cfg.chunk_tokens)
    chunks = bounds.size - 1
    if cfg.freeze_blocks:
        from pgolf.eval.frozen_blocks import FrozenBlocks
        frozen: FrozenBlocks | AllTrainable = FrozenBlocks(model, cfg.freeze_blocks)
    else:
        frozen = AllTrainable(model)
    try:
        trainer = ChunkTrainer(model, scorer.forward, tokens, windows.seq_len, cfg, frozen.trainable,
                               frozen, rank, world_size)
        dplan = scorer.upload(plan)
        compile_seconds = 0.0
        if warmup and plan.num_windows:
            compile_seconds = scorer.warm_up(dplan)
            if chunks > 1 and cfg.epochs > 0:
                compile_seconds += trainer.warm_up()
        synchronize(scorer.device)
        began = time.perf_counter()
        per_chunk = torch.zeros(chunks, 3, dtype=torch.float64, device=scorer.device)
        if progress is not None:  # targets scored before each window, from the host plan
            scored = np.concatenate([[0], np.cumsum(plan.lengths - (plan.score_from - plan.starts))])
            progress.start("ttt chunks", chunks, "chunks")
        for c in range(chunks):
            first = int(bounds[c])
            a, b = shard_range(int(bounds[c + 1]) - first, rank, world_size)
            per_chunk[c] = scorer.score(dplan, first + a, first + b)
            if c < chunks - 1 and cfg.epochs > 0:
                trainer.train_chunk(c, chunk_lr(cfg, c, chunks))
            if progress is not None:
                progress.advance(1, int(scored[bounds[c + 1]] - scored[first]))
        all_reduce_sum_(per_chunk)
        rows = per_chunk.cpu().numpy()
        synchronize(scorer.device)
        seconds = time.perf_counter() - began + (tilt.seconds if tilt is not None else 0.0)
    finally:
        frozen.remove()
    return TTTResult(EvalSums.from_tensor(per_chunk.sum(0)), plan.num_windows, seconds,
                     trainer.steps, chunks, chunk_series(rows), compile_seconds, tilt)


def untrained_reason(result: "TTTResult", cfg: EvalTTTConfig, targets: int) -> str | None:
    """Why TTT changed nothing, or None: only chunks before the last are trained on, so a
    validation stream within one chunk is scored exactly as the sliding eval scores it."""
    if result.train_steps > 0 or cfg.epochs == 0:
        return None
    return (f"val has {targets:,} targets, within one chunk of eval_ttt.chunk_tokens {cfg.chunk_tokens:,}: "
            "nothing was trained on (lower it for TTT to act)")
