"""TrainConfig: the `train` section of params.yaml (the loop; optimizer settings live in `optim`)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal

from pgolf.config import check
from pgolf.errors import ParamError
from pgolf.precision import COMPILE_MODES

from pgolf.train.schedule import parse_seq_len_schedule
from pgolf.train.select import CANDIDATES


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    seq_len: int                  # tokens per sequence (packed_rows: the longest document segment)
    tokens_per_step: int          # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_tokens: int       # tokens per rank per forward/backward (a multiple of seq_len)
    max_steps: int                # optimizer steps; the run stops here at the latest
    max_train_seconds: float      # wall-clock cap on training steps only; 0 = off
    warmdown: Literal["steps", "time"]  # place the LR warmdown by step count or by wall clock
    warmdown_steps: int           # steps form: linear decay over the last warmdown_steps of max_steps
    warmdown_frac: float          # time form: linear decay over the last warmdown_frac of max_train_seconds
    compile: bool                 # torch.compile the model on CUDA (CPU always runs eager)
    compile_warmup_steps: int     # untimed steps to compile before training; state is restored after
    mix_order_reduction: bool     # inductor's mixed-order reduction fusion in the compiled step (off: faster)
    qat_lr_scale_threshold: float  # late QAT (on quantize's grid bits) switches on once lr_scale < this; 0 = off
    holdout_tokens: int           # tail of the train stream kept out of training to choose the weights
    final_weights: Literal["best_holdout", "live", "ema", "swa"]
    resume_every: int             # steps between writes of the resume state; 0 = none
    log_every: int                # steps between log lines / curve points
    min_lr_scale: float = 0.0     # LR floor of the warmdown (frontier MIN_LR 0.1); 0 = decay to 0
    # Depth recurrence (model.recur_*) switches on at this fraction of the run
    # (wall clock when max_train_seconds > 0, else of max_steps); 0 = from the start.
    recur_start_frac: float = 0.0
    # torch.compile mode of the training step (pgolf.precision.COMPILE_MODES): "reduce-overhead"
    # replays the step's forward and backward as CUDA graphs; "default" is today's step.
    compile_mode: str = "default"

    # Progressive context (docs/FRONTIER.md §3.3, P2014): "LENGTH@FRACTION" entries, e.g.
    # ["1024@0.1", "2048@0.7", "3072@1.0"]; the attention span is LENGTH while the run's progress
    # (as for recur_start_frac) is <= FRACTION; the last LENGTH is seq_len. Tokens per step stay
    # fixed. Empty = off. pgolf.train.context says what a length change does.
    seq_len_schedule: tuple[str, ...] = ()
    # One packed row of micro_batch_tokens per micro-step, documents cut into segments of
    # <= seq_len from each BOS (F1855's loader, docs/FRONTIER.md §1.6); needs model.doc_attention.
    packed_rows: bool = False
    seq_change_warmup_steps: int = 0  # LR ramp over this many steps after each length change (P2014 32)

    def __post_init__(self) -> None:
        check(self.seq_len >= 1, "seq_len", "must be >= 1")
        check(self.micro_batch_tokens >= self.seq_len and self.micro_batch_tokens % self.seq_len == 0,
              "micro_batch_tokens", f"must be a positive multiple of seq_len ({self.seq_len})")
        check(self.tokens_per_step >= self.micro_batch_tokens
              and self.tokens_per_step % self.micro_batch_tokens == 0,
              "tokens_per_step", f"must be a positive multiple of micro_batch_tokens ({self.micro_batch_tokens})")
        check(self.max_steps >= 1, "max_steps", "must be >= 1")
        check(math.isfinite(self.max_train_seconds) and self.max_train_seconds >= 0, "max_train_seconds",
              "must be >= 0 (0 = no cap)")
        if self.warmdown == "steps":
            check(0 <= self.warmdown_steps <= self.max_steps, "warmdown_steps",
                  f"must be in [0, max_steps={self.max_steps}] so training starts at peak LR")
        else:
            check(self.max_train_seconds > 0, "warmdown",
                  "'time' needs max_train_seconds > 0 (the warmdown is a fraction of that cap)")
            check(0.0 <= self.warmdown_frac <= 1.0, "warmdown_frac", "must be in [0, 1]")
        check(self.compile_warmup_steps >= 0, "compile_warmup_steps", "must be >= 0")
        check(0.0 <= self.qat_lr_scale_threshold <= 1.0, "qat_lr_scale_threshold", "must be in [0, 1] (0 = off)")
        check(self.holdout_tokens > self.seq_len, "holdout_tokens",
              f"must exceed seq_len ({self.seq_len}): the holdout is scored in whole sequences")
        check(self.final_weights == "best_holdout" or self.final_weights in CANDIDATES, "final_weights",
              f"must be best_holdout or one of {list(CANDIDATES)}")
        check(self.resume_every >= 0, "resume_every", "must be >= 0 (0 = no resume state)")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(0.0 <= self.min_lr_scale <= 1.0, "min_lr_scale", "must be in [0, 1] (0 = decay to 0)")
        check(0.0 <= self.recur_start_frac <= 1.0, "recur_start_frac", "must be in [0, 1]")
        check(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {list(COMPILE_MODES)}")

        check(self.seq_change_warmup_steps >= 0, "seq_change_warmup_steps", "must be >= 0 (0 = off)")
        lengths = [length for length, _ in self.context_schedule]
        if lengths:
            check(lengths[-1] == self.seq_len, "seq_len_schedule",
                  f"the last length ({lengths[-1]}) must be seq_len ({self.seq_len})")
            for n in lengths:  # packed: the row is micro_batch_tokens; rows: they change length, tokens do not
                if self.packed_rows:
                    check(n <= self.micro_batch_tokens, "seq_len_schedule",
                          f"length {n} must be <= micro_batch_tokens ({self.micro_batch_tokens})")
                else:
                    check(self.micro_batch_tokens % n == 0, "seq_len_schedule",
                          f"length {n} must divide micro_batch_tokens ({self.micro_batch_tokens}): "
                          "rows change length, tokens per step do not")

    @property
    def context_schedule(self) -> tuple[tuple[int, float], ...]:
        """``seq_len_schedule`` parsed: ((length, up-to fraction), ...); empty when off."""
        try:
            return parse_seq_len_schedule(self.seq_len_schedule)
        except ValueError as exc:
            raise ParamError("seq_len_schedule", str(exc)) from None

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step so that one GPU reproduces the step of N."""
        per_micro_step = world_size * self.micro_batch_tokens
        if self.tokens_per_step % per_micro_step:
            raise ParamError("train.tokens_per_step",
                             f"{self.tokens_per_step} is not a multiple of world size {world_size} x "
                             f"micro_batch_tokens {self.micro_batch_tokens}")
        return self.tokens_per_step // per_micro_step


# Settings that do not change the trained weights: how often things are
# written, and which candidate is picked after training.
HASH_EXCLUDED_TRAIN_KEYS = ("resume_every", "log_every", "final_weights")


def config_hash(model: dict, optim: dict, train: dict, world_size: int,
                shard_sizes: list[tuple[str, int]]) -> str:
    """A training run's identity (sha256): the resolved model/optim/train configs minus
    HASH_EXCLUDED_TRAIN_KEYS, the world size and the train shards' names and sizes. A resume state
    (pgolf.train.resume) continues only a run of the same hash; the train metrics report it."""
    train = {k: v for k, v in train.items() if k not in HASH_EXCLUDED_TRAIN_KEYS}
    blob = json.dumps({"model": model, "optim": optim, "train": train, "world_size": world_size,
                       "train_shards": shard_sizes}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
