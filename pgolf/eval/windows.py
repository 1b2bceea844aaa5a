"""Which validation targets each evaluation window scores (docs/RECIPE.md §5.2, §5.3, §6.1).

Positions are *target* positions: position ``p`` predicts ``tokens[p + 1]``
from ``tokens[start .. p]``, so a stream of ``N`` tokens has ``T = N - 1``
targets. A window feeds ``tokens[start : start + length]`` and scores the
targets ``[score_from, start + length)``: always a suffix of the window, so
every scored target sees ``p - start`` earlier tokens of context.

Sliding plan (``seq_len`` L, ``stride`` S), the records' layout without their
tail bug: window 0 scores ``[0, L)``; window k (start ``k·S``, full length)
scores its last S targets; full windows stop at the last start with
``start + L <= T``, and if targets remain, one more full-length window
aligned to the end (start ``T - L``) scores only those (fewer than S), so it
keeps more than ``L - S`` tokens of context. The records instead let starts
run to ``T - 64``, and their 31 short tail windows re-scored the last 64
targets 32 times each. Here every target is scored exactly once, which
:func:`check_exact_cover` verifies for every plan built.

TTT cuts the targets into chunks of ``chunk_tokens``; a window belongs to the
chunk of the first target it scores, so the windows of one chunk are a
contiguous range of the plan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pgolf.errors import DataError


# Targets the challenge scores: FineWeb's validation set trimmed to whole 2048-token sequences.
CHALLENGE_VAL_TARGETS = 62_021_632


@dataclass(frozen=True, eq=False)
class WindowPlan:
    """Windows in scoring order; arrays are int64 of one length (the window count)."""

    starts: np.ndarray       # first input position
    lengths: np.ndarray      # input tokens fed (== targets spanned)
    score_from: np.ndarray   # first scored target; the window scores up to its end
    num_targets: int

    @property
    def num_windows(self) -> int:
        return int(self.starts.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.num_windows else 0

    @property
    def score_to(self) -> np.ndarray:
        return self.starts + self.lengths


def eval_target_count(num_tokens: int, seq_len: int, trim_to_seq_len: bool, source: str) -> int:
    """Targets scored from a stream of ``num_tokens`` tokens.

    With ``trim_to_seq_len`` the stream is cut, like the records, to
    ``((N-1)//seq_len)·seq_len + 1`` tokens so targets fill whole sequences
    (62,021,632 on FineWeb at 2048); otherwise all ``N - 1`` targets count.
    """
    if num_tokens < 2:
        raise DataError(f"{source}: {num_tokens} validation tokens; need at least 2 to score one target")
    targets = num_tokens - 1
    if not trim_to_seq_len:
        return targets
    trimmed = (targets // seq_len) * seq_len
    if trimmed == 0:
        raise DataError(f"{source}: {num_tokens} validation tokens is fewer than seq_len + 1 = "
                        f"{seq_len + 1}, so trim_to_seq_len leaves nothing to score")
    return trimmed


def _check_sizes(num_targets: int, seq_len: int, stride: int) -> None:
    if num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need 1 <= stride <= seq_len, got stride {stride}, seq_len {seq_len}")


def plan_sliding(num_targets: int, seq_len: int, stride: int) -> WindowPlan:
    """Sliding windows that score every target once with >= min(L - S, p) context."""
    _check_sizes(num_targets, seq_len, stride)
    if num_targets <= seq_len:
        return _plan([0], [num_targets], [0], num_targets)
    num_full = (num_targets - seq_len) // stride + 1
    starts = np.arange(num_full, dtype=np.int64) * stride
    lengths = np.full(num_full, seq_len, dtype=np.int64)
    score_from = starts + (seq_len - stride)
    score_from[0] = 0
    covered = int(starts[-1]) + seq_len
    if covered < num_targets:
        starts = np.append(starts, num_targets - seq_len)
        lengths = np.append(lengths, seq_len)
        score_from = np.append(score_from, covered)
    return _plan(starts, lengths, score_from, num_targets)


def plan_nonoverlapping(num_targets: int, seq_len: int) -> WindowPlan:
    """Consecutive windows scored in full (the cheap diagnostic, docs/RECIPE.md §5.1).

    The last window is shorter when ``seq_len`` does not divide the targets.
    """
    _check_sizes(num_targets, seq_len, seq_len)
    starts = np.arange(0, num_targets, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, num_targets - starts)
    return _plan(starts, lengths, starts.copy(), num_targets)


def _plan(starts, lengths, score_from, num_targets: int) -> WindowPlan:
    plan = WindowPlan(np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                      np.asarray(score_from, dtype=np.int64), int(num_targets))
    check_exact_cover(plan)
    return plan


def check_exact_cover(plan: WindowPlan) -> None:
    """Raise ValueError unless the scored ranges tile ``[0, num_targets)`` in order.

    Each window must score a non-empty suffix of itself, inside the stream,
    starting exactly where the previous window's scored range ended.
    """
    starts, score_from, score_to = plan.starts, plan.score_from, plan.score_to
    problems = []
    if plan.num_windows == 0:
        problems.append("no windows")
    else:
        if starts.min() < 0 or score_to.max() > plan.num_targets:
            problems.append("a window reaches outside the stream")
        if np.any(score_from < starts) or np.any(score_from >= score_to):
            problems.append("a window scores an empty range or targets outside itself")
        if score_from[0] != 0 or score_to[-1] != plan.num_targets:
            problems.append("scored ranges do not start at 0 and end at num_targets")
        if np.any(score_from[1:] != score_to[:-1]):
            problems.append("scored ranges overlap or leave gaps")
    if problems:
        raise ValueError(f"window plan over {plan.num_targets} targets is not an exact cover: "
                         + "; ".join(problems))


def num_chunks(num_targets: int, chunk_tokens: int) -> int:
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return -(-num_targets // chunk_tokens)


def chunk_window_bounds(plan: WindowPlan, chunk_tokens: int) -> np.ndarray:
    """``bounds`` [chunks + 1]: chunk c's windows are ``bounds[c]:bounds[c+1]``.

    A window's chunk is that of the first target it scores; a chunk can be
    empty when one window's scored range spans several chunks (window 0 with
    ``seq_len > chunk_tokens``).
    """
    chunks = num_chunks(plan.num_targets, chunk_tokens)
    first_targets = np.arange(chunks + 1, dtype=np.int64) * chunk_tokens
    bounds = np.searchsorted(plan.score_from, first_targets, side="left")
    bounds[-1] = plan.num_windows
    return bounds.astype(np.int64)


def chunk_targets(chunk: int, chunk_tokens: int, num_targets: int) -> tuple[int, int]:
    """Target range ``[begin, end)`` of one chunk."""
    begin = chunk * chunk_tokens
    return begin, min(begin + chunk_tokens, num_targets)


def chunk_sequences(chunk: int, chunk_tokens: int, num_targets: int, seq_len: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the training sequences that tile a chunk's targets.

    Sequence j feeds ``tokens[start : start + length]`` and learns the same
    span shifted by one, i.e. exactly targets ``[start, start + length)`` of
    this chunk; the last one is shorter when seq_len does not divide the chunk.
    """
    begin, end = chunk_targets(chunk, chunk_tokens, num_targets)
    starts = np.arange(begin, end, seq_len, dtype=np.int64)
    return starts, np.minimum(seq_len, end - starts)
