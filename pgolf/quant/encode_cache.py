"""``encode`` with memory: the quantize stage's encoder for the fit, the pruning probes and the final write.

Plain layout: each tensor's compressed frame is kept (keyed by the identity of
the immutable StoredTensor, which is held so the id cannot be reused), so a
fit round, a pruning probe or the final write compresses only the tensors it
has not seen. Grouped layout: the frame memory and the cheap size estimate of
:class:`pgolf.quant.grouped_cache.GroupedFrames` (imported only then: an
optional module of the bundle, pgolf/submission/optional.py). The latest few
whole blobs are kept either way (keyed by the tensors' ids).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pgolf.quant.artifact import StoredTensor, encode, stored_arrays_bytes, tensor_frames


class EncodeCache:
    """``encode`` with memory (module docstring); ``cfg`` a QuantizeConfig."""

    def __init__(self, model_config: dict, meta: dict, cfg, keep: int = 2):
        self.model_config, self.meta, self.cfg, self.keep = model_config, meta, cfg, keep
        self._frames: dict[int, tuple[StoredTensor, bytes]] = {}
        self._blobs: dict[tuple[int, ...], tuple[list, bytes]] = {}
        self.grouped = None
        if cfg.compression != "plain":
            from pgolf.quant.grouped_cache import GroupedFrames
            self.grouped = GroupedFrames(model_config, meta)

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
            comp, level = self.cfg.compressor, self.cfg.compression_level
            if self.grouped is None:
                blob = encode(tensors, self.model_config, self.meta, comp, level, frames=self.frames(tensors))
            else:
                blob = self.grouped.encode(tensors, comp, level)
            if len(self._blobs) >= self.keep:
                self._blobs.pop(next(iter(self._blobs)))
            self._blobs[key] = (list(tensors), blob)
        return self._blobs[key][1]

    def _compress(self, tensors: list[StoredTensor]) -> list[bytes]:
        comp, level = self.cfg.compressor, self.cfg.compression_level
        if self.grouped is None:
            return tensor_frames(tensors, comp, level)
        from pgolf.quant.compression import compress  # the grouped layout's (pgolf/submission/optional.py)
        with ThreadPoolExecutor(max_workers=max(1, min(len(tensors), os.cpu_count() or 1))) as pool:
            return list(pool.map(lambda t: compress(stored_arrays_bytes(t), comp, level), tensors))
