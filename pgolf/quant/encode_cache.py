"""``encode`` with memory: the quantize stage's encoder for the fit, the pruning probes and the final write.

Plain layout: each tensor's compressed frame is kept (keyed by the identity of
the immutable StoredTensor, which is held so the id cannot be reused), so a
fit round, a pruning probe or the final write compresses only the tensors it
has not seen.

Grouped layout (pgolf/quant/grouped.py, through its :class:`~pgolf.quant.grouped.Packing` hooks):
an encode is byte for byte ``artifact.encode``'s (row orders by content),
but its frames are kept by the SHA-256 of (compressor, level, raw stream), so
a fit round that demotes one matrix recompresses only that matrix's group and
the remainder (a frame is never reused for other bytes), and the frames an
encode does need are compressed on threads, one per frame.

:meth:`EncodeCache.estimate` is the grouped pruning search's cheap stand-in
for an encode's size (pgolf/quant/pruning.py calibrates it against exact
sizes and only uses it to place probes): the same packing with zstd at
``ESTIMATE_LEVEL`` and each sorted member's row order kept by tensor name
(computed once from the first integers seen under that name, so a pruned
matrix costs no new n-step chain).

The latest few whole blobs are kept either way (keyed by the tensors' ids).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from pgolf.quant.artifact import StoredTensor, encode, stored_arrays_bytes, tensor_frames
from pgolf.quant.compression import compress
from pgolf.quant.grouped import Packing, compress_frames, l1_row_order
from pgolf.quant.roles import ROLE_GROUPING

FRAMES_KEPT = 64  # grouped frames remembered (a probe has 9; the fit's bracket ends are reused)
ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL = "zstd", 3


class EncodeCache:
    """``encode`` with memory (module docstring); ``cfg`` a QuantizeConfig."""

    def __init__(self, model_config: dict, meta: dict, cfg, keep: int = 2):
        self.model_config, self.meta, self.cfg, self.keep = model_config, meta, cfg, keep
        self._frames: dict[int, tuple[StoredTensor, bytes]] = {}
        self._blobs: dict[tuple[int, ...], tuple[list, bytes]] = {}
        self._group_frames: OrderedDict[bytes, bytes] = OrderedDict()
        self._orders: dict[str, np.ndarray] = {}
        self.compressed = 0  # grouped frames compressed so far (the rest came from memory)
        self.packing = Packing(l1_row_order, self._compress_frames)
        self._estimate_packing = Packing(self._kept_row_order, lambda streams, _c, _l: compress_frames(
            streams, ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL))

    def frames(self, tensors: list) -> list[bytes]:
        """Each tensor's own frame: the file's frames (plain), or the fit's size estimates (grouped:
        the tensor's arrays alone, through the grouped layout's compressor)."""
        new = [t for t in dict.fromkeys(tensors, None) if id(t) not in self._frames]
        for t, frame in zip(new, self._compress(new)):
            self._frames[id(t)] = (t, frame)
        return [self._frames[id(t)][1] for t in tensors]

    def encode(self, tensors: list) -> bytes:
        key = tuple(id(t) for t in tensors)
        if key not in self._blobs:
            plain = self.cfg.compression == "plain"
            blob = encode(tensors, self.model_config, self.meta, self.cfg.compressor, self.cfg.compression_level,
                          frames=self.frames(tensors) if plain else None,
                          grouping=None if plain else ROLE_GROUPING, packing=self.packing)
            if len(self._blobs) >= self.keep:
                self._blobs.pop(next(iter(self._blobs)))
            self._blobs[key] = (list(tensors), blob)
        return self._blobs[key][1]

    def estimate(self, tensors: list) -> int:
        """A cheap stand-in for ``len(self.encode(tensors))`` (grouped layout; module docstring)."""
        return len(encode(tensors, self.model_config, self.meta, ESTIMATE_COMPRESSOR, ESTIMATE_LEVEL,
                          grouping=ROLE_GROUPING, packing=self._estimate_packing))

    def _kept_row_order(self, name: str, q: np.ndarray) -> np.ndarray:
        kept = self._orders.get(name)
        if kept is None or kept.shape != (q.shape[0],):
            kept = self._orders[name] = l1_row_order(name, q)
        return kept

    def _compress_frames(self, streams: Sequence[bytes], compressor: str, level: int) -> list[bytes]:
        keys = [hashlib.sha256(f"{compressor}:{level}:".encode() + s).digest() for s in streams]
        missing = [i for i, k in enumerate(keys) if k not in self._group_frames]
        for i, frame in zip(missing, compress_frames([streams[i] for i in missing], compressor, level)):
            self._group_frames[keys[i]] = frame
        self.compressed += len(missing)
        out = []
        for k in keys:
            self._group_frames.move_to_end(k)
            out.append(self._group_frames[k])
        while len(self._group_frames) > FRAMES_KEPT:
            self._group_frames.popitem(last=False)
        return out

    def _compress(self, tensors: list[StoredTensor]) -> list[bytes]:
        comp, level = self.cfg.compressor, self.cfg.compression_level
        if self.cfg.compression == "plain":
            return tensor_frames(tensors, comp, level)
        with ThreadPoolExecutor(max_workers=max(1, min(len(tensors), os.cpu_count() or 1))) as pool:
            return list(pool.map(lambda t: compress(stored_arrays_bytes(t), comp, level), tensors))
