"""Token-only n-gram tilt of the scored distribution (P2135; docs/FRONTIER.md §5.7).

**Hints.** One left-to-right pass over the validation stream, across
documents. Target position ``p`` predicts ``tokens[p + 1]`` (the convention of
pgolf/eval/windows.py); its context is the ``order - 1`` tokens
``tokens[p - order + 2 .. p]``, so the first ``order - 2`` targets have none.
For every context the state holds, over the earlier targets with that
context, their total count, the most frequent next token ("top") and its
count. Before target ``p`` is counted, a context seen before gives the hint
``top`` with confidence ``top_count / total``; the gate fires at
``confidence >= threshold``. So hint ``p`` depends on ``tokens[0 .. p]`` only,
never on its own target or a later one.

Ties and replacement: counts are exact (one count per context and next
token), and a next token becomes the top only when its count *strictly*
exceeds the top's, so the top is the token that first reached the maximal
count. With ``threshold > 0.5`` a gated top is a strict majority, so the
tie rule never changes a gated hint.

How it is computed: the state before ``p`` is a function of the earlier
(context, next token) pairs only, so instead of a sequential hash table
(a Python loop, an order of magnitude slower: bench/ngram_tilt.py times
both, docs/LOG.md) every state is computed at once by sorting. Contexts are identified
by a 64-bit hash (one odd multiplier per context slot, then a splitmix64
finaliser; distinct contexts collide with probability about n²/2⁶⁴). One
value sort of ``(hash high bits, position)`` groups the targets by context
in stream order; the rare groups whose full hashes differ are re-split.
Inside a group, a stable sort by next token gives each target the count of
its next token so far (itself included), a running maximum of those counts
the top count after each target, and a forward fill of the positions where
it grew the top token. A target's hint is its group predecessor's state.

**Tilt** (scoring only; TTT trains on the untilted loss). With model
distribution p and a gated hint h, the scored distribution is
``p'(a) = p(a)·e^{β[a=h]} / Z`` with ``Z = 1 + q_h(e^β − 1)``, q_h = p(h):
a full distribution over the vocabulary summing to 1. Its NLL is
``NLL' = NLL − β[y=h] + log(1 + q_h(e^β − 1))``; ungated targets keep NLL.

Users: the sliding eval and the chunked TTT take :class:`NgramTilt` (params
``ngram_tilt``, ``ngram_order``, ``ngram_threshold``, ``ngram_beta`` of
``eval_sliding`` and of ``eval_ttt``). A scorer that has logits (the
per-document TTT) takes ``make_score_adjust(hint, has_hint, beta)``: a
callable ``(logits [..., V], targets [...], positions [...]) -> NLL' [...]``
where ``positions`` are stream target positions; positions outside the
stream are never tilted. Hints follow stream order whatever order a scorer
visits the targets in (docs/FRONTIER.md §5.7 on what that means for TTT).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from pgolf.precision import maybe_compile

# score_adjust(logits [..., V], targets [...], target positions [...]) -> tilted NLL [...]
ScoreAdjust = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_MASK64 = (1 << 64) - 1


def _splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def context_hashes(tokens: np.ndarray, order: int) -> np.ndarray:
    """uint64 hash of each target's context: entry i is target ``i + order - 2``'s."""
    k = order - 1
    n = tokens.shape[0] - k       # targets order-2 .. T-1, T = len(tokens) - 1
    x = tokens.astype(np.uint64)
    h = np.zeros(max(n, 0), dtype=np.uint64)
    tmp = np.empty_like(h)
    for i in range(k):            # slot i = the token i places before the target's input token
        np.multiply(x[k - 1 - i:k - 1 - i + n], np.uint64(_splitmix64(i) | 1), out=tmp)
        h += tmp
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h ^= h >> np.uint64(shift)
        h *= np.uint64(mult)
    h ^= h >> np.uint64(31)
    return h


def stable_order(keys: np.ndarray, key_bits: int) -> np.ndarray:
    """The stable ascending order of non-negative int64 ``keys`` < 2**key_bits.

    Packs (key, index) into one uint64 and value-sorts it when it fits (a
    value sort is several times faster than an argsort); else a stable argsort.
    """
    n = keys.shape[0]
    index_bits = max(1, int(n).bit_length())
    if key_bits + index_bits > 64:
        return np.argsort(keys, kind="stable")
    packed = (keys.astype(np.uint64) << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)


def _group_by_context(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, group): indices of ``h`` ordered by (hash, index), ``group`` numbering the equal-hash
    runs 0, 1, ... . Hashes alone in their high bits are left out: a context seen once gives no hint."""
    n = h.shape[0]
    index_bits = max(1, int(n).bit_length())
    high = (h >> np.uint64(index_bits)).astype(np.int64)
    order = stable_order(high, 64 - index_bits)
    high = high[order]
    same_prev = np.zeros(n, dtype=bool)
    same_prev[1:] = high[1:] == high[:-1]
    keep = same_prev.copy()
    keep[:-1] |= same_prev[1:]
    index = order[keep]
    full = h[index]
    run = np.cumsum(~same_prev[keep]) - 1
    # Runs of equal high bits but different full hashes (rare): re-split, stream order inside.
    split = np.zeros(index.shape[0], dtype=bool)
    split[1:] = (run[1:] == run[:-1]) & (full[1:] != full[:-1])
    if split.any():
        mixed = np.isin(run, run[split])
        sub = np.lexsort((index[mixed], full[mixed], run[mixed]))
        index[mixed], full[mixed] = index[mixed][sub], full[mixed][sub]
    start = np.ones(index.shape[0], dtype=bool)
    start[1:] = (run[1:] != run[:-1]) | (full[1:] != full[:-1])
    return index, np.cumsum(start) - 1


