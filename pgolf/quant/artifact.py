"""The quantised model file (``.ptz``): format, writer, reader, dequantiser.

Format, version 2 (all integers little-endian)::

    offset  size  field
    0       8     magic b"PGOLFQZ\\n"
    8       2     format version (uint16) = 2
    10      1     compressor id (uint8): 1 = zstd, 2 = lzma (xz container)
    11      1     reserved, 0
    12      8     payload length in bytes, compressed (uint64)
    20      8     payload length in bytes, decompressed (uint64)
    28      32    sha256 of the compressed payload
    60      ...   compressed payload (exactly the stated length; nothing after)

The compressed payload is a sequence of independent frames (zstd frames, or
xz streams), concatenated: the first holds the index, then one per tensor
holds that tensor's arrays. Decompressing them in order gives the payload.

The decompressed payload is a uint32 index length ``L``, ``L`` bytes of UTF-8
JSON (the index), then a data section of raw little-endian arrays. The index
is ``{"model_config": {...}, "meta": {...}, "tensors": [...]}``; each tensor
entry has ``name``, ``shape``, ``dtype`` (the dtype to restore), ``method``
and either ``bits`` + ``q`` + ``scale`` (int8 integers ``[rows, cols]`` on the
``pgolf.quant.grid`` grid, one fp16 scale per row) or ``raw`` (passthrough).
Each array reference is ``{"dtype", "offset", "nbytes"}`` into the data section,
where a tensor's arrays lie together in ``StoredTensor.arrays`` order. Optional
on a quantised entry: ``protect`` (AWQ-lite, docs/FRONTIER.md §4.5; int16 group
starts and an fp16 scale per row for columns ``[start, start+size)``, integers
in [-127, 127]) and ``lqer`` (low-rank factors, pgolf/quant/lqer_factors.py).
Version 3 packs the same payload by role group (pgolf/quant/grouped.py).

A frame per tensor (not one stream) makes the file's size exactly the index
frame plus the tensors' own frames, so the byte-budget fit knows the size of
every choice of widths without encoding the whole model again (docs/LOG.md,
2026-11-25, for what one stream did), and frames compress on threads.

Nothing in the file is ever unpickled: the reader parses JSON and copies
bytes into tensors. Encoding is deterministic (sorted JSON, fixed array
order, single-threaded compressors), so equal inputs give equal bytes.
The format knows nothing of the model: pgolf/quant/restore.py rebuilds the GPT.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import zstandard

from pgolf.errors import DataError
from pgolf.io import write_bytes_atomic
from pgolf.quant.grid import dequantize_grid

if TYPE_CHECKING:  # grouped, LQER and AWQ-lite are optional modules of the bundle, imported where used
    from pgolf.quant.grouped import Grouping
    from pgolf.quant.lqer_factors import LqerFactors
    from pgolf.quant.protected import ProtectedColumns

MAGIC = b"PGOLFQZ\n"
FORMAT_VERSION = 2
GROUPED_VERSION = 3  # the same logical payload packed by role group (pgolf/quant/grouped.py)
_HEADER = struct.Struct("<8sHBBQQ32s")
HEADER_BYTES = _HEADER.size
COMPRESSORS = {"zstd": 1, "lzma": 2, "brotli": 3, "zpaq": 4}  # 3 and 4: version 3 only
_COMPRESSOR_NAMES = {v: k for k, v in COMPRESSORS.items()}
# Bounds on the decompressed size a header may declare, checked before decompressing, so a crafted file
# cannot make the reader allocate more than max(MIN_PAYLOAD_LIMIT, MAX_EXPANSION x its compressed size) or
# MAX_PAYLOAD_BYTES (quantised weights compress ~1.5x; the floor keeps tiny test files readable).
MAX_PAYLOAD_BYTES = 1 << 30
MAX_EXPANSION = 32
MIN_PAYLOAD_LIMIT = 64 << 20
_STORED_DTYPES = {"int8": (torch.int8, "<i1"), "uint8": (torch.uint8, "<u1"), "int16": (torch.int16, "<i2"),
                  "int32": (torch.int32, "<i4"), "int64": (torch.int64, "<i8"), "bool": (torch.bool, "|b1"),
                  "float16": (torch.float16, "<f2"), "float32": (torch.float32, "<f4"), "float64": (torch.float64, "<f8")}
_RESTORE_DTYPES = {**{name: dtype for name, (dtype, _) in _STORED_DTYPES.items()}, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    """One state-dict entry as stored: ``q`` int8 [rows, cols] + ``scale`` fp16 [rows] (non-2-D: one row), or ``raw``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    bits: int | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    protect: ProtectedColumns | None = None
    lqer: LqerFactors | None = None  # low-rank correction (pgolf/quant/lqer.py), index key "lqer"

    @property
    def quantized(self) -> bool:
        return self.q is not None

    def arrays(self) -> list[torch.Tensor]:
        """Stored arrays in file order: integers, scales, [AWQ starts, scales], [LQER factors]; or raw."""
        if not self.quantized:
            return [self.raw]
        extra = [self.protect.starts, self.protect.scale] if self.protect is not None else []
        return [self.q, self.scale, *extra, *(self.lqer.arrays() if self.lqer is not None else [])]

    def stored_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays())


