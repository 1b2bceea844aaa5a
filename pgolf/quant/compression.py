"""Compressors by name and the greedy L1 row order of the grouped layout.

Compressors (``quantize.compressor``), each deterministic and single-threaded:

- ``zstd``: level ``zstd_level``; in the grouped layout with a 128 MiB long
  window (window_log 27, long-distance matching);
- ``lzma``: xz container, preset ``lzma_preset``; grouped adds ``PRESET_EXTREME``;
- ``brotli``: quality 11, window 24 (optional: the ``brotli`` package);
- ``zpaq``: the ``zpaq`` package's in-memory libzpaq, level 5, one thread
  (optional; a context-mixing compressor like the records' lrzip -z).

Greedy L1 nearest-neighbour row order (docs/FRONTIER.md §4.6): start at
row 0, then repeatedly take the unused row with the smallest L1 distance to
the last one taken (the lowest index on ties). The role groups it applies to
are pgolf/quant/roles.py's.
"""
from __future__ import annotations

import hashlib
import importlib
import lzma
from collections import OrderedDict

import numpy as np
import torch
import zstandard

from pgolf.config import check

ALL_COMPRESSORS = ("zstd", "lzma", "brotli", "zpaq")
OPTIONAL_MODULES = {"brotli": "brotli", "zpaq": "zpaq"}
ZSTD_WINDOW_LOG = 27
BROTLI_QUALITY, BROTLI_WINDOW = 11, 24
ZPAQ_LEVEL = 5


def available(name: str) -> bool:
    """Whether ``name`` can run in this Python install."""
    if name not in OPTIONAL_MODULES:
        return name in ALL_COMPRESSORS
    try:
        importlib.import_module(OPTIONAL_MODULES[name])
    except ImportError:
        return False
    return True


def check_compression(compression: str, compressor: str) -> None:
    """ParamErrors for ``quantize.compression`` / ``quantize.compressor``."""
    check(compression in ("plain", "grouped"), "compression", "must be plain or grouped")
    check(compressor in ALL_COMPRESSORS, "compressor", f"must be one of {', '.join(ALL_COMPRESSORS)}")
    check(compression == "grouped" or compressor in ("zstd", "lzma"), "compressor",
          f"{compressor} needs compression: grouped")
    check(available(compressor), "compressor",
          f"{compressor} needs the Python package {OPTIONAL_MODULES.get(compressor)!r}, which is not installed")


def _module(name: str):
    try:
        return importlib.import_module(OPTIONAL_MODULES[name])
    except ImportError:
        raise RuntimeError(f"compressor {name} needs the Python package {OPTIONAL_MODULES[name]!r} "
                           f"(pip install {OPTIONAL_MODULES[name]})") from None


def compress(data: bytes, name: str, level: int) -> bytes:
    """``data`` compressed by ``name`` with the grouped layout's settings (module docstring)."""
    if name == "zstd":
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=ZSTD_WINDOW_LOG, enable_ldm=True, write_content_size=True)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    if name == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=level | lzma.PRESET_EXTREME)
    if name == "brotli":
        return _module(name).compress(data, quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW)
    if name == "zpaq":
        return _module(name).compress(data, level=ZPAQ_LEVEL, threads=1)
    raise ValueError(f"unknown compressor {name!r} (known: {ALL_COMPRESSORS})")


def decompress(data: bytes, name: str, limit: int) -> bytes:
    """One frame back to bytes, never more than ``limit + 1`` bytes out (zpaq cannot be bounded
    before it runs; its output is checked after). Errors are ValueError with the cause."""
    try:
        if name == "zstd":
            declared = zstandard.frame_content_size(data)
            if declared < 0 or declared > limit:
                raise ValueError(f"a zstd frame declares {declared} bytes, expected at most {limit}")
            out = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG).decompressobj()
            part = out.decompress(data)
            complete, rest = out.eof, out.unused_data
        elif name == "lzma":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            part = out.decompress(data, max_length=limit + 1)
            complete, rest = out.eof, out.unused_data
        elif name == "brotli":
            out = _module(name).Decompressor()
            part = out.process(data, output_buffer_limit=limit + 1)
            complete, rest = out.is_finished(), b""
        elif name == "zpaq":
            part, complete, rest = _module(name).decompress(data), True, b""
        else:
            raise ValueError(f"unknown compressor {name!r}")
    except (zstandard.ZstdError, lzma.LZMAError) as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # brotli.error / zpaq.Error are plain Exceptions
        if isinstance(exc, (ValueError, RuntimeError)):
            raise
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if len(part) > limit:
        raise ValueError(f"decompresses to more than the expected {limit} bytes")
    if not complete or rest:
        raise ValueError("the frame is cut short or has trailing bytes")
    return part


def l1_chain(rows: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Greedy L1 nearest-neighbour order of the rows of ``rows`` [n, c] (module docstring): int64 [n].

    n steps of n·c work: F1855's 36,352 sorted rows of 512 take ~60 G element operations, so it runs
    on the GPU when there is one (``device`` None), else in NumPy int16 (on 2 loaded cores 7x faster
    than torch's threads). Sums of |int8 differences| are exact (int32; float32 below 2^24) and
    both argmins take the first minimum, so every device gives the same order."""
    n = rows.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return torch.from_numpy(_l1_chain_numpy(rows.numpy().astype(np.int16)))
    x = rows.to(device=device, dtype=torch.float32)
    used = torch.zeros(n, dtype=torch.bool, device=device)
    order = [0]
    for _ in range(n - 1):
        last = order[-1]
        used[last] = True
        dist = (x - x[last]).abs().sum(dim=1).masked_fill_(used, float("inf"))
        order.append(int(torch.argmin(dist)))
    return torch.tensor(order, dtype=torch.int64)


def _l1_chain_numpy(x: np.ndarray) -> np.ndarray:
    # The used rows are masked, and dropped from the working copy once they are an eighth of it
    # (a boolean mask keeps index order, so argmin's first minimum is still the lowest index):
    # about half the distance work of scanning every row each step, without a copy per step.
    n = x.shape[0]
    rows, index, used = x, np.arange(n), np.zeros(n, dtype=bool)
    used[0], dead, order = True, 1, [0]
    for _ in range(n - 1):
        if dead * 8 > len(index):
            keep = ~used
            rows, index, used, dead = rows[keep], index[keep], np.zeros(int(keep.sum()), dtype=bool), 0
        dist = np.abs(rows - x[order[-1]]).sum(axis=1, dtype=np.int32)
        dist[used] = np.iinfo(np.int32).max
        j = int(dist.argmin())
        used[j], dead = True, dead + 1
        order.append(int(index[j]))
    return np.asarray(order, dtype=np.int64)


_CHAINS: OrderedDict[bytes, torch.Tensor] = OrderedDict()
_CHAIN_CACHE = 256  # the fit re-encodes mostly unchanged matrices; their chains are kept by content


def cached_l1_chain(q: torch.Tensor) -> torch.Tensor:
    """``l1_chain(q)``, remembered by the digest of q's shape and bytes."""
    arr = q.contiguous().numpy()
    key = hashlib.sha256(repr(tuple(q.shape)).encode() + arr.tobytes()).digest()
    if key not in _CHAINS:
        _CHAINS[key] = l1_chain(q)
        if len(_CHAINS) > _CHAIN_CACHE:
            _CHAINS.popitem(last=False)
    return _CHAINS[key]