def stream_hints(tokens: np.ndarray | torch.Tensor, order: int, threshold: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(hint int64 [T], has_hint bool [T]) for the ``T = len(tokens) - 1`` targets of ``tokens``.

    ``hint[p]`` is the gated top token of target p's context (0 where the gate
    does not fire); see the module docstring for the state and the gate.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.shape[0] < 1 or (tokens.size and tokens.min() < 0):
        raise ValueError(f"tokens must be a non-empty 1-D stream of ids >= 0, got shape {tokens.shape}")
    targets = tokens.shape[0] - 1
    hint = np.zeros(targets, dtype=np.int64)
    has_hint = np.zeros(targets, dtype=bool)
    first = order - 2                      # first target with a full context
    if targets - first < 2:
        return hint, has_hint
    index, group = _group_by_context(context_hashes(tokens, order))
    m = index.shape[0]
    if m == 0:
        return hint, has_hint
    nxt = tokens[index + first + 1]        # each target's next token
    j = np.arange(m, dtype=np.int64)
    is_start = np.ones(m, dtype=bool)
    is_start[1:] = group[1:] != group[:-1]
    rank = j - np.maximum.accumulate(np.where(is_start, j, 0))        # earlier targets of the context
    vocab_bits = int(nxt.max()).bit_length()
    pair = stable_order((group << vocab_bits) | nxt, int(group[-1]).bit_length() + vocab_bits)
    pair_start = np.ones(m, dtype=bool)
    pair_start[1:] = (group[pair][1:] != group[pair][:-1]) | (nxt[pair][1:] != nxt[pair][:-1])
    count = np.empty(m, dtype=np.int64)   # this target's next token's count, itself included
    count[pair] = j - np.maximum.accumulate(np.where(pair_start, j, 0)) + 1
    offset = group * (m + 1)               # keeps the running maximum inside each group
    top_count = np.maximum.accumulate(count + offset) - offset
    grew = np.ones(m, dtype=bool)
    grew[1:] = is_start[1:] | (count[1:] > top_count[:-1])
    top_token = nxt[np.maximum.accumulate(np.where(grew, j, 0))]
    later = ~is_start                      # a predecessor in the group: a seen context
    total = rank[later]
    prev_count, prev_top = top_count[:-1][later[1:]], top_token[:-1][later[1:]]
    gated = prev_count / total >= threshold
    where = index[later][gated] + first
    hint[where] = prev_top[gated]
    has_hint[where] = True
    return hint, has_hint