@dataclass(frozen=True)
class Artifact:
    tensors: list[StoredTensor]
    model_config: dict
    meta: dict
    # Compressed bytes in the file: the index frame, and each tensor's own frame.
    index_frame_bytes: int = 0
    frame_bytes: tuple[int, ...] = ()
    frames: tuple[dict, ...] = ()  # version 3: each frame's record (pgolf/quant/grouped.py)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _array_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    name = dtype_name(t.dtype)
    if name not in _STORED_DTYPES:
        raise ValueError(f"cannot store dtype {name} (allowed: {sorted(_STORED_DTYPES)})")
    arr = t.detach().cpu().contiguous().numpy()
    return name, arr.astype(np.dtype(_STORED_DTYPES[name][1]), copy=False).tobytes()


def stored_arrays_bytes(t: "StoredTensor") -> bytes:
    """One tensor's stored arrays as the payload holds them (``StoredTensor.arrays`` order)."""
    return b"".join(_array_bytes(a)[1] for a in t.arrays())


def compress_bytes(data: bytes, compressor: str, level: int) -> bytes:
    """``data`` compressed exactly as a ``.ptz`` payload is."""
    if compressor == "zstd":
        return zstandard.ZstdCompressor(level=level, threads=0).compress(data)
    if compressor == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=level)
    raise ValueError(f"unknown compressor {compressor!r} (known: {sorted(COMPRESSORS)})")


def tensor_frame(t: StoredTensor, compressor: str, level: int) -> bytes:
    """The compressed frame that holds ``t`` in a ``.ptz`` file, byte for byte."""
    return compress_bytes(stored_arrays_bytes(t), compressor, level)


def tensor_frames(tensors: Sequence[StoredTensor], compressor: str, level: int) -> list[bytes]:
    """``tensor_frame`` of each tensor, on threads (the compressors release the GIL)."""
    workers = max(1, min(len(tensors), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda t: tensor_frame(t, compressor, level), tensors))


