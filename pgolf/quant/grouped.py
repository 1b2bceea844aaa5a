"""The grouped layout of a ``.ptz`` payload (``quantize.compression: grouped``, format version 3).

The logical payload is the one of format version 2 (pgolf/quant/artifact.py:
uint32 index length, the JSON index, the data section); only its packing in
the file differs. The integer arrays of the quantised 2-D tensors that have a
role (the writer's :class:`Grouping`; pgolf/quant/roles.py: ``tok_emb`` and the
six block matrices) are taken out of the data section and stored by role group: each matrix's rows
in greedy L1 order (pgolf/quant/compression.py) when its role is a sorted one, the group's matrices
concatenated in index order, either each transposed (columns of integers lie together) or row-major:
the writer compresses both and keeps the smaller frame, group by group (which one wins depends on the
compressor and the role; docs/LOG.md). Everything else (the index, scales, LQER factors,
passthrough tensors, other integers; then the uint16 row permutations) is the remainder.

Packed bytes, after the file header (all integers little-endian)::

    uint32 frame count N, N × uint64 frame lengths, then the N frames:
    frame 0  the layout JSON (compressor of the header)
    frame 1  the remainder
    frame 2… one per role group, in the grouping's order (roles with no matrix omitted)

The layout names each frame's compressor, decompressed length and whether its
members are transposed (absent in files written before the choice: transposed),
and each member's name, offset in the data section, rows, cols and whether it is
sorted, so the reader rebuilds the logical payload byte for byte. One frame
per group keeps each group's size exact and separately measurable.

The writer's two costly steps are hooks (:class:`Packing`): the row order of
a sorted member (any permutation is valid for the reader; the default is the
greedy L1 order of the member's own integers) and the compression of the
frames (the default compresses them on threads, one frame each: the
compressors release the GIL and each frame is compressed alone, so the bytes
equal a serial run's). pgolf/quant/encode_cache.py gives the byte fit's
probes their own hooks, with memory.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from pgolf.errors import DataError
from pgolf.quant.compression import cached_l1_chain, compress, decompress

LAYOUT_LIMIT = 16 << 20  # decompressed bytes a layout frame may have
MAX_FRAMES = 1 << 16
_PERM_DTYPE = np.dtype("<u2")


@dataclass(frozen=True)
class Grouping:
    """Which tensors form which group: ``role_of(name)`` (None = remainder), groups in ``order``,
    rows L1-ordered in the ``sorted`` roles."""

    role_of: Callable[[str], str | None]
    order: tuple[str, ...]
    sorted: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of its int8 [rows, cols] array in the data section
    rows: int
    cols: int
    sorted: bool


def group_members(entries: Sequence[dict], grouping: Grouping) -> dict[str, list[Member]]:
    """Role → members, from the index's tensor entries (index order within a role)."""
    groups: dict[str, list[Member]] = {}
    for e in entries:
        role = grouping.role_of(e["name"])
        if role is None or "q" not in e or len(e["shape"]) != 2:
            continue
        rows, cols = e["shape"]
        sort = role in grouping.sorted and rows <= np.iinfo(_PERM_DTYPE).max + 1
        groups.setdefault(role, []).append(Member(e["name"], e["q"]["offset"], rows, cols, sort))
    unknown = set(groups) - set(grouping.order)
    if unknown:
        raise ValueError(f"roles {sorted(unknown)} are not in the grouping's order")
    return {role: groups[role] for role in grouping.order if role in groups}


def l1_row_order(name: str, q: np.ndarray) -> np.ndarray:
    """The default row order of a sorted member: the greedy L1 order of its integers (remembered by content)."""
    return cached_l1_chain(torch.from_numpy(q.copy())).numpy()


def compress_frames(streams: Sequence[bytes], compressor: str, level: int, threads: int | None = None) -> list[bytes]:
    """Each stream compressed alone, on up to ``threads`` threads (default: one per core); the bytes
    do not depend on the thread count."""
    workers = max(1, min(len(streams), threads or os.cpu_count() or 1))
    if workers == 1:
        return [compress(s, compressor, level) for s in streams]
    # Longest first, so the big groups do not start last; results go back in stream order.
    order = sorted(range(len(streams)), key=lambda i: -len(streams[i]))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = dict(zip(order, pool.map(lambda i: compress(streams[i], compressor, level), order)))
    return [done[i] for i in range(len(streams))]


@dataclass(frozen=True)
class Packing:
    """The writer's hooks (module docstring): ``row_order(name, q)`` → int permutation of q's rows,
    ``compress(streams, compressor, level)`` → one frame per stream."""

    row_order: Callable[[str, np.ndarray], np.ndarray] = l1_row_order
    compress: Callable[[Sequence[bytes], str, int], list[bytes]] = compress_frames


