"""LQER asymmetric: a low-rank correction of the worst-quantised matrices (docs/FRONTIER.md §4.4).

After every tensor is quantised (and after ``fit_to_limit`` / pruning, so the
correction is fitted to the weights the file really holds):

1. E = W − q·s for every quantised 2-D tensor (W the float weight), in float64.
2. The ``lqer_top_k`` tensors with the largest ‖E‖_F get a correction (ties
   by name).
3. SVD E = U S Vᵀ; r = min(``lqer_rank``, rows, cols); A = U_r S_r, B = V_rᵀ.
   The SVD's sign of each component is fixed so that B's entry of largest
   magnitude in that row is positive (the first on ties): A's INT2 grid is
   asymmetric, so the sign changes the stored values and must not depend on
   the SVD routine.
4. A and B go on the grids of pgolf/quant/lqer_factors.py (group ``lqer_group``).

The factors are stored with the tensor (``StoredTensor.lqer``); the reader
materialises W = q·s + Â·B̂. ``lqer_top_k: 0`` changes nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch

from pgolf.quant.artifact import StoredTensor, grid_value
from pgolf.quant.lqer_factors import LqerFactors, quantize_factors


def quantization_error(t: StoredTensor, weight: torch.Tensor) -> torch.Tensor:
    """E = W − Ŵ in float64, shaped like the matrix; Ŵ = q·s with AWQ-lite's protected columns at their own
    scale (docs/FRONTIER.md §4.5: LQER is fitted on the realised weight)."""
    return weight.detach().cpu().double().reshape(t.q.shape) - grid_value(t).double()


def lqer_candidates(tensors: Sequence[StoredTensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the quantised 2-D tensors, largest ‖E‖_F first (ties by name)."""
    norms = [(-float(quantization_error(t, state[t.name]).norm()), t.name)
             for t in tensors if t.quantized and len(t.shape) == 2 and t.name in state]
    return [name for _, name in sorted(norms)]


def low_rank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float64 with A·B the best rank-``rank`` approximation of ``error`` (signs as the module docstring)."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    r = min(rank, s.numel())
    a, b = u[:, :r] * s[:r], vh[:r]
    peak = b.abs().argmax(dim=1)
    sign = torch.sign(b.gather(1, peak.unsqueeze(1)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return a * sign.T, b * sign


def fit_factors(t: StoredTensor, weight: torch.Tensor, rank: int, group: int) -> LqerFactors:
    a, b = low_rank_factors(quantization_error(t, weight), rank)
    return quantize_factors(a, b, group)


def apply_lqer(tensors: Sequence[StoredTensor], state: Mapping[str, torch.Tensor], top_k: int, rank: int,
               group: int) -> tuple[list[StoredTensor], list[dict]]:
    """``tensors`` with factors on the ``top_k`` worst (others unchanged, the same objects), and one
    record per corrected tensor: name, rank, mode, group, ‖E‖_F before and after, factor bytes."""
    if top_k <= 0:
        return list(tensors), []
    chosen = set(lqer_candidates(tensors, state)[:top_k])
    out, records = [], []
    for t in tensors:
        if t.name not in chosen:
            out.append(t)
            continue
        factors = fit_factors(t, state[t.name], rank, group)
        error = quantization_error(t, state[t.name])
        after = error - factors.dense().double()
        out.append(dataclasses.replace(t, lqer=factors))
        records.append({"name": t.name, "rank": factors.rank, "mode": factors.mode, "group": factors.group,
                        "error_fro": float(error.norm()), "error_fro_lqer": float(after.norm()),
                        "factor_bytes": factors.stored_bytes()})
    return out, records


def strip_lqer(tensors: Sequence[StoredTensor]) -> list[StoredTensor]:
    """The tensors without factors (those without any come back as the same objects)."""
    return [dataclasses.replace(t, lqer=None) if t.lqer is not None else t for t in tensors]


def lqer_step(state: Mapping[str, torch.Tensor], top_k: int, rank: int, group: int,
              keep: int = 4) -> Callable[[Sequence[StoredTensor]], tuple[list[StoredTensor], list[dict]]]:
    """:func:`apply_lqer` remembered by the identity of its input tensors (the latest ``keep`` inputs,
    held so their ids stay valid): the byte-target probes and the final step then fit each set of
    tensors once and hand the encoder's cache the same objects."""
    memo: dict[tuple[int, ...], tuple[list[StoredTensor], tuple[list[StoredTensor], list[dict]]]] = {}

    def step(tensors: Sequence[StoredTensor]) -> tuple[list[StoredTensor], list[dict]]:
        key = tuple(id(t) for t in tensors)
        if key not in memo:
            if len(memo) >= keep:
                memo.pop(next(iter(memo)))
            memo[key] = (list(tensors), apply_lqer(tensors, state, top_k, rank, group))
        return memo[key][1]
    return step