def encode(tensors: Sequence[StoredTensor], model_config: dict, meta: dict, compressor: str, level: int,
           frames: Sequence[bytes] | None = None, grouping: Grouping | None = None,
           packing: Packing | None = None) -> bytes:
    """The complete file bytes for ``tensors`` (see the module docstring). ``frames``: the tensors'
    ``tensor_frame`` bytes when the caller has them (``pgolf.quant.encode_cache.EncodeCache``);
    computed here otherwise. ``packing``: the grouped layout's hooks (pgolf/quant/grouped.py; default
    ``Packing()``)."""
    entries, offset = [], 0

    def ref(t: torch.Tensor) -> dict:
        nonlocal offset
        nbytes = t.numel() * t.element_size()
        out = {"dtype": dtype_name(t.dtype), "offset": offset, "nbytes": nbytes}
        offset += nbytes
        return out

    for t in tensors:
        entry = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "method": t.method}
        if t.quantized:
            entry.update(bits=t.bits, q=ref(t.q), scale=ref(t.scale))
            if t.protect is not None:
                entry["protect"] = {"size": t.protect.size, "starts": ref(t.protect.starts),
                                    "scale": ref(t.protect.scale)}
            if t.lqer is not None:
                entry["lqer"] = t.lqer.entry(ref)
        else:
            entry["raw"] = ref(t.raw)
        entries.append(entry)
    index = json.dumps({"model_config": model_config, "meta": meta, "tensors": entries},
                       sort_keys=True, separators=(",", ":")).encode("utf-8")
    head = struct.pack("<I", len(index)) + index
    if grouping is not None:  # format version 3
        data = b"".join(stored_arrays_bytes(t) for t in tensors)
        from pgolf.quant import grouped
        packed, _ = grouped.pack(entries, head, data, compressor, level, grouping, packing or grouped.Packing())
        return _HEADER.pack(MAGIC, GROUPED_VERSION, COMPRESSORS[compressor], 0, len(packed), len(head) + offset,
                            hashlib.sha256(packed).digest()) + packed
    if frames is None:
        frames = tensor_frames(tensors, compressor, level)
    if len(frames) != len(tensors):
        raise ValueError(f"{len(frames)} frames for {len(tensors)} tensors")
    packed = compress_bytes(head, compressor, level) + b"".join(frames)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, COMPRESSORS[compressor], 0, len(packed),
                          len(head) + offset, hashlib.sha256(packed).digest())
    return header + packed


def write_artifact(path: str | Path, tensors: Sequence[StoredTensor], model_config: dict,
                   meta: dict, compressor: str, level: int) -> int:
    """Encode and write atomically; returns the file size in bytes."""
    data = encode(tensors, model_config, meta, compressor, level)
    write_bytes_atomic(path, data)
    return len(data)


def payload_limit(packed_len: int) -> int:
    """The largest decompressed payload a file with ``packed_len`` compressed bytes may declare."""
    return min(MAX_PAYLOAD_BYTES, max(MIN_PAYLOAD_LIMIT, MAX_EXPANSION * packed_len))


def _decompress(packed: bytes, compressor_id: int, raw_length: int, where: str) -> tuple[bytes, list[int]]:
    """The frames of ``packed`` decompressed in order straight into one buffer of ``raw_length`` bytes (the
    caller bounds it; never more), and each frame's compressed length. A zstd frame must declare its size, and
    one that declares more than the room left is refused before it is decompressed (the decompressor stops a
    frame at its declared size); an xz stream is decompressed with at most that room as its output limit."""
    out = bytearray(raw_length)
    sizes, total, rest = [], 0, packed
    try:
        while rest:
            room = raw_length - total
            if compressor_id == COMPRESSORS["zstd"]:
                declared = zstandard.frame_content_size(rest)
                if declared < 0 or declared > room:
                    raise DataError(f"{where}: payload decompresses to more than the header's {raw_length} bytes "
                                    f"(a frame declares {declared})")
                frame = zstandard.ZstdDecompressor().decompressobj()
                part = frame.decompress(rest)
            else:
                frame = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
                part = frame.decompress(rest, max_length=room + 1)
            if not frame.eof:
                raise DataError(f"{where}: compressed payload is incomplete (a frame is cut short)")
            if len(part) > room:
                raise DataError(f"{where}: payload decompresses to more than the header's {raw_length} bytes")
            out[total:total + len(part)] = part
            total += len(part)
            sizes.append(len(rest) - len(frame.unused_data))
            rest = frame.unused_data
            del part
    except (zstandard.ZstdError, lzma.LZMAError) as exc:
        raise DataError(f"{where}: payload does not decompress ({exc})") from None
    if total != raw_length:
        raise DataError(f"{where}: payload decompressed to {total} bytes, header says {raw_length}")
    return out, sizes


