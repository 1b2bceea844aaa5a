"""AWQ-lite (docs/FRONTIER.md §4.5): the most activation-salient column groups kept at int8.

For every solved tensor W (rows × cols; pgolf/quant/routing.py) with the RMS
of each of its input channels over the calibration rows (``act_rms``, from
the hessians stage), column c's saliency is ``act_rms_c · mean_r |W_rc|``.
Each aligned group of ``group`` columns (starts 0, group, 2·group, … in the
original column order; a partial last group is not a candidate) scores the
sum of its columns' saliencies. The candidates of all tensors are pooled and
the ``top_k`` best groups model-wide are protected (ties: lower tensor name,
then lower start). Inside the same GPTQ pass (pgolf/quant/gptq.py) a protected
column is rounded with ``s_hi = k·std(W_r)/127`` and clamp ±127, its error fed
forward as usual; the artifact stores each tensor's group starts, its s_hi per
row and the group size (pgolf/quant/artifact.py, ``ProtectedColumns``).
"""
from __future__ import annotations

from typing import Mapping

import torch


def column_saliency(w: torch.Tensor, act_rms: torch.Tensor) -> torch.Tensor:
    """``act_rms_c · mean_r |W_rc|`` per column, float64 [cols]."""
    return act_rms.to(torch.float64) * w.to(torch.float64).abs().mean(dim=0)


def group_scores(w: torch.Tensor, act_rms: torch.Tensor, group: int) -> torch.Tensor:
    """Summed saliency of each full aligned group of ``group`` columns, float64 [cols // group]."""
    full = (w.shape[1] // group) * group
    return column_saliency(w, act_rms)[:full].reshape(-1, group).sum(dim=1)


def select_groups(candidates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], group: int,
                  top_k: int) -> dict[str, tuple[list[int], list[float]]]:
    """The ``top_k`` best groups over all ``candidates`` (name → (W, act_rms)).

    Returns name → (sorted group starts, their scores) for the tensors that got any.
    """
    pooled = []
    for name in sorted(candidates):
        scores = group_scores(*candidates[name], group)
        pooled.extend((-float(score), name, g * group) for g, score in enumerate(scores.tolist()))
    chosen: dict[str, tuple[list[int], list[float]]] = {}
    for neg, name, start in sorted(pooled)[:top_k]:
        starts, scores = chosen.setdefault(name, ([], []))
        starts.append(start)
        scores.append(-neg)
    return {name: (sorted(starts), [s for _, s in sorted(zip(starts, scores))])
            for name, (starts, scores) in chosen.items()}

