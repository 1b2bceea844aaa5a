"""Training context: how long a stretch of tokens attention spans, and how it grows (docs/FRONTIER.md §1.6, §3.3).

Two ways to lay out a micro-batch of ``micro_batch_tokens`` tokens:

* rows (default): ``[micro_batch_tokens // L, L]``; attention spans a row
  (with ``model.doc_attention``, only within a document inside the row), so
  documents are cut at row edges.
* packed (``train.packed_rows``, F1855's loader): one row of
  ``micro_batch_tokens`` tokens; document attention cuts every document into
  segments of at most L tokens counted from its BOS (the cut pieces get no
  BOS: only the mask changes). RoPE positions run over the whole row
  (docs/FRONTIER.md §2.4), so the model's tables are extended to cover it.

L is ``train.seq_len``, or with progressive context (``train.seq_len_schedule``,
P2014's ``1024@0.1,2048@0.7,3072@1.0``) the schedule's length at the run's
progress (:func:`pgolf.train.schedule.scheduled_seq_len`); tokens per step
never change. What a change of L costs:

* packed: the cap is a tensor the compiled graph reads (``GPT.set_doc_span``),
  so nothing recompiles; the block mask is rebuilt every forward anyway.
* rows: the micro-batch changes shape, so the compiled step compiles once per
  length (``dynamic=False``: static shapes, never a dynamic-shape graph); the
  compile warm-up runs every length so no compile lands in the timed run.

After each change the LR scale is ramped over ``seq_change_warmup_steps``
steps (:func:`pgolf.train.schedule.seq_change_ramp`). A change is logged.
The span is a function of the run's progress, so a resumed run recomputes
it; a resume inside a ramp's steps skips the rest of that ramp.
"""
from __future__ import annotations

from pgolf.data.loader import TrainLoader
from pgolf.errors import ParamError
from pgolf.model.gpt import GPT
from pgolf.train.config import TrainConfig
from pgolf.train.schedule import run_progress, scheduled_seq_len, seq_change_ramp


class TrainContext:
    """The current attention span of a run and its switches (module docstring)."""

    def __init__(self, cfg: TrainConfig, model: GPT):
        if cfg.packed_rows and not model.cfg.doc_attention:
            raise ParamError("train.packed_rows", "needs model.doc_attention: true (a packed row holds many "
                             "documents; without the document mask attention would span the whole row)")
        self.cfg = cfg
        self.schedule = cfg.context_schedule
        self.packed = cfg.packed_rows
        self.length: int | None = None       # the span applied now (None before the first apply)
        self.changed_at: int | None = None   # the step of the last change (for the LR ramp)
        self.switches: list[dict[str, int]] = []
        if self.packed:
            model.extend_rope_tables(cfg.micro_batch_tokens)

    def row_tokens(self, length: int) -> int:
        """The loader's row length for span ``length``."""
        return self.cfg.micro_batch_tokens if self.packed else length

    def initial_length(self) -> int:
        return self.schedule[0][0] if self.schedule else self.cfg.seq_len

    def warmup_lengths(self) -> list[int]:
        """Lengths whose compiled graphs differ (rows: one per length; packed: one)."""
        if self.packed or not self.schedule:
            return [self.initial_length()]
        return list(dict.fromkeys(length for length, _ in self.schedule))

    def apply(self, length: int, model: GPT, loader: TrainLoader) -> None:
        """Make ``length`` the span: the loader's rows and the model's segment cap."""
        loader.set_seq_len(self.row_tokens(length))
        if self.packed:
            model.set_doc_span(length)
        self.length = length

    def step(self, step: int, elapsed_s: float, model: GPT, loader: TrainLoader) -> int | None:
        """Apply the span for optimizer step ``step``; returns the new length when it changed."""
        cfg = self.cfg
        length = (scheduled_seq_len(self.schedule, run_progress(step, cfg.max_steps, elapsed_s,
                                                                 cfg.max_train_seconds))
                  if self.schedule else cfg.seq_len)
        if length == self.length:
            return None
        first = self.length is None  # the start (or a resume) sets the span; that is no change
        self.apply(length, model, loader)
        if first:
            return None
        self.changed_at = step
        self.switches.append({"step": step, "seq_len": length})
        return length

    def lr_factor(self, step: int) -> float:
        return seq_change_ramp(step, self.changed_at, self.cfg.seq_change_warmup_steps)

    def describe(self, length: int) -> str:
        if self.packed:
            return (f"context {length} (packed rows of {self.cfg.micro_batch_tokens}: documents cut into "
                    f"segments of <= {length}; same graph)")
        return (f"context {length} (rows [{self.cfg.micro_batch_tokens // length}, {length}]; "
                "a new shape: its graph was compiled in the warm-up)")
