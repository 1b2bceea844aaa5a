"""Stage shards: tokenized corpus (or validated challenge shards) →
data/shards/{train,val}_NNNNNN.bin + manifest.json."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf.data.bpb import build_byte_tables, stream_bytes
from pgolf.config import from_params
from pgolf.data.corpus import iter_jsonl
from pgolf.io import atomic_dir, write_json_atomic
from pgolf.data.shards import (SPLITS, ShardInfo, ShardsConfig, challenge_sources, import_shards,
                          read_shard, split_summary, write_stream)
from pgolf.data.tokenizer import DocumentEncoder, load_processor, read_model, sha256_bytes
from pgolf.pipeline.launch import params, stage_main

CORPUS_DIR = Path("data/corpus")
TOKENIZER = Path("data/tokenizer/tokenizer.model")
OUT_DIR = Path("data/shards")
METRICS = Path("data/metrics/shards.json")


def _tokenize(cfg: ShardsConfig, model: bytes, corpus: Path, out: Path) -> dict[str, list[ShardInfo]]:
    with DocumentEncoder(model, cfg.workers) as encoder:
        return {split: write_stream(encoder.encode(iter_jsonl(corpus / f"{split}.jsonl")), out, split,
                                    cfg.tokens_per_shard)
                for split in SPLITS}


def _import(cfg: ShardsConfig, vocab_size: int, out: Path) -> dict[str, list[ShardInfo]]:
    return {split: import_shards(challenge_sources(cfg.challenge_dir, split), out, split, vocab_size,
                                 cfg.link)
            for split in SPLITS}


def _chunks(files: list[Path], size: int = 1 << 24) -> Iterator[np.ndarray]:
    """The files' tokens in slices, so a 100M-token shard is never all in memory."""
    for path in files:
        tokens = read_shard(path)
        for start in range(0, tokens.size, size):
            yield tokens[start:start + size]


def run(p: dict, root: Path = Path(".")) -> dict:
    """Write the shards under ``root``; return the manifest."""
    cfg = from_params(ShardsConfig, p, "shards")
    started = time.perf_counter()
    model = read_model(root / TOKENIZER)
    vocab_size = load_processor(model, str(root / TOKENIZER)).vocab_size()
    with atomic_dir(root / OUT_DIR) as tmp:
        if cfg.source == "tokenize":
            splits = _tokenize(cfg, model, root / CORPUS_DIR, tmp)
            provenance = {"tokens_per_shard": cfg.tokens_per_shard}
        else:
            splits = _import(cfg, vocab_size, tmp)
            provenance = {"challenge_dir": cfg.challenge_dir, "linked": cfg.link}
        manifest = {"source": cfg.source, **provenance, "tokenizer_sha256": sha256_bytes(model),
                    "vocab_size": vocab_size, "splits": {s: split_summary(i) for s, i in splits.items()}}
        tables = build_byte_tables(root / TOKENIZER, vocab_size)
        val_bytes = stream_bytes(tables, _chunks([tmp / info.name for info in splits["val"]]))
        write_json_atomic(tmp / "manifest.json", manifest)
    summary = manifest["splits"]
    write_json_atomic(root / METRICS, {
        "train_tokens": summary["train"]["tokens"], "val_tokens": summary["val"]["tokens"],
        "train_docs": summary["train"]["documents"], "val_docs": summary["val"]["documents"],
        "val_bytes": val_bytes, "val_bytes_per_token": round(val_bytes / summary["val"]["tokens"], 4),
        "seconds": round(time.perf_counter() - started, 3)})
    return manifest


@stage_main
def main() -> None:
    m = run(params())
    s = m["splits"]
    print(f"shards ({m['source']}): train {s['train']['tokens']} tokens in {len(s['train']['files'])} "
          f"files, val {s['val']['tokens']} tokens in {len(s['val']['files'])} files")


if __name__ == "__main__":
    main()