def _stored(q: np.ndarray, m: Member, row_order: Callable[[str, np.ndarray], np.ndarray]) -> tuple[np.ndarray, bytes]:
    """(the row-ordered integers [rows, cols]; the permutation's bytes or b"")."""
    if not m.sorted:
        return q, b""
    perm = np.asarray(row_order(m.name, q))
    if perm.shape != (m.rows,):
        raise ValueError(f"row order of {m.name}: {perm.shape} for {m.rows} rows")
    return q[perm], perm.astype(_PERM_DTYPE).tobytes()


def pack(entries: Sequence[dict], head: bytes, data: bytes, compressor: str, level: int,
         grouping: Grouping, packing: Packing = Packing()) -> tuple[bytes, list[dict]]:
    """(packed bytes, one record per frame: name, compressor, raw_bytes, bytes) for the logical
    payload ``head + data`` whose tensor entries are ``entries``."""
    groups = group_members(entries, grouping)
    members = sorted((m for ms in groups.values() for m in ms), key=lambda m: m.offset)
    remainder, perms, cursor = [head], [], 0
    stored_of: dict[str, np.ndarray] = {}
    for m in members:
        remainder.append(data[cursor:m.offset])
        q = np.frombuffer(data, dtype=np.int8, count=m.rows * m.cols, offset=m.offset).reshape(m.rows, m.cols)
        stored_of[m.name], perm = _stored(q, m, packing.row_order)
        perms.append(perm)
        cursor = m.offset + m.rows * m.cols
    remainder.append(data[cursor:])
    roles = list(groups)
    transposed = [b"".join(np.ascontiguousarray(stored_of[m.name].T).tobytes() for m in groups[r]) for r in roles]
    row_major = [b"".join(stored_of[m.name].tobytes() for m in groups[r]) for r in roles]
    remainder_bytes = b"".join(remainder + perms)
    packed = packing.compress([remainder_bytes, *transposed, *row_major], compressor, level)
    n = len(roles)
    # per group the smaller frame; a tie keeps the transposed one (the layout of files without the flag)
    chosen = {r: (t, True) if len(t) <= len(w) else (w, False)
              for r, t, w in zip(roles, packed[1:1 + n], packed[1 + n:])}
    frames_of = {"remainder": packed[0], **{r: frame for r, (frame, _) in chosen.items()}}
    raw_len = {"remainder": len(remainder_bytes), **{r: len(t) for r, t in zip(roles, transposed)}}
    layout = {"groups": [{"role": r, "compressor": compressor, "raw_bytes": raw_len[r], "transposed": chosen[r][1],
                          "members": [[m.name, m.offset, m.rows, m.cols, m.sorted] for m in groups[r]]}
                         for r in roles],
              "remainder": {"compressor": compressor, "raw_bytes": raw_len["remainder"]}}
    layout_bytes = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode("utf-8")
    names = ["layout", "remainder", *groups]
    frames = packing.compress([layout_bytes], compressor, level) + [frames_of[n] for n in names[1:]]
    raw_len["layout"] = len(layout_bytes)
    table = struct.pack(f"<I{len(frames)}Q", len(frames), *(len(f) for f in frames))
    records = [{"frame": n, "compressor": compressor, "raw_bytes": raw_len[n], "bytes": len(f)}
               for n, f in zip(names, frames)]
    return table + b"".join(frames), records


def _frames(packed: bytes, where: str) -> list[bytes]:
    if len(packed) < 4:
        raise DataError(f"{where}: grouped payload too short for its frame table (truncated?)")
    (count,) = struct.unpack_from("<I", packed)
    if not 2 <= count <= MAX_FRAMES or len(packed) < 4 + 8 * count:
        raise DataError(f"{where}: grouped payload has a bad frame table ({count} frames)")
    lengths = struct.unpack_from(f"<{count}Q", packed, 4)
    start = 4 + 8 * count
    if start + sum(lengths) != len(packed):
        raise DataError(f"{where}: grouped frames take {sum(lengths)} bytes, the payload has {len(packed) - start} "
                        "(truncated or padded)")
    out = []
    for n in lengths:
        out.append(packed[start:start + n])
        start += n
    return out


def _open(frame: bytes, compressor: str, limit: int, what: str, where: str) -> bytes:
    try:
        return decompress(frame, compressor, limit)
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: grouped frame {what} does not decompress ({exc})") from None


def _layout(frame: bytes, compressor: str, where: str) -> dict:
    try:
        layout = json.loads(_open(frame, compressor, LAYOUT_LIMIT, "layout", where).decode("utf-8"))
        groups = [(g["role"], g["compressor"], int(g["raw_bytes"]),
                   [Member(str(n), int(o), int(r), int(c), bool(s)) for n, o, r, c, s in g["members"]],
                   bool(g.get("transposed", True)))
                  for g in layout["groups"]]
        rem = layout["remainder"]
        if any(min(m.offset, m.rows, m.cols) < 0 for _, _, _, ms, _ in groups for m in ms):
            raise ValueError("a member has a negative offset or shape")
        return {"groups": groups, "remainder": (rem["compressor"], int(rem["raw_bytes"]))}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: grouped layout is malformed ({type(exc).__name__}: {exc})") from None