def require_finite(t: torch.Tensor, at: str, what: str) -> None:
    """NaN or Inf in a float tensor is a DataError naming ``at``: a model holding them
    scores NaN instead of failing, so neither quantize nor the reader accepts one."""
    if t.is_floating_point() and t.numel():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = t.numel() - int(finite.sum())
            raise DataError(f"{at}: {bad} of {t.numel()} {what} values are not finite (NaN/Inf)")


def _read_array(data: memoryview, ref: Any, where: str) -> torch.Tensor:
    if not isinstance(ref, dict) or ref.get("dtype") not in _STORED_DTYPES:
        raise DataError(f"{where}: bad array reference {ref!r}")
    offset, nbytes = ref.get("offset"), ref.get("nbytes")
    if not (isinstance(offset, int) and isinstance(nbytes, int) and 0 <= offset
            and 0 <= nbytes and offset + nbytes <= len(data)):
        raise DataError(f"{where}: array reference {ref!r} is outside the {len(data)}-byte data section")
    torch_dtype, np_dtype = _STORED_DTYPES[ref["dtype"]]
    if nbytes % np.dtype(np_dtype).itemsize:
        raise DataError(f"{where}: {nbytes} bytes is not a whole number of {ref['dtype']} values")
    arr = np.frombuffer(data[offset:offset + nbytes], dtype=np_dtype)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True)).to(torch_dtype)


def _parse_tensor(entry: Any, data: memoryview, where: str) -> StoredTensor:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise DataError(f"{where}: bad tensor entry {str(entry)[:80]}")
    name = entry["name"]
    at = f"{where}: tensor {name}"
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise DataError(f"{at}: bad shape {shape!r}")
    if entry.get("dtype") not in _RESTORE_DTYPES:
        raise DataError(f"{at}: unknown dtype {entry.get('dtype')!r}")
    numel = int(np.prod(shape, dtype=np.int64))
    common = dict(name=name, shape=tuple(shape), dtype=entry["dtype"], method=str(entry.get("method")))
    if "q" in entry:
        bits = entry.get("bits")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise DataError(f"{at}: bad bit width {bits!r}")
        q, scale = _read_array(data, entry["q"], at), _read_array(data, entry.get("scale"), at)
        rows = shape[0] if len(shape) == 2 else 1
        if q.dtype != torch.int8 or scale.dtype != torch.float16 or q.numel() != numel or scale.numel() != rows:
            raise DataError(f"{at}: integer/scale arrays do not match shape {shape}")
        q = q.reshape(shape) if len(shape) == 2 else q.reshape(1, numel)
        protect = None
        if "protect" in entry:
            from pgolf.quant.protected import parse_protected  # AWQ-lite only
            protect = parse_protected(entry["protect"], lambda ref: _read_array(data, ref, at), at, q)
        qmax = (1 << (bits - 1)) - 1
        coarse = q if protect is None else q[:, ~protect.mask(q.shape[1])]
        if coarse.numel() and int(coarse.abs().max()) > qmax:
            raise DataError(f"{at}: integers exceed ±{qmax} for {bits} bits")
        require_finite(scale, at, "scale")
        if "lqer" in entry:
            from pgolf.quant.lqer_factors import parse_factors
        lqer = parse_factors(entry["lqer"], lambda r: _read_array(data, r, at), shape, at) if "lqer" in entry else None
        return StoredTensor(**common, bits=bits, q=q, scale=scale, protect=protect, lqer=lqer)
    raw = _read_array(data, entry.get("raw"), at)
    if raw.numel() != numel:
        raise DataError(f"{at}: {raw.numel()} stored values for shape {shape}")
    require_finite(raw, at, "passthrough")
    return StoredTensor(**common, raw=raw.reshape(shape))


