"""Token shard files in the challenge's format, and the reader every later stage uses.

A shard is a 1,024-byte header of 256 little-endian int32 values (magic
20240520, version 1, token count, then zeros) followed by that many
little-endian uint16 token ids (docs/RECIPE.md §1.1). A split is the sorted list of
``{split}_NNNNNN.bin`` files in one directory; its token stream is their
concatenation, with one BOS before every document and documents free to
cross file boundaries.

The reader memory-maps the body (nothing is loaded up front) and refuses a
file whose header, size or ids disagree with what it claims, naming the file.

The val byte sidecar (docs/FRONTIER.md §1.4, written when the tokenizer is CaseOps)
uses the same file format: ``val_bytes_NNNNNN.bin`` holds, for every token
of ``val_NNNNNN.bin`` at the same position, the UTF-8 bytes of the original
text that token covers (0 for BOS and control pieces). The challenge's
export names it ``fineweb_val_bytes_NNNNNN.bin``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from pgolf.config import check
from pgolf.errors import DataError
from pgolf.io import atomic_path, file_sha256

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
SPLITS = ("train", "val")
SIDECAR = "val_bytes"         # the val byte sidecar's file stem
SIDECAR_MAX = (1 << 16) - 1    # entries are uint16
TOKEN_DTYPE = np.dtype("<u2")
# Ids are checked against the vocabulary in slices of this many tokens, so a
# 100M-token shard is scanned without materialising it in memory.
_SCAN_CHUNK = 1 << 24


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _header(num_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (uint16) as one shard file, atomically."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"write_shard expects a 1-D uint16 array, got {tokens.dtype} {tokens.shape}")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens do not fit an int32 header count")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_header(tokens.size).tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())


def read_header(path: str | Path) -> int:
    """Validate a shard's header and file size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise DataError(f"{path}: negative token count {num_tokens} in header")
    expected = HEADER_BYTES + 2 * num_tokens
    if size != expected:
        raise DataError(
            f"{path}: file is {size} bytes but its header says {num_tokens} tokens "
            f"({expected} bytes)")
    return num_tokens


def check_ids(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Raise DataError if any id in ``tokens`` is >= ``vocab_size``."""
    for start in range(0, tokens.size, _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            offset = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{path}: token id {int(tokens[offset])} at position {offset} is >= vocab size {vocab_size}")


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Read-only memory map (uint16) of a shard's tokens, after validating it.

    With ``vocab_size`` given, every id is checked (a sequential scan of the
    file) and an id >= vocab_size raises DataError.
    """
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        check_ids(path, tokens, vocab_size)
    return tokens


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Sorted ``{split}_NNNNNN.bin`` files of ``directory``; DataError if none."""
    if split not in SPLITS + (SIDECAR,):
        raise ValueError(f"split must be one of {SPLITS + (SIDECAR,)}, got {split!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: shard directory not found")
    paths = sorted(p for p in directory.glob(f"{split}_*.bin") if p.stem[len(split) + 1:].isdigit())
    if not paths:
        raise DataError(f"{directory}: no {split}_NNNNNN.bin shards")
    return paths


def iter_chunks(files: Iterable[Path], size: int = _SCAN_CHUNK) -> Iterator[np.ndarray]:
    """The files' tokens in order, in slices, so a 100M-token shard is never all in memory."""
    for path in files:
        tokens = read_shard(path)
        for start in range(0, tokens.size, size):
            yield tokens[start:start + size]


def load_tokens(paths: list[Path], vocab_size: int | None = None) -> np.ndarray:
    """The shards ``paths``, in that order, as one in-memory uint16 array (meant for val)."""
    parts = [np.asarray(read_shard(p, vocab_size)) for p in paths]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def load_split(directory: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """The whole split of a pgolf shard folder as one array (:func:`load_tokens`)."""
    return load_tokens(list_shards(directory, split), vocab_size)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    tokens: int
    bytes: int
    sha256: str
    documents: int  # BOS tokens in this file

    @classmethod
    def of(cls, path: Path, tokens: np.ndarray) -> "ShardInfo":
        return cls(name=path.name, tokens=int(tokens.size), bytes=path.stat().st_size,
                   sha256=file_sha256(path), documents=int(np.count_nonzero(tokens == BOS_ID)))


class ShardWriter:
    """Cuts one split's token stream into files of exactly ``tokens_per_shard``
    tokens (the last one partial), numbered from 000000 in stream order."""

    def __init__(self, directory: str | Path, split: str, tokens_per_shard: int):
        if split not in SPLITS + (SIDECAR,):
            raise ValueError(f"split must be one of {SPLITS + (SIDECAR,)}, got {split!r}")
        if tokens_per_shard <= 0:
            raise ValueError("tokens_per_shard must be positive")
        self.directory = Path(directory)
        self.split = split
        self.tokens_per_shard = tokens_per_shard
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=np.uint16))
        self._pending_tokens += tokens.size
        while self._pending_tokens >= self.tokens_per_shard:
            stream = np.concatenate(self._pending)
            self._flush(stream[:self.tokens_per_shard])
            rest = stream[self.tokens_per_shard:]
            self._pending, self._pending_tokens = [rest], rest.size

    def close(self) -> list[ShardInfo]:
        """Write the partial last shard; an empty split is an error."""
        if self._pending_tokens:
            self._flush(np.concatenate(self._pending))
        self._pending, self._pending_tokens = [], 0
        if not self.shards:
            raise DataError(f"{self.directory}: the {self.split} split has no tokens")
        return self.shards

    def _flush(self, tokens: np.ndarray) -> None:
        path = self.directory / shard_name(self.split, len(self.shards))
        write_shard(path, tokens)
        self.shards.append(ShardInfo.of(path, tokens))


