"""Selective ±1 pruning of the block matrices down to a byte target (docs/RECIPE.md §4.6).

pgolf/quant/pipeline.py runs it after the quantisation (and the optional fit)
when ``quantize.prune`` is on; :func:`prune_to_target` describes the search.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from pgolf.model.layout import block_weight
from pgolf.quant.artifact import StoredTensor


@dataclass(frozen=True)
class PruneOutcome:
    tensors: list[StoredTensor]
    candidates: int  # block-matrix entries with |q| = 1
    pruned: int  # how many of them were zeroed
    target_bytes: int
    size_bytes: int  # encoded size of ``tensors``
    fits: bool
    probes: int  # encodings tried


def _zero_cheapest(tensors: list[StoredTensor], owner: torch.Tensor, flat: torch.Tensor,
                   count: int) -> list[StoredTensor]:
    """Copy of ``tensors`` with the first ``count`` (owner, flat index) entries set to 0."""
    out = list(tensors)
    chosen_owner, chosen_flat = owner[:count], flat[:count]
    for i in torch.unique(chosen_owner).tolist():
        t = out[i]
        q = t.q.clone()
        q.view(-1)[chosen_flat[chosen_owner == i]] = 0
        out[i] = dataclasses.replace(t, q=q)
    return out


def prune_order(tensors: list[StoredTensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block-matrix entry with |q| = 1 as (tensor index, flat index), cheapest first.

    The cost of zeroing an entry of row r is ``s_r²`` (AWQ-lite's protected
    columns: their own row scale squared); ties keep tensor order, then
    position, so the order is deterministic.
    """
    none = torch.zeros(0, dtype=torch.int64)
    owners, flats, costs = [none], [none], [torch.zeros(0)]
    for i, t in enumerate(tensors):
        if t.quantized and block_weight(t.name) is not None:
            flat = torch.nonzero(t.q.reshape(-1).abs() == 1).squeeze(1)
            owners.append(torch.full_like(flat, i))
            flats.append(flat)
            rows, cols = flat // t.q.shape[1], flat % t.q.shape[1]
            scale = t.scale.float()[rows]
            if t.protect is not None:
                scale = torch.where(t.protect.mask(t.q.shape[1])[cols], t.protect.scale.float()[rows], scale)
            costs.append(scale.pow(2))
    order = torch.argsort(torch.cat(costs), stable=True)
    return torch.cat(owners)[order], torch.cat(flats)[order]


def prune_to_target(tensors: list[StoredTensor], target_bytes: int,
                    encoded_size: Callable[[list[StoredTensor]], int]) -> PruneOutcome:
    """Selective ±1 pruning (docs/RECIPE.md §4.6) down to ``target_bytes`` (decimal bytes).

    Zeroing a ±1 integer of row r adds ``s_r²`` to the squared weight error,
    so block-matrix entries with |q| = 1 are zeroed cheapest first (ties by
    tensor order, then position); a search over the count finds the fewest
    that bring ``encoded_size`` to the target (exactly, when the size falls
    monotonically with the count). Each probe is a full encode (~30 s for the
    record model), so the search interpolates: the size falls about linearly
    with the count, so the next probe is where the line through the bracket's
    ends crosses the target; a probe that does not halve the bracket is
    followed by a bisection, so it never needs much more than twice a binary
    search's probes and usually needs a handful. When even zeroing all of them
    is not enough, nothing is pruned and ``fits`` is False.
    """
    owner, flat = prune_order(tensors)
    total = int(owner.numel())
    probes = 1
    size = encoded_size(tensors)
    if size <= target_bytes:
        return PruneOutcome(tensors, total, 0, target_bytes, size, True, probes)
    probes += 1
    enough_size = encoded_size(_zero_cheapest(tensors, owner, flat, total))
    if enough_size > target_bytes:
        return PruneOutcome(tensors, total, 0, target_bytes, size, False, probes)
    too_few, few_size, enough = 0, size, total  # invariant: size(too_few) > target >= size(enough)
    interpolate = True
    while enough - too_few > 1:
        width = enough - too_few
        if interpolate and few_size > enough_size:
            crossing = (few_size - target_bytes) / (few_size - enough_size)
            mid = min(max(too_few + math.ceil(crossing * width), too_few + 1), enough - 1)
        else:
            mid = (too_few + enough) // 2
        probes += 1
        mid_size = encoded_size(_zero_cheapest(tensors, owner, flat, mid))
        if mid_size <= target_bytes:
            enough, enough_size = mid, mid_size
        else:
            too_few, few_size = mid, mid_size
        interpolate = enough - too_few <= width // 2
    return PruneOutcome(_zero_cheapest(tensors, owner, flat, enough), total, enough, target_bytes,
                        enough_size, True, probes)
