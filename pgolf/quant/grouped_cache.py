"""The grouped layout's encode memory and cheap size estimate (the quantize fit's, pgolf/quant/encode_cache.py).

An encode is byte for byte ``artifact.encode``'s with the grouped layout
(pgolf/quant/grouped.py, row orders by content), through its
:class:`~pgolf.quant.grouped.Packing` hooks: frames are kept by the SHA-256 of
(compressor, level, raw stream), so a fit round that demotes one matrix
recompresses only that matrix's group (both its layouts) and the remainder (a frame is never
reused for other bytes), and the frames an encode does need are compressed
on threads, one per frame.

:meth:`GroupedFrames.estimate` is the grouped pruning search's cheap
stand-in for an encode's size (pgolf/quant/pruning.py calibrates it against
exact sizes and only uses it to place probes): the same packing with zstd at
``ESTIMATE_LEVEL`` and each sorted member's row order kept by tensor name
(computed once from the first integers seen under that name, so a pruned
matrix costs no new n-step chain).
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from pgolf.quant.artifact import encode
from pgolf.quant.grouped import Packing, compress_frames, l1_row_order
from pgolf.quant.roles import role_grouping

FRAMES_KEPT = 128  # grouped frames remembered (a probe compresses 16: layout, remainder, 7 groups × 2 layouts)
ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL = "zstd", 3


class GroupedFrames:
    """Frame memory and size estimate of the grouped layout (module docstring)."""

    def __init__(self, model_config: dict, meta: dict):
        self.model_config, self.meta = model_config, meta
        self.grouping = role_grouping()
        self._frames: OrderedDict[bytes, bytes] = OrderedDict()
        self._orders: dict[str, np.ndarray] = {}
        self.compressed = 0  # frames compressed so far (the rest came from memory)
        self.packing = Packing(l1_row_order, self._compress_frames)
        self._estimate_packing = Packing(self._kept_row_order, lambda streams, _c, _l: compress_frames(
            streams, ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL))

    def encode(self, tensors: list, compressor: str, level: int) -> bytes:
        return encode(tensors, self.model_config, self.meta, compressor, level, grouping=self.grouping,
                      packing=self.packing)

    def estimate(self, tensors: list) -> int:
        return len(encode(tensors, self.model_config, self.meta, ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL,
                          grouping=self.grouping, packing=self._estimate_packing))

    def _kept_row_order(self, name: str, q: np.ndarray) -> np.ndarray:
        kept = self._orders.get(name)
        if kept is None or kept.shape != (q.shape[0],):
            kept = self._orders[name] = l1_row_order(name, q)
        return kept

    def _compress_frames(self, streams: Sequence[bytes], compressor: str, level: int) -> list[bytes]:
        keys = [hashlib.sha256(f"{compressor}:{level}:".encode() + s).digest() for s in streams]
        missing = [i for i, k in enumerate(keys) if k not in self._frames]
        for i, frame in zip(missing, compress_frames([streams[i] for i in missing], compressor, level)):
            self._frames[keys[i]] = frame
        self.compressed += len(missing)
        out = []
        for k in keys:
            self._frames.move_to_end(k)
            out.append(self._frames[k])
        while len(self._frames) > FRAMES_KEPT:
            self._frames.popitem(last=False)
        return out


def calibrated_guess(estimate_at: Callable[[int], int], target: int, fewest: Callable) -> Callable[[int, int, int, int], int]:
    """The pruning search's probe placement from a cheap estimate (pgolf/quant/pruning.py:
    ``prune_to_target``'s ``estimated_size``): ``estimate_at(count)`` calibrated by exact / estimate at
    the bracket's ends, linearly in the count between them, then searched by the same search
    (``fewest``, pruning's) to 1/1024 of the bracket."""
    estimates: dict[int, int] = {}

    def estimate(count: int) -> int:
        if count not in estimates:
            estimates[count] = estimate_at(count)
        return estimates[count]

    def guess(lo: int, lo_size: int, hi: int, hi_size: int) -> int:
        r_lo, r_hi = lo_size / estimate(lo), hi_size / estimate(hi)

        def calibrated(count: int) -> int:
            return math.ceil(estimate(count) * (r_lo + (r_hi - r_lo) * (count - lo) / (hi - lo)))
        return fewest(lo, lo_size, hi, hi_size, target, calibrated, resolution=max(1, (hi - lo) >> 10))[0]
    return guess