def apply_tilt(nll: torch.Tensor, logq_hint: torch.Tensor, hit: torch.Tensor, gate: torch.Tensor,
               beta: float) -> torch.Tensor:
    """NLL' = NLL − β·[y=h] + log(1 + q_h(e^β − 1)) where ``gate``, else NLL."""
    shift = torch.log1p(torch.exp(logq_hint) * math.expm1(beta)) - beta * hit.to(nll.dtype)
    return torch.where(gate, nll + shift, nll)


def tilted_log_probs(logits: torch.Tensor, hint: torch.Tensor, has_hint: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """The whole tilted log-distribution [..., V] (the reference form of :func:`tilted_nll`)."""
    logp = torch.log_softmax(logits, dim=-1)
    logq = logp.gather(-1, hint[..., None]).squeeze(-1)
    norm = torch.log1p(torch.exp(logq) * math.expm1(beta))
    bonus = torch.zeros_like(logp).scatter_(-1, hint[..., None], beta)
    tilted = logp + bonus - norm[..., None]
    return torch.where(has_hint[..., None], tilted, logp)


def tilted_nll(logits: torch.Tensor, targets: torch.Tensor, hint: torch.Tensor, has_hint: torch.Tensor,
               beta: float) -> torch.Tensor:
    """NLL [...] of ``targets`` under the tilted distribution of ``logits`` [..., V]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, targets[..., None]).squeeze(-1)
    logq = logits.gather(-1, hint[..., None]).squeeze(-1) - lse
    return apply_tilt(nll, logq, targets == hint, has_hint, beta)


class NgramTilt:
    """A stream's hints on its device and β: what a scorer needs to tilt."""

    def __init__(self, hint: np.ndarray | torch.Tensor, has_hint: np.ndarray | torch.Tensor, beta: float,
                 device: torch.device, seconds: float = 0.0):
        self.hint = torch.as_tensor(hint, dtype=torch.int64).to(device)
        self.gate = torch.as_tensor(has_hint, dtype=torch.bool).to(device)
        self.beta = float(beta)
        self.seconds = seconds            # the hint pass (counted in the eval time)
        self.gated = int(self.gate.sum())
        self._compiled: dict[tuple[int, bool], Callable[..., torch.Tensor]] = {}

    @classmethod
    def build(cls, tokens: torch.Tensor, cfg: "NgramTiltConfig") -> "NgramTilt | None":
        """The tilt of ``tokens`` (its device) when ``cfg.ngram_tilt``, else None (``cfg``: pgolf/eval/ngram_params.py,
        which imports this module lazily, so not imported here)."""
        if not cfg.ngram_tilt:
            return None
        began = time.perf_counter()
        hint, has_hint = stream_hints(tokens, cfg.ngram_order, cfg.ngram_threshold)
        return cls(hint, has_hint, cfg.ngram_beta, tokens.device, time.perf_counter() - began)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hint, gate) at target ``positions``; positions outside the stream are not gated."""
        inside = (positions >= 0) & (positions < self.hint.numel())
        index = positions.clamp(0, self.hint.numel() - 1)
        return self.hint[index], self.gate[index] & inside

    def score_adjust(self) -> ScoreAdjust:
        def adjust(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            hint, gate = self.at(positions)
            return tilted_nll(logits, targets, hint, gate, self.beta)
        return adjust

    def forward(self, model: torch.nn.Module, use_compile: bool) -> Callable[..., torch.Tensor]:
        """``(ids, targets, positions) -> NLL'`` through ``model.forward_logits``.

        Compiled when asked, once per model: every scorer of this tilt shares the graph.
        """
        key = (id(model), use_compile)
        if key not in self._compiled:
            beta = self.beta

            def nll(ids, targets, hint, gate):
                return tilted_nll(model.forward_logits(ids), targets, hint, gate, beta)

            self._compiled[key] = maybe_compile(nll, use_compile)
        compiled = self._compiled[key]

        def forward(ids: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            hint, gate = self.at(positions)
            return compiled(ids, targets, hint, gate)
        return forward


def make_score_adjust(hint: np.ndarray | torch.Tensor, has_hint: np.ndarray | torch.Tensor, beta: float,
                      device: torch.device | str = "cpu") -> ScoreAdjust:
    """A ``score_adjust(logits, targets, positions) -> NLL'`` for scorers that hold logits."""
    return NgramTilt(hint, has_hint, beta, torch.device(device)).score_adjust()
