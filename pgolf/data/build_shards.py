"""The shards stage's work: tokenise the corpus (or import challenge shards) into one shard folder.

The folder appears whole or not at all (written in a temporary folder, then
renamed); its manifest names the tokenizer by file hash, so the train stage
can refuse shards cut by another tokenizer. With a CaseOps tokenizer the val
split also gets its byte sidecar (``val_bytes_NNNNNN.bin``, pgolf/data/shards.py),
and the val byte count comes from it, never from the tokenizer's tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pgolf.data.bpb import load_byte_source, stream_bytes
from pgolf.data.challenge_import import import_challenge
from pgolf.data.corpus import iter_jsonl
from pgolf.data.shards import (ShardInfo, ShardsConfig, iter_chunks, sidecar_summary, split_summary, write_stream,
                               write_val_with_sidecar)
from pgolf.data.tokenizer import DocumentEncoder, case_transform_of, load_processor, read_model, sha256_bytes
from pgolf.io import atomic_dir, write_json_atomic


@dataclass(frozen=True)
class ShardsBuild:
    manifest: dict   # what manifest.json holds
    val_bytes: int   # UTF-8 bytes the val split's tokens decode to (the bpb denominator)


def _tokenize(cfg: ShardsConfig, model: bytes, corpus_dir: Path, out: Path, transform: str
              ) -> tuple[dict[str, list[ShardInfo]], list[ShardInfo] | None]:
    """(shards per split, the val sidecar's files or None when the transform is off)."""
    with DocumentEncoder(model, cfg.workers, transform) as encoder:
        train = write_stream(encoder.encode(iter_jsonl(corpus_dir / "train.jsonl")), out, "train",
                             cfg.tokens_per_shard)
        val_docs = iter_jsonl(corpus_dir / "val.jsonl")
        if transform == "none":
            return {"train": train, "val": write_stream(encoder.encode(val_docs), out, "val",
                                                        cfg.tokens_per_shard)}, None
        val, sidecar = write_val_with_sidecar(encoder.encode_with_bytes(val_docs), out, cfg.tokens_per_shard)
        return {"train": train, "val": val}, sidecar


def build_shards(cfg: ShardsConfig, corpus_dir: Path, tokenizer_path: Path, out_dir: Path) -> ShardsBuild:
    """Write ``out_dir`` (shards + manifest.json) from ``corpus_dir``'s JSONL splits or the challenge's shards."""
    model = read_model(tokenizer_path)
    vocab_size = load_processor(model, str(tokenizer_path)).vocab_size()
    transform = case_transform_of(model, str(tokenizer_path))
    with atomic_dir(out_dir) as tmp:
        if cfg.source == "tokenize":
            splits, sidecar = _tokenize(cfg, model, corpus_dir, tmp, transform)
            provenance = {"tokens_per_shard": cfg.tokens_per_shard}
        else:
            export = import_challenge(cfg.challenge_dir, tmp, vocab_size, cfg.link, transform == "caseops",
                                      cfg.max_shared_val_docs)
            splits, sidecar = export.splits, export.sidecar
            provenance = {"challenge_dir": cfg.challenge_dir, "linked": cfg.link, "checks": export.checks}
        manifest = {"source": cfg.source, **provenance, "tokenizer_sha256": sha256_bytes(model),
                    "vocab_size": vocab_size, "splits": {s: split_summary(i) for s, i in splits.items()}}
        if sidecar is not None:
            manifest.update(case_transform=transform, val_byte_sidecar=sidecar_summary(sidecar))
        source = load_byte_source(tmp, tokenizer_path, vocab_size)
        val_bytes = stream_bytes(source, iter_chunks([tmp / info.name for info in splits["val"]]))
        write_json_atomic(tmp / "manifest.json", manifest)
    return ShardsBuild(manifest, val_bytes)
