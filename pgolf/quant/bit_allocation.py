"""Fit the artifact to the byte limit by demoting block matrices a bit at a time.

Used by the quantize stage when ``quantize.fit_to_limit`` is on and the encoded
artifact is over the target (the one pruning uses: 16,000,000 − code bytes −
``prune_margin_bytes``). One job: choose which GPTQ block matrices
(pgolf/model/layout.py) to store with fewer bits.

Algorithm:

1. Options (:func:`build_options`). Every block matrix is quantised again at each width from its class
   bits − 1 down to ``fit_min_bits`` with the very same machinery
   (``pgolf.quant.policy.quantize_block_matrices``: GPTQ, clip search, damping,
   batched by shape). Each option has an *error* and an *estimated size*.
   The error is the Hessian-weighted output error ``tr((W−Ŵ)H(W−Ŵ)ᵀ)/tokens``
   of the report row; when any candidate lacks it (no Hessians), every option
   uses the weight MSE × numel (the summed squared weight error) instead, so
   all errors share one unit.
2. Size. Each option's frame (its codes and scales compressed on their own
   with the artifact's compressor and level, exactly as the file stores it:
   :func:`compressed_alone_bytes`, on threads); the other tensors likewise.
   The file is the index frame plus these frames, so the sum is the file
   size up to the index; one real encode calibrates that (``ratio = real
   bytes / summed frames``, ~1.001). (The order-0 entropy,
   :func:`estimated_bytes`, is not enough: the compressors' overhead over it
   grows as codes get more peaked.)
3. Greedy order (:func:`order_demotions`). Starting from every matrix at its class bits, repeatedly
   take the one-step demotion (b → b−1 of one matrix) with the smallest error
   increase per estimated byte saved; ties go to the smaller name, and a step
   that saves no bytes comes only when nothing else is left. This lists every
   step once (:func:`demotion_order`); the greedy for any byte budget
   (:func:`greedy_demote`) is a prefix of it.
4. Search over the prefix length (:func:`search_prefix`) with real encodes, at most ``MAX_ROUNDS``:
   each guess is the shortest prefix whose size × (real / summed bytes of
   the latest probe) meets the target, kept strictly inside the bracket
   (longest prefix known to miss, shortest known to fit); when the guess
   repeats a probe, the bracket is halved. With per-tensor frames the first
   guess is right up to the index frame's few bytes, so this takes two
   encodes (the fit, and the one step shorter that misses); each encode
   compresses only frames not seen before. The answer is the shortest
   prefix that fitted in a real encode. If no probe fits, every matrix at
   ``fit_min_bits`` is tried; if that is over too, it is kept and ``fits`` is
   False (pruning, when on, and the size gate deal with what is left).

When the first encode already fits, the tensors and report come back unchanged
(the same objects), so the artifact is byte-identical to ``fit_to_limit: false``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from pgolf.model.layout import BLOCK_CLASSES
from pgolf.progress import Progress
from pgolf.quant.artifact import StoredTensor, tensor_frames
from pgolf.quant.policy import QuantizeConfig, QuantizeResult, quantize_block_matrices

MAX_ROUNDS = 6  # real encodes of the prefix search (plus one of everything demoted if none fitted)


@dataclass(frozen=True)
class Option:
    """One bit width of one block matrix."""

    bits: int
    est_bytes: float  # uncalibrated entropy estimate
    error: float


@dataclass(frozen=True)
class FitRound:
    demoted: int  # matrices below their class bits after this round
    estimated_bytes: int  # calibrated prediction of the whole artifact
    real_bytes: int


@dataclass(frozen=True)
class FitOutcome:
    tensors: list[StoredTensor]
    report: list[dict]
    bits: dict[str, int]  # final width of every block matrix
    demoted: int
    rounds: list[FitRound]  # one per real encode after the first
    target_bytes: int
    initial_bytes: int
    size_bytes: int  # real encoded size of ``tensors``
    fits: bool
    error_metric: str  # "hessian" or "weight_sse"
    error_increase: float  # Σ over demoted matrices of (error at final bits − error at class bits)


def code_entropy_bits(q: torch.Tensor) -> float:
    """Order-0 empirical entropy of the integers in ``q``, in bits: Σ_k −n_k·log2(n_k/N)."""
    values = q.reshape(-1).to(torch.int64)
    if values.numel() == 0:
        return 0.0
    counts = torch.unique(values, return_counts=True)[1].to(torch.float64)
    total = counts.sum()
    return float((counts * torch.log2(total / counts)).sum())


def estimated_bytes(t: StoredTensor) -> float:
    """Entropy bytes of the codes plus the scales' bytes; a passthrough tensor's raw bytes."""
    if not t.quantized:
        return float(t.raw.numel() * t.raw.element_size())
    return code_entropy_bits(t.q) / 8 + t.scale.numel() * t.scale.element_size()


def compressed_alone_bytes(tensors: Sequence[StoredTensor], compressor: str, level: int) -> list[int]:
    """The size of each tensor's own frame in the artifact (``pgolf.quant.artifact.tensor_frame``).

    The file is the index frame plus these frames, so a choice of widths has
    a known size up to the small index (the fit calibrates that with one
    real encode). An entropy estimate would not do: the compressors' overhead
    over the order-0 entropy grows as the codes get more peaked (zstd-22:
    +0.6 % at 4.7 bits/value, +4 % at 2.3; LZMA-9: +3.5 % and +12 %).
    """
    return [len(frame) for frame in tensor_frames(tensors, compressor, level)]


def _step_key(name: str, table: Sequence[Option], level: int) -> tuple[float, str]:
    """Error increase per byte saved by taking ``name`` one level down (inf if nothing is saved)."""
    now, nxt = table[level], table[level + 1]
    saved = now.est_bytes - nxt.est_bytes
    return (nxt.error - now.error) / saved if saved > 0 else math.inf, name


def greedy_demote(tables: Mapping[str, Sequence[Option]], start: Mapping[str, int],
                  budget: float) -> dict[str, int]:
    """Levels after demoting greedily until Σ est_bytes ≤ ``budget`` or nothing is left.

    ``tables[name]`` lists a matrix's options from its class bits (level 0)
    downwards; ``start`` gives each matrix's current level. Each step takes the
    smallest (Δerror / Δest_bytes, name) over the one-level demotions.
    """
    levels = dict(start)
    total = sum(tables[n][levels[n]].est_bytes for n in tables)
    for name in demotion_order(tables, start):
        if total <= budget:
            break
        total += tables[name][levels[name] + 1].est_bytes - tables[name][levels[name]].est_bytes
        levels[name] += 1
    return levels


def demotion_order(tables: Mapping[str, Sequence[Option]], start: Mapping[str, int]) -> list[str]:
    """Every one-level demotion from ``start`` down to the last level, in greedy order.

    ``greedy_demote`` for any budget takes a prefix of this list.
    """
    levels = dict(start)
    order: list[str] = []
    while True:
        steps = [_step_key(n, tables[n], levels[n]) for n in sorted(tables) if levels[n] + 1 < len(tables[n])]
        if not steps:
            return order
        _, name = min(steps)
        levels[name] += 1
        order.append(name)


def _error_of(row: dict, numel: int, metric: str) -> float:
    return float(row["hessian_error"]) if metric == "hessian" else float(row["weight_mse"]) * numel


@dataclass(frozen=True)
class FitOptions:
    """Every width of every demotable matrix (level 0: its class bits) and the sizing tables."""

    choices: dict[str, list[tuple[StoredTensor, dict]]]  # name → (stored tensor, report row) per level
    tables: dict[str, list[Option]]  # name → Option per level, names sorted
    fixed_bytes: float  # summed frames of the tensors that are never demoted

    def tensors_at(self, levels: Mapping[str, int], tensors: Sequence[StoredTensor]) -> list[StoredTensor]:
        """``tensors`` with each demotable matrix at its level."""
        return [self.choices[t.name][levels[t.name]][0] if t.name in levels else t for t in tensors]


def build_options(result: QuantizeResult, class_bits: Mapping[str, int], state: Mapping[str, torch.Tensor],
                  hessians: Mapping[str, torch.Tensor], num_tokens: int, cfg: QuantizeConfig,
                  device: torch.device, metric: str, frame_sizes: Callable[[list[StoredTensor]], list[int]],
                  hessian_source: str = "hessians", progress: Progress | None = None) -> FitOptions:
    """Step 1 and 2 of the module docstring: quantise every lower width, size and score each option."""
    index = {t.name: i for i, t in enumerate(result.tensors)}
    rows = {r["name"]: r for r in result.report}
    # Every lower width of every demotable matrix, one batched pass per width.
    choices: dict[str, list[tuple[StoredTensor, dict]]] = {
        n: [(result.tensors[index[n]], rows[n])] for n in class_bits}
    widths = range(max(class_bits.values(), default=cfg.fit_min_bits) - 1, cfg.fit_min_bits - 1, -1)
    if progress is not None:
        progress.start("fit: lower widths", sum(max(b - cfg.fit_min_bits, 0) for b in class_bits.values()),
                       "matrices")
    for bits in widths:
        wanted = {n: bits for n, b in class_bits.items() if b > bits}
        # A demoted matrix keeps AWQ-lite's protected groups (chosen once, at full width).
        protect = {n: rows[n]["awq"]["starts"] for n in wanted if rows[n].get("awq")}
        lower = quantize_block_matrices(state, wanted, hessians, num_tokens, cfg, device, hessian_source, progress,
                                        protect=protect)
        for n in sorted(lower):
            choices[n].append(lower[n])
    names = sorted(choices)
    flat = [s for n in names for s, _ in choices[n]]
    alone = iter(frame_sizes(flat))
    tables = {n: [Option(s.bits, float(next(alone)), _error_of(r, s.q.numel(), metric)) for s, r in choices[n]]
              for n in names}
    fixed = [t for t in result.tensors if t.name not in class_bits]
    return FitOptions(choices, tables, float(sum(frame_sizes(fixed))))


@dataclass(frozen=True)
class DemotionPlan:
    """Every one-bit step in greedy order; the greedy for any budget takes a prefix of it."""

    names: tuple[str, ...]  # the demotable matrices
    order: list[str]  # the matrix demoted by each step
    est_at: list[float]  # est_at[k]: the whole artifact's (uncalibrated) estimate after the first k steps

    def levels_at(self, k: int) -> dict[str, int]:
        levels = {n: 0 for n in self.names}
        for name in self.order[:k]:
            levels[name] += 1
        return levels

    def demoted_at(self, k: int) -> int:
        return len(set(self.order[:k]))


def order_demotions(options: FitOptions) -> DemotionPlan:
    """Step 3 of the module docstring, with the estimate after every prefix."""
    tables = options.tables
    order = demotion_order(tables, {n: 0 for n in tables})
    est_at = [options.fixed_bytes + sum(table[0].est_bytes for table in tables.values())]
    taken = {n: 0 for n in tables}
    for name in order:
        table = tables[name]
        est_at.append(est_at[-1] + table[taken[name] + 1].est_bytes - table[taken[name]].est_bytes)
        taken[name] += 1
    return DemotionPlan(tuple(tables), order, est_at)


@dataclass(frozen=True)
class PrefixSearch:
    steps: int  # the chosen prefix length: the shortest that fitted, else every step
    sizes: dict[int, int]  # real encoded size of each probed prefix length
    rounds: list[FitRound]  # one per real encode after the first


def search_prefix(plan: DemotionPlan, initial_bytes: int, target_bytes: int,
                  encode_prefix: Callable[[int], int], say: Callable[[str], None]) -> PrefixSearch:
    """Step 4 of the module docstring. ``encode_prefix(k)``: real bytes with the first k steps taken."""
    est_at = plan.est_at

    def guess(ratio: float, lo: int, hi: int) -> int:
        """Fewest steps in (lo, hi) whose estimate × ratio meets the target, else hi − 1."""
        return next((k for k in range(lo + 1, hi) if est_at[k] * ratio <= target_bytes), hi - 1)

    # Bracket search over the prefix length k with real encodes: lo never fits, hi fits (or is
    # the end + 1 while no probe fitted). Each guess uses the ratio of the latest probe and
    # stays inside the bracket.
    lo, hi, n = 0, len(plan.order) + 1, len(plan.order)
    sizes: dict[int, int] = {0: initial_bytes}
    ratio, rounds = initial_bytes / est_at[0], []
    k = guess(ratio, lo, hi)
    while k not in sizes and len(rounds) < MAX_ROUNDS:
        predicted = round(est_at[k] * ratio)
        sizes[k] = size = encode_prefix(k)
        demoted = plan.demoted_at(k)
        rounds.append(FitRound(demoted, predicted, size))
        say(f"fit round {len(rounds)}: {k} of {n} steps, {demoted} matrices demoted, estimated "
            f"{predicted:,} bytes, real {size:,} ({size - target_bytes:+,} vs target {target_bytes:,})")
        if size <= target_bytes:
            hi = k
        else:
            lo = k
        if hi - lo <= 1:
            break
        ratio = size / est_at[k]
        k = guess(ratio, lo, hi)
        if k in sizes:  # the estimate points at a probed length: halve the bracket instead
            mid = (lo + min(hi, n)) // 2
            k = mid if mid not in sizes else min(hi, n)
    if hi > n and n not in sizes and len(rounds) < MAX_ROUNDS + 1:
        sizes[n] = size = encode_prefix(n)  # last resort: everything at fit_min_bits
        rounds.append(FitRound(plan.demoted_at(n), round(est_at[n] * ratio), size))
        if size <= target_bytes:
            hi = n
    if hi > n:
        say("fit: even every block matrix at fit_min_bits does not meet the target")
    return PrefixSearch(hi if hi <= n else n, sizes, rounds)


def fit_to_limit(result: QuantizeResult, state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                 num_tokens: int, cfg: QuantizeConfig, device: torch.device, target_bytes: int,
                 encoded_size: Callable[[list[StoredTensor]], int], hessian_source: str = "hessians",
                 log: Callable[[str], None] | None = None, progress: Progress | None = None,
                 frame_sizes: Callable[[list[StoredTensor]], list[int]] | None = None) -> FitOutcome:
    """Demote block matrices of ``result`` until ``encoded_size`` ≤ ``target_bytes`` (module docstring).

    ``state`` is the unbanked state dict ``result`` was made from; ``log``
    receives one line per round. ``frame_sizes`` gives each tensor's frame size
    (default :func:`compressed_alone_bytes`); the quantize stage passes its
    ``EncodeCache``'s, so the frames the probes encode are compressed once.
    """
    say = log or (lambda _line: None)
    if frame_sizes is None:
        def frame_sizes(ts: list[StoredTensor]) -> list[int]:
            return compressed_alone_bytes(ts, cfg.compressor, cfg.compression_level)
    initial = encoded_size(result.tensors)
    rows = {r["name"]: r for r in result.report}
    bits_now = {t.name: t.bits for t in result.tensors}
    class_bits = {n: bits_now[n] for n, r in rows.items() if r["class"] in BLOCK_CLASSES}
    metric = "hessian" if all(rows[n]["hessian_error"] is not None for n in class_bits) else "weight_sse"
    if initial <= target_bytes:
        say(f"fit: {initial:,} bytes already within the target {target_bytes:,}; nothing demoted")
        return FitOutcome(result.tensors, result.report, dict(class_bits), 0, [], target_bytes, initial,
                          initial, True, metric, 0.0)

    options = build_options(result, class_bits, state, hessians, num_tokens, cfg, device, metric, frame_sizes,
                            hessian_source, progress)
    plan = order_demotions(options)
    search = search_prefix(plan, initial, target_bytes,
                           lambda k: encoded_size(options.tensors_at(plan.levels_at(k), result.tensors)), say)
    levels = plan.levels_at(search.steps)
    tensors = options.tensors_at(levels, result.tensors)
    size = search.sizes.get(search.steps)
    if size is None:
        size = encoded_size(tensors)
    report = [options.choices[r["name"]][levels[r["name"]]][1] if r["name"] in levels else r for r in result.report]
    tables = options.tables
    increase = sum(tables[n][levels[n]].error - tables[n][0].error for n in tables)
    return FitOutcome(tensors, report, {n: tables[n][levels[n]].bits for n in tables},
                      plan.demoted_at(search.steps), search.rounds, target_bytes, initial, size,
                      size <= target_bytes, metric, increase)


def bits_by_class(outcome: FitOutcome) -> dict[str, dict[str, int]]:
    """How many block matrices of each class ended at each width: {"attn": {"5": 4, "6": 40}, ...}."""
    cls = {r["name"]: r["class"] for r in outcome.report}
    out: dict[str, dict[str, int]] = {}
    for name in sorted(outcome.bits):
        hist = out.setdefault(cls[name], {})
        hist[str(outcome.bits[name])] = hist.get(str(outcome.bits[name]), 0) + 1
    return out


def outcome_metrics(outcome: FitOutcome) -> dict:
    """The ``fit_*`` entries of the quantize stage's metrics.json."""
    return {"fit_demoted": outcome.demoted, "fit_rounds": len(outcome.rounds), "fit_fits": outcome.fits,
            "fit_bits_by_class": bits_by_class(outcome), "fit_target_bytes": outcome.target_bytes,
            "fit_initial_bytes": outcome.initial_bytes, "fit_bytes": outcome.size_bytes,
            # the calibrated prediction for the final tensors (the first encode when nothing was demoted)
            "fit_estimated_bytes": outcome.rounds[-1].estimated_bytes if outcome.rounds else outcome.initial_bytes,
            "fit_error_metric": outcome.error_metric, "fit_error_increase": outcome.error_increase}