def unpack(packed: bytes, compressor: str, raw_len: int, where: str) -> tuple[bytearray, list[dict]]:
    """The logical payload (exactly ``raw_len`` bytes) and one record per frame, as :func:`pack`'s;
    every inconsistency is a DataError naming ``where``."""
    frames = _frames(packed, where)
    layout = _layout(frames[0], compressor, where)
    groups = layout["groups"]
    if len(frames) != 2 + len(groups):
        raise DataError(f"{where}: {len(frames)} grouped frames for {len(groups)} groups")
    members = sorted((m for _, _, _, ms, _ in groups for m in ms), key=lambda m: m.offset)
    rem_comp, rem_len = layout["remainder"]
    if rem_len > raw_len + 2 * sum(m.rows for m in members):
        raise DataError(f"{where}: grouped remainder of {rem_len} bytes exceeds the payload")
    remainder = _open(frames[1], rem_comp, rem_len, "remainder", where)
    records = [{"frame": "layout", "compressor": compressor, "raw_bytes": None, "bytes": len(frames[0])},
               {"frame": "remainder", "compressor": rem_comp, "raw_bytes": rem_len, "bytes": len(frames[1])}]
    stored: dict[str, np.ndarray] = {}
    for (role, comp, size, ms, transposed), frame in zip(groups, frames[2:]):
        if size != sum(m.rows * m.cols for m in ms) or size > raw_len:
            raise DataError(f"{where}: grouped frame {role} declares {size} bytes for its members")
        stream = np.frombuffer(_open(frame, comp, size, role, where), dtype=np.int8)
        if stream.size != size:
            raise DataError(f"{where}: grouped frame {role} decompressed to {stream.size} bytes, layout says {size}")
        records.append({"frame": role, "compressor": comp, "raw_bytes": size, "bytes": len(frame)})
        at = 0
        for m in ms:   # each member back to [rows, cols] (still in its stored row order)
            values = stream[at:at + m.rows * m.cols]
            stored[m.name] = values.reshape(m.cols, m.rows).T if transposed else values.reshape(m.rows, m.cols)
            at += m.rows * m.cols
    if len(remainder) != rem_len or len(remainder) < 4:
        raise DataError(f"{where}: grouped remainder decompressed to {len(remainder)} bytes, layout says {rem_len}")
    return _rebuild(remainder, members, stored, raw_len, where), records


def _rebuild(remainder: bytes, members: list[Member], stored: dict[str, np.ndarray], raw_len: int,
             where: str) -> bytearray:
    (index_len,) = struct.unpack_from("<I", remainder)
    head_len = 4 + index_len
    data_len = raw_len - head_len
    perm_bytes = 2 * sum(m.rows for m in members if m.sorted)
    if data_len < 0 or head_len + data_len - sum(m.rows * m.cols for m in members) + perm_bytes != len(remainder):
        raise DataError(f"{where}: grouped remainder does not add up to the header's {raw_len}-byte payload")
    out = bytearray(raw_len)
    out[:head_len] = remainder[:head_len]
    r, p = head_len, 0  # read position in the remainder, write position in the data section
    perms = memoryview(remainder)[len(remainder) - perm_bytes:]
    perm_at = 0
    for m in members:
        if m.offset < p or m.offset + m.rows * m.cols > data_len:
            raise DataError(f"{where}: grouped member {m.name} overlaps or lies outside the data section")
        gap = m.offset - p
        out[head_len + p:head_len + m.offset] = remainder[r:r + gap]
        r += gap
        q = np.ascontiguousarray(stored[m.name])
        if m.sorted:
            perm = np.frombuffer(perms[perm_at:perm_at + 2 * m.rows], dtype=_PERM_DTYPE).astype(np.int64)
            perm_at += 2 * m.rows
            if not np.array_equal(np.sort(perm), np.arange(m.rows)):
                raise DataError(f"{where}: grouped member {m.name} has a row order that is not a permutation")
            rows = np.empty_like(q)
            rows[perm] = q
            q = rows
        start = head_len + m.offset
        out[start:start + m.rows * m.cols] = q.tobytes()
        p = m.offset + m.rows * m.cols
    out[head_len + p:] = remainder[r:r + data_len - p]
    if len(out) != raw_len:
        raise DataError(f"{where}: grouped members and remainder rebuild {len(out)} bytes, header says {raw_len}")
    return out