def import_shards(sources: Iterable[Path], directory: Path, split: str, vocab_size: int | None,
                  link: bool) -> list[ShardInfo]:
    """Validate already-tokenized shards and place them as ``{split}_NNNNNN.bin``.

    Every file's header, size and ids (< vocab_size; unchecked when None, as
    for a sidecar) are checked before it is hard-linked (``link``, which needs
    the same file system) or copied.
    """
    directory.mkdir(parents=True, exist_ok=True)
    infos = []
    for index, src in enumerate(sorted(sources)):
        tokens = read_shard(src, vocab_size)
        dest = directory / shard_name(split, index)
        if link:
            try:
                os.link(src, dest)
            except OSError as exc:
                raise DataError(f"{src}: cannot hard-link into {directory} ({exc.strerror}); "
                                "set shards.link: false to copy instead") from None
        else:
            shutil.copyfile(src, dest)
        infos.append(ShardInfo.of(dest, np.asarray(tokens)))
    if not infos:
        raise DataError(f"{directory}: no {split} shards to import")
    return infos


@dataclass(frozen=True)
class ShardsConfig:
    source: Literal["tokenize", "challenge"]
    challenge_dir: str      # 'challenge': folder with fineweb_{train,val}_NNNNNN.bin; else ""
    link: bool              # 'challenge': hard-link the files instead of copying them
    tokens_per_shard: int   # 'tokenize': tokens per file (the last one of a split is partial)
    workers: int            # 'tokenize': encoding processes; 0 = all cores
    max_shared_val_docs: int  # 'challenge': val documents allowed to occur in train too (0 = disjoint)

    def __post_init__(self) -> None:
        check(0 < self.tokens_per_shard < 2**31, "tokens_per_shard", "must be in [1, 2^31)")
        check(self.workers >= 0, "workers", "must be >= 0 (0 = all cores)")
        check(self.max_shared_val_docs >= 0, "max_shared_val_docs", "must be >= 0")
        if self.source == "challenge":
            check(self.challenge_dir != "", "challenge_dir", "source 'challenge' needs a folder")
        else:
            check(self.challenge_dir == "", "challenge_dir", "must be empty for source 'tokenize'")


def write_stream(chunks: Iterable[np.ndarray], directory: Path, split: str,
                 tokens_per_shard: int) -> list[ShardInfo]:
    """Cut a split's token stream (given as chunks) into shard files."""
    writer = ShardWriter(directory, split, tokens_per_shard)
    for chunk in chunks:
        writer.add(chunk)
    return writer.close()


def write_val_with_sidecar(pairs: Iterable[tuple[np.ndarray, np.ndarray]], directory: Path,
                           tokens_per_shard: int) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """Cut the val stream, given as (tokens, original bytes per token) chunks,
    into val shards and byte-sidecar files cut at the same positions."""
    tokens = ShardWriter(directory, "val", tokens_per_shard)
    sidecar = ShardWriter(directory, SIDECAR, tokens_per_shard)
    for ids, counts in pairs:
        if counts.shape != ids.shape:
            raise ValueError(f"{counts.shape} byte counts for {ids.shape} tokens")
        if counts.size and int(counts.max()) > SIDECAR_MAX:
            raise DataError(f"{directory}: a val token covers {int(counts.max())} original bytes, "
                            f"more than a uint16 sidecar entry holds ({SIDECAR_MAX})")
        tokens.add(ids)
        sidecar.add(counts.astype(np.uint16))
    return tokens.close(), sidecar.close()


def load_sidecar(directory: str | Path, challenge_names: bool = False) -> np.ndarray | None:
    """The val byte sidecar of a shard folder (uint16, one entry per val token),
    or None if it has none; DataError unless its files match the val shards 1:1.
    ``challenge_names``: the challenge's ``fineweb_val_bytes_NNNNNN.bin`` beside ``fineweb_val_NNNNNN.bin``."""
    directory = Path(directory)
    prefix, listed = ("fineweb_", challenge_sources) if challenge_names else ("", list_shards)
    if not any(directory.glob(f"{prefix}{SIDECAR}_*.bin")):
        return None
    files, shards = listed(directory, SIDECAR), listed(directory, "val")
    if len(files) != len(shards):
        raise DataError(f"{directory}: {len(files)} {SIDECAR} files for {len(shards)} val shards")
    for side, shard in zip(files, shards):
        if side.name[len(prefix + SIDECAR):] != shard.name[len(prefix + "val"):] \
                or read_header(side) != read_header(shard):
            raise DataError(f"{side}: not aligned with {shard.name} "
                            f"({read_header(side)} entries, {read_header(shard)} tokens)")
    return np.concatenate([np.asarray(read_shard(p)) for p in files])


def challenge_sources(directory: str | Path, split: str) -> list[Path]:
    """The challenge's ``fineweb_{split}_NNNNNN.bin`` files, sorted (split may be SIDECAR)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: challenge shard folder not found")
    paths = sorted(directory.glob(f"fineweb_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not paths:
        raise DataError(f"{directory}: no fineweb_{split}_NNNNNN.bin shards")
    return paths


def sidecar_summary(infos: list[ShardInfo]) -> dict:
    return {"files": [{k: v for k, v in dataclasses.asdict(i).items() if k != "documents"} for i in infos],
            "entries": sum(i.tokens for i in infos)}


def split_summary(infos: list[ShardInfo]) -> dict:
    return {"files": [dataclasses.asdict(i) for i in infos],
            "tokens": sum(i.tokens for i in infos),
            "documents": sum(i.documents for i in infos)}