def decode(blob: bytes, where: str = "<bytes>") -> Artifact:
    """Parse and verify file bytes; every problem is a DataError naming ``where``."""
    if len(blob) < HEADER_BYTES:
        raise DataError(f"{where}: {len(blob)} bytes is shorter than the {HEADER_BYTES}-byte header (truncated?)")
    magic, version, comp_id, _, packed_len, raw_len, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise DataError(f"{where}: not a pgolf quantised artifact (bad magic {magic!r})")
    if version not in (FORMAT_VERSION, GROUPED_VERSION):
        raise DataError(f"{where}: artifact format version {version} is not supported (this code reads {FORMAT_VERSION})")
    if comp_id not in _COMPRESSOR_NAMES:
        raise DataError(f"{where}: unknown compressor id {comp_id}")
    if len(blob) != HEADER_BYTES + packed_len:
        raise DataError(f"{where}: file has {len(blob) - HEADER_BYTES} payload bytes, header says {packed_len} (truncated or padded)")
    if raw_len > payload_limit(packed_len):
        raise DataError(f"{where}: header claims an implausible {raw_len:,}-byte payload from {packed_len:,} "
                        f"compressed bytes (at most {payload_limit(packed_len):,}); refused before decompressing")
    packed = blob[HEADER_BYTES:]
    if hashlib.sha256(packed).digest() != digest:
        raise DataError(f"{where}: checksum mismatch, the file is corrupted")
    if version == GROUPED_VERSION:
        from pgolf.quant import grouped
        raw, records = grouped.unpack(packed, _COMPRESSOR_NAMES[comp_id], raw_len, where)
    else:
        raw, frame_sizes = _decompress(packed, comp_id, raw_len, where)
    payload = memoryview(raw)
    if len(payload) < 4:
        raise DataError(f"{where}: payload too short for its index")
    (index_len,) = struct.unpack_from("<I", payload)
    if 4 + index_len > len(payload):
        raise DataError(f"{where}: index length {index_len} exceeds the payload")
    try:
        index = json.loads(bytes(payload[4:4 + index_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: index is not valid JSON ({exc})") from None
    if not (isinstance(index, dict) and isinstance(index.get("tensors"), list)
            and isinstance(index.get("model_config"), dict) and isinstance(index.get("meta"), dict)):
        raise DataError(f"{where}: index lacks tensors/model_config/meta")
    data = payload[4 + index_len:]
    tensors = [_parse_tensor(e, data, where) for e in index["tensors"]]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: duplicate tensor names")
    if version == GROUPED_VERSION:
        return Artifact(tensors=tensors, model_config=index["model_config"], meta=index["meta"], frames=tuple(records))
    if len(frame_sizes) != 1 + len(tensors):
        raise DataError(f"{where}: {len(frame_sizes)} compressed frames for {len(tensors)} tensors "
                        f"(format {FORMAT_VERSION} has the index's frame and one per tensor)")
    return Artifact(tensors=tensors, model_config=index["model_config"], meta=index["meta"],
                    index_frame_bytes=frame_sizes[0], frame_bytes=tuple(frame_sizes[1:]))


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: quantised artifact not found")
    return decode(path.read_bytes(), str(path))


def grid_value(t: StoredTensor) -> torch.Tensor:
    """A quantised tensor's integers on their grids: ``q·s`` per row, protected columns at their own scale."""
    value = dequantize_grid(t.q, t.scale)
    return t.protect.dequantize(t.q, value) if t.protect is not None else value


def dequantize_tensor(t: StoredTensor) -> torch.Tensor:
    """Float tensor of the original shape and dtype (``grid_value`` + the LQER correction, or the passthrough)."""
    value = grid_value(t) if t.quantized else t.raw
    value = value + t.lqer.dense() if t.lqer is not None else value
    return value.reshape(t.shape).to(_RESTORE_DTYPES[t.dtype])


def dequantize(artifact: Artifact) -> dict[str, torch.Tensor]:
    """The unbanked state dict (conventional 2-D names) the artifact encodes."""
    return {t.name: dequantize_tensor(t) for t in artifact.tensors}

