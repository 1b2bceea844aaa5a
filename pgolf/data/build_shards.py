"""The shards stage's work: tokenise the corpus (or import challenge shards) into one shard folder.

The folder appears whole or not at all (written in a temporary folder, then
renamed); its manifest names the tokenizer by file hash, so the train stage
can refuse shards cut by another tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf.data.bpb import build_byte_tables, stream_bytes
from pgolf.data.corpus import iter_jsonl
from pgolf.data.shards import (SPLITS, ShardInfo, ShardsConfig, challenge_sources, import_shards, read_shard,
                               split_summary, write_stream)
from pgolf.data.tokenizer import DocumentEncoder, load_processor, read_model, sha256_bytes
from pgolf.io import atomic_dir, write_json_atomic


@dataclass(frozen=True)
class ShardsBuild:
    manifest: dict   # what manifest.json holds
    val_bytes: int   # UTF-8 bytes the val split's tokens decode to (the bpb denominator)


def _tokenize(cfg: ShardsConfig, model: bytes, corpus_dir: Path, out: Path) -> dict[str, list[ShardInfo]]:
    with DocumentEncoder(model, cfg.workers) as encoder:
        return {split: write_stream(encoder.encode(iter_jsonl(corpus_dir / f"{split}.jsonl")), out, split,
                                    cfg.tokens_per_shard)
                for split in SPLITS}


def _import(cfg: ShardsConfig, vocab_size: int, out: Path) -> dict[str, list[ShardInfo]]:
    return {split: import_shards(challenge_sources(cfg.challenge_dir, split), out, split, vocab_size, cfg.link)
            for split in SPLITS}


def _chunks(files: list[Path], size: int = 1 << 24) -> Iterator[np.ndarray]:
    """The files' tokens in slices, so a 100M-token shard is never all in memory."""
    for path in files:
        tokens = read_shard(path)
        for start in range(0, tokens.size, size):
            yield tokens[start:start + size]


def build_shards(cfg: ShardsConfig, corpus_dir: Path, tokenizer_path: Path, out_dir: Path) -> ShardsBuild:
    """Write ``out_dir`` (shards + manifest.json) from ``corpus_dir``'s JSONL splits or the challenge's shards."""
    model = read_model(tokenizer_path)
    vocab_size = load_processor(model, str(tokenizer_path)).vocab_size()
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "tokenize":
            splits = _tokenize(cfg, model, corpus_dir, tmp)
            provenance = {"tokens_per_shard": cfg.tokens_per_shard}
        else:
            splits = _import(cfg, vocab_size, tmp)
            provenance = {"challenge_dir": cfg.challenge_dir, "linked": cfg.link}
        manifest = {"source": cfg.source, **provenance, "tokenizer_sha256": sha256_bytes(model),
                    "vocab_size": vocab_size, "splits": {s: split_summary(i) for s, i in splits.items()}}
        tables = build_byte_tables(tokenizer_path, vocab_size)
        val_bytes = stream_bytes(tables, _chunks([tmp / info.name for info in splits["val"]]))
        write_json_atomic(tmp / "manifest.json", manifest)
    return ShardsBuild(manifest, val_bytes)
