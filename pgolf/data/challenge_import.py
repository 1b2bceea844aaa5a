"""Import the challenge's pre-tokenized export (``shards.source: challenge``) and
check that it is one clean export (docs/FRONTIER.md §1.5, §6.1).

The folder holds ``fineweb_{train,val}_NNNNNN.bin`` and, for a CaseOps export,
``fineweb_val_bytes_NNNNNN.bin`` (the val byte sidecar). Every file is
validated and placed as ``{train,val,val_bytes}_NNNNNN.bin``. Then:

1. Each split starts with BOS: documents are BOS-delimited, and an export
   written without BOS (a reported prep bug) has no documents to check.
2. One export. A split is cut into files of one fixed size, only its last
   file partial, so with two or more train files the largest train file is
   the export's file size, and no val file can be longer. The issue #2127
   leak broke exactly this: train shards of 10⁷ tokens from a prep run that
   kept only 10,000 val documents (1,499 files), beside the canonical
   47,853,344-token val file of 50,000 documents, so documents
   10,000-49,999 were in both splits.
3. Disjoint splits. Each document (the token run after a BOS, up to the next
   BOS or the end; runs cross file boundaries) is hashed (BLAKE2b-128); the
   number of val documents whose hash also occurs in train must be at most
   ``max_shared_val_docs`` (default 0). Empty documents are skipped.
4. Sidecar (when required): one file per val file with the same entry count,
   and 0 at every BOS position (BOS covers no text), which catches a sidecar
   shifted against its tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pgolf.data.shards import (BOS_ID, SIDECAR, SPLITS, ShardInfo, challenge_sources, import_shards,
                               iter_chunks, read_header, read_shard)
from pgolf.errors import DataError

_DIGEST_BYTES = 16


@dataclass(frozen=True)
class ImportedExport:
    splits: dict[str, list[ShardInfo]]
    sidecar: list[ShardInfo] | None
    checks: dict


def document_digests(chunks: Iterable[np.ndarray], where: str) -> Iterator[bytes]:
    """BLAKE2b digest of every non-empty BOS-delimited document of a token stream
    given as consecutive chunks; DataError if the stream does not start with BOS."""
    hasher, length = None, 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk)
        start = 0
        for bos in np.flatnonzero(chunk == BOS_ID).tolist():
            if hasher is None and bos != start:
                raise DataError(f"{where}: the token stream does not start with BOS (id {BOS_ID})")
            if hasher is not None:
                hasher.update(chunk[start:bos].tobytes())
                length += bos - start
                if length:
                    yield hasher.digest()
            hasher, length, start = hashlib.blake2b(digest_size=_DIGEST_BYTES), 0, bos + 1
        if hasher is None and chunk.size:
            raise DataError(f"{where}: the token stream does not start with BOS (id {BOS_ID})")
        if hasher is not None:
            hasher.update(chunk[start:].tobytes())
            length += chunk.size - start
    if hasher is not None and length:
        yield hasher.digest()


def check_one_export(train: list[Path], val: list[Path]) -> dict:
    """Check 2 of the module docstring; return the file sizes it compared."""
    train_tokens = [read_header(p) for p in train]
    val_tokens = [read_header(p) for p in val]
    largest_train, largest_val = max(train_tokens), max(val_tokens)
    if len(train) >= 2 and largest_val > largest_train:
        name = val[val_tokens.index(largest_val)]
        raise DataError(
            f"{name}: {largest_val:,} tokens, more than any of the {len(train)} train files "
            f"(largest {largest_train:,}): the splits were cut with different file sizes, so they come "
            "from different exports (the issue #2127 train/val leak looks like this: 1,499 train files "
            "of 10^7 tokens beside the 50,000-document val file)")
    return {"train_files": len(train), "largest_train_file_tokens": largest_train,
            "val_files": len(val), "largest_val_file_tokens": largest_val}


def check_disjoint(train: list[Path], val: list[Path], max_shared: int) -> dict:
    """Checks 1 and 3 of the module docstring; return the document counts."""
    val_digests = set()
    val_docs = 0
    for digest in document_digests(iter_chunks(val), str(val[0])):
        val_docs += 1
        val_digests.add(digest)
    shared: set[bytes] = set()
    train_docs = 0
    for digest in document_digests(iter_chunks(train), str(train[0])):
        train_docs += 1
        if digest in val_digests:
            shared.add(digest)
    if len(shared) > max_shared:
        raise DataError(
            f"{val[0].parent}: {len(shared):,} of {len(val_digests):,} distinct val documents also occur in "
            f"train (shards.max_shared_val_docs = {max_shared}); a train/val leak such as issue #2127. "
            "If these are genuine duplicates in the source, raise shards.max_shared_val_docs")
    return {"val_docs": val_docs, "train_docs": train_docs, "distinct_val_docs": len(val_digests),
            "val_docs_in_train": len(shared), "max_shared_val_docs": max_shared}


def check_sidecar(sidecar: list[Path], val: list[Path]) -> None:
    """Check 4 of the module docstring."""
    if len(sidecar) != len(val):
        raise DataError(f"{sidecar[0].parent}: {len(sidecar)} val byte sidecar files for {len(val)} val files")
    for side, shard in zip(sidecar, val):
        entries, tokens = read_header(side), read_header(shard)
        if entries != tokens:
            raise DataError(f"{side}: {entries:,} entries for the {tokens:,} tokens of {shard.name}")
        at_bos = np.asarray(read_shard(side))[np.asarray(read_shard(shard)) == BOS_ID]
        if np.any(at_bos):
            raise DataError(f"{side}: {int(np.count_nonzero(at_bos))} BOS positions of {shard.name} carry "
                            "bytes (a BOS covers none); the sidecar is not aligned with its tokens")


def import_challenge(source: str | Path, directory: Path, vocab_size: int, link: bool,
                     with_sidecar: bool, max_shared_val_docs: int) -> ImportedExport:
    """Check the export in ``source`` and place it in ``directory`` (module docstring)."""
    files = {split: challenge_sources(source, split) for split in SPLITS}
    sidecar_files = challenge_sources(source, SIDECAR) if with_sidecar else []
    checks = check_one_export(files["train"], files["val"])
    splits = {split: import_shards(files[split], directory, split, vocab_size, link) for split in SPLITS}
    placed = {split: [directory / info.name for info in splits[split]] for split in SPLITS}
    checks.update(check_disjoint(placed["train"], placed["val"], max_shared_val_docs))
    sidecar = None
    if with_sidecar:
        check_sidecar(sidecar_files, files["val"])
        sidecar = import_shards(sidecar_files, directory, SIDECAR, None, link)
    return ImportedExport(splits, sidecar, checks)
