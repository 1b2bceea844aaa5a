"""Sliding-window bits per byte of a causal LM over the validation stream (docs/RECIPE.md §1.4, §5.2).

The library needs only ``model.token_nll(ids [B, T], targets [B, T]) -> [B, T]``
(fp32 nats, causal: position t may depend on ``ids[:, :t+1]`` only).

Windows come from :mod:`pgolf.eval.windows`. A batch is always
``batch_windows × max_length`` tokens: shorter windows and the missing rows
of the last batch are padded and masked, so a compiled forward sees a single
shape. For a causal model padding after a position cannot change its score.
Per batch, the masked NLL, target count and target bytes are added to one
float64 accumulator on the device; nothing is read back until the end, so the
GPU never waits on the host (an optional ``progress`` is told each batch's
windows and targets from the host copy of the plan). Under ``torchrun`` each
rank scores a contiguous share of the windows and the three sums are
all-reduced (SUM) once. With the n-gram tilt on (pgolf/eval/ngram_tilt.py)
the scores come from ``model.forward_logits`` tilted toward each target's
hint; the hint pass runs once per evaluation and its seconds count in the
scoring time.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from pgolf.data.bpb import ByteTables, bits_per_byte, target_bytes
from pgolf.config import check
from pgolf.distributed import all_reduce_sum_, shard_range
from pgolf.precision import autocast, compile_enabled, maybe_compile, synchronize
from pgolf.progress import Progress
from pgolf.eval.ngram_params import NgramTiltConfig, build_tilt
from pgolf.eval.windows import WindowPlan, eval_target_count, plan_nonoverlapping, plan_sliding

if TYPE_CHECKING:
    from pgolf.eval.ngram_tilt import NgramTilt

# observer(target_positions, context_tokens, nll): CPU tensors of the targets a
# batch scored, their count of earlier tokens in the window, and their NLL.
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
# forward(ids [B, T], targets [B, T]) -> NLL [B, T]: model.token_nll, maybe compiled.
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# tilted(ids, targets, target positions [B, T]) -> tilted NLL [B, T]: NgramTilt.forward.
TiltedForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalSlidingConfig(NgramTiltConfig):
    """``eval_sliding`` params; ``eval_ttt`` scores with the same windows (its own tilt keys)."""

    seq_len: int            # tokens per window
    stride: int             # targets scored per window after the first
    batch_windows: int      # windows per forward pass (per rank)
    trim_to_seq_len: bool   # cut the stream to whole seq_len sequences, like the records
    compile: bool           # torch.compile the forward (CUDA only; CPU stays eager)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.seq_len >= 1, "seq_len", "must be >= 1")
        check(1 <= self.stride <= self.seq_len, "stride", f"must be in [1, seq_len={self.seq_len}]")
        check(self.batch_windows >= 1, "batch_windows", "must be >= 1")


@dataclass(frozen=True)
class EvalSums:
    """Totals over scored targets, identical on every rank after the all-reduce."""

    nll_sum: float       # Σ NLL in nats (float64)
    scored_tokens: int
    byte_sum: int

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> "EvalSums":
        nll, tokens, nbytes = sums.detach().cpu().tolist()
        return cls(nll_sum=nll, scored_tokens=int(round(tokens)), byte_sum=int(round(nbytes)))

    @property
    def val_loss(self) -> float:
        return self.nll_sum / self.scored_tokens if self.scored_tokens else math.nan

    @property
    def val_bpb(self) -> float:
        return bits_per_byte(self.nll_sum, self.byte_sum) if self.byte_sum > 0 else math.nan


@dataclass(frozen=True)
class EvalResult:
    sums: EvalSums
    windows: int         # windows in the plan (all ranks)
    seconds: float       # wall clock of the scoring (after the warm-up, when one ran)
    compile_seconds: float = 0.0  # the untimed-by-``seconds`` warm-up batch (compilation)
    tilt: NgramTilt | None = None  # the n-gram tilt applied, if any (its hint pass is in ``seconds``)

    @property
    def tokens_per_s(self) -> float:
        return self.sums.scored_tokens / self.seconds if self.seconds > 0 else math.nan


def score_metrics(result: "EvalResult") -> dict:
    """The metrics both eval stages report of a scoring run (sliding or TTT)."""
    metrics = {"val_loss": result.sums.val_loss, "val_bpb": result.sums.val_bpb,
               "scored_tokens": result.sums.scored_tokens, "bytes": result.sums.byte_sum,
               "seconds": round(result.seconds, 3), "compile_seconds": round(result.compile_seconds, 3),
               "tokens_per_s": round(result.tokens_per_s, 1), "windows": result.windows}
    if result.tilt is not None:
        metrics.update(ngram_seconds=round(result.tilt.seconds, 3), ngram_gated=result.tilt.gated,
                       ngram_gated_fraction=result.tilt.gated / max(1, result.tilt.hint.numel()))
    return metrics


def prepare_tokens(stream: np.ndarray, seq_len: int, trim_to_seq_len: bool, device: torch.device,
                   source: str) -> torch.Tensor:
    """The validation stream (trimmed if asked) as an int64 tensor on ``device``."""
    targets = eval_target_count(int(stream.shape[0]), seq_len, trim_to_seq_len, source)
    return torch.from_numpy(np.asarray(stream[:targets + 1], dtype=np.int64)).to(device)


def nll_forward(model: torch.nn.Module, use_compile: bool, device: torch.device) -> Forward:
    """``model.token_nll``, compiled (static shapes, full graph) when asked and on CUDA.

    Build it once and pass it to every evaluation of the same model, so the
    graph is compiled once.
    """
    return maybe_compile(model.token_nll, compile_enabled(use_compile, device))


@dataclass(frozen=True, eq=False)
class DevicePlan:
    """A :class:`WindowPlan` uploaded once, so batches slice it without host work."""

    plan: WindowPlan
    starts: torch.Tensor
    offsets: torch.Tensor    # score_from - starts: scored columns begin here
    lengths: torch.Tensor


class WindowScorer:
    """Scores ranges of a window plan in fixed-shape batches, accumulating float64 sums."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables,
                 batch_windows: int, forward: Forward, observer: Observer | None = None,
                 progress: Progress | None = None, tilted: TiltedForward | None = None):
        if tokens.ndim != 1 or tokens.numel() < 2:
            raise ValueError(f"tokens must be a 1-D stream of >= 2 ids, got shape {tuple(tokens.shape)}")
        self.model = model
        self.tokens = tokens
        self.device = tokens.device
        self.num_targets = tokens.numel() - 1
        self.tables = tables
        self.batch_windows = batch_windows
        self.observer = observer
        self.forward = forward
        self.tilted = tilted  # scores instead of ``forward`` when the n-gram tilt is on
        self.progress = progress

    def upload(self, plan: WindowPlan) -> DevicePlan:
        if plan.num_targets != self.num_targets:
            raise ValueError(f"plan covers {plan.num_targets} targets, stream has {self.num_targets}")
        put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        return DevicePlan(plan, put(plan.starts), put(plan.score_from - plan.starts), put(plan.lengths))

    def warm_up(self, dplan: DevicePlan) -> float:
        """Score the plan's first batch and discard it; return its seconds.

        With a compiled forward this pays the compilation before the timed
        scoring starts, so ``seconds`` measures the steady state on any
        validation size. Nothing is observed, counted or kept: the model is
        in inference mode and the sums are dropped.
        """
        observer, progress = self.observer, self.progress
        self.observer = self.progress = None
        try:
            synchronize(self.device)
            began = time.perf_counter()
            self.score(dplan, 0, min(self.batch_windows, dplan.plan.num_windows))
            synchronize(self.device)
            return time.perf_counter() - began
        finally:
            self.observer, self.progress = observer, progress

    def score(self, dplan: DevicePlan, lo: int, hi: int) -> torch.Tensor:
        """Sums (Σ NLL, targets, bytes) as float64 [3] on the device over windows [lo, hi)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        width = dplan.plan.max_length
        cols = torch.arange(width + 1, device=self.device)
        if self.progress is not None:  # targets per window, from the host copy of the plan
            p = dplan.plan
            scored = np.cumsum(p.lengths[lo:hi] - (p.score_from[lo:hi] - p.starts[lo:hi]))
        with torch.inference_mode():
            for a in range(lo, hi, self.batch_windows):
                b = min(a + self.batch_windows, hi)
                sums += self._score_batch(dplan.starts[a:b], dplan.offsets[a:b], dplan.lengths[a:b],
                                          cols)
                if self.progress is not None:
                    tokens = int(scored[b - lo - 1]) - (int(scored[a - lo - 1]) if a > lo else 0)
                    self.progress.advance(b - a, tokens)
        return sums

    def _score_batch(self, starts: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                     cols: torch.Tensor) -> torch.Tensor:
        width = cols.numel() - 1
        missing = self.batch_windows - starts.numel()
        if missing:
            # Dummy rows read the stream's first tokens and score nothing.
            zeros = starts.new_zeros(missing)
            starts = torch.cat([starts, zeros])
            offsets = torch.cat([offsets, zeros + width])
            lengths = torch.cat([lengths, zeros])
        index = (starts[:, None] + cols).clamp_(max=self.num_targets)
        window = self.tokens[index]
        ids, targets = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        with autocast(self.device):
            if self.tilted is None:
                nll = self.forward(ids, targets)
            else:
                nll = self.tilted(ids, targets, index[:, :-1])
        col = cols[:-1]
        scored = (col >= offsets[:, None]) & (col < lengths[:, None])
        nll_sum = torch.where(scored, nll.double(), 0.0).sum()
        byte_sum = torch.where(scored, target_bytes(self.tables, ids, targets, index[:, 1:]), 0).sum()
        if self.observer is not None:
            positions = (starts[:, None] + col)[scored]
            context = col.expand_as(scored)[scored]
            self.observer(positions.cpu(), context.cpu(), nll[scored].cpu())
        return torch.stack([nll_sum, scored.sum().double(), byte_sum.double()])


def score_plan(scorer: WindowScorer, plan: WindowPlan, rank: int, world_size: int,
               task: str = "windows", warmup: bool = False, tilt: NgramTilt | None = None) -> EvalResult:
    """Score every window of ``plan`` (this rank's contiguous share) and all-reduce.

    ``warmup`` first scores (and discards) one batch, timed as ``compile_seconds``.
    ``tilt`` (already the scorer's) is recorded and its hint pass added to ``seconds``.
    """
    dplan = scorer.upload(plan)
    compile_seconds = scorer.warm_up(dplan) if warmup and plan.num_windows else 0.0
    synchronize(scorer.device)
    began = time.perf_counter()
    lo, hi = shard_range(plan.num_windows, rank, world_size)
    if scorer.progress is not None:
        scorer.progress.start(task, hi - lo, "windows")
    sums = all_reduce_sum_(scorer.score(dplan, lo, hi))
    result = EvalSums.from_tensor(sums)
    synchronize(scorer.device)
    seconds = time.perf_counter() - began + (tilt.seconds if tilt is not None else 0.0)
    return EvalResult(result, plan.num_windows, seconds, compile_seconds, tilt)


def tilt_for(model: torch.nn.Module, tokens: torch.Tensor, use_compile: bool, cfg: NgramTiltConfig,
             tilt: NgramTilt | None) -> tuple[NgramTilt | None, TiltedForward | None]:
    """(tilt, its scoring forward): ``tilt`` if given, else built from ``cfg`` (None when off)."""
    tilt = tilt if tilt is not None else build_tilt(tokens, cfg)
    if tilt is None:
        return None, None
    return tilt, tilt.forward(model, compile_enabled(use_compile, tokens.device))


def score_sliding_windows(model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables,
                          cfg: EvalSlidingConfig, *, rank: int = 0, world_size: int = 1,
                          forward: Forward | None = None, observer: Observer | None = None,
                          progress: Progress | None = None, warmup: bool = False,
                          tilt: NgramTilt | None = None) -> EvalResult:
    """Exact sliding-window eval: every target of ``tokens`` scored once (docs/RECIPE.md §5.2, §6.1).

    ``forward`` defaults to ``nll_forward(model, cfg.compile, tokens.device)``;
    ``warmup`` scores one discarded batch first (see :meth:`WindowScorer.warm_up`).
    With ``cfg.ngram_tilt`` the scores are tilted by ``tilt`` (built here when
    None), and its hint pass counts in ``seconds``.
    """
    forward = forward or nll_forward(model, cfg.compile, tokens.device)
    tilt, tilted = tilt_for(model, tokens, cfg.compile, cfg, tilt)
    scorer = WindowScorer(model, tokens, tables, cfg.batch_windows, forward, observer, progress, tilted)
    plan = plan_sliding(scorer.num_targets, cfg.seq_len, cfg.stride)
    return score_plan(scorer, plan, rank, world_size, "sliding windows", warmup, tilt)


def score_nonoverlapping(model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables,
                         cfg: EvalSlidingConfig, *, rank: int = 0, world_size: int = 1,
                         forward: Forward | None = None, observer: Observer | None = None,
                         progress: Progress | None = None, tilt: NgramTilt | None = None) -> EvalResult:
    """Diagnostic: consecutive seq_len windows, each scored in full (docs/RECIPE.md §5.1).

    Tilted like :func:`score_sliding_windows`, but the hint pass is not added to ``seconds``.
    """
    forward = forward or nll_forward(model, cfg.compile, tokens.device)
    tilt, tilted = tilt_for(model, tokens, cfg.compile, cfg, tilt)
    scorer = WindowScorer(model, tokens, tables, cfg.batch_windows, forward, observer, progress, tilted)
    plan = plan_nonoverlapping(scorer.num_targets, cfg.seq_len)
    result = score_plan(scorer, plan, rank, world_size, "non-overlapping windows")
    return dataclasses.replace(result, tilt=tilt)


def evaluate_sliding(model: torch.nn.Module, tokens: torch.Tensor, tables: ByteTables, cfg: EvalSlidingConfig,
                     *, rank: int = 0, world_size: int = 1, progress: Progress | None = None) -> dict:
    """The eval_sliding stage's scores: exact sliding windows, then non-overlapping windows as a diagnostic.

    Both share one forward (and one tilt); a compiled one is built on one
    discarded batch first, timed apart (``compile_seconds``).
    """
    forward = nll_forward(model, cfg.compile, tokens.device)
    tilt = build_tilt(tokens, cfg)
    shared = dict(rank=rank, world_size=world_size, progress=progress, forward=forward, tilt=tilt)
    sliding = score_sliding_windows(model, tokens, tables, cfg, **shared,
                                    warmup=compile_enabled(cfg.compile, tokens.device))
    plain = score_nonoverlapping(model, tokens, tables, cfg, **shared)
    return {**score_metrics(sliding), "nonoverlap_val_loss": plain.sums.val_loss,
            "nonoverlap_val_bpb": plain.sums.val_bpb, "nonoverlap_seconds": round(plain.seconds, 3)}
