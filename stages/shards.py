"""Stage shards: tokenized corpus (or validated challenge shards) →
data/shards/{train,val}_NNNNNN.bin + manifest.json, and val_bytes_NNNNNN.bin
(the val byte sidecar) when the tokenizer is CaseOps."""
from __future__ import annotations

import time
from pathlib import Path

from pgolf.data.bpb import load_byte_source, stream_bytes
from pgolf.data.challenge_import import import_challenge
from pgolf.config import from_params
from pgolf.data.corpus import iter_jsonl
from pgolf.io import atomic_dir, write_json_atomic
from pgolf.data.shards import (ShardInfo, ShardsConfig, iter_chunks, sidecar_summary, split_summary,
                               write_stream, write_val_with_sidecar)
from pgolf.data.tokenizer import DocumentEncoder, case_transform_of, load_processor, read_model, sha256_bytes
from stages.common import params, stage_main

CORPUS_DIR = Path("data/corpus")
TOKENIZER = Path("data/tokenizer/tokenizer.model")
OUT_DIR = Path("data/shards")
METRICS = Path("data/metrics/shards.json")


def _tokenize(cfg: ShardsConfig, model: bytes, corpus: Path, out: Path, transform: str
              ) -> tuple[dict[str, list[ShardInfo]], list[ShardInfo] | None]:
    with DocumentEncoder(model, cfg.workers, transform) as encoder:
        train = write_stream(encoder.encode(iter_jsonl(corpus / "train.jsonl")), out, "train",
                             cfg.tokens_per_shard)
        val_docs = iter_jsonl(corpus / "val.jsonl")
        if transform == "none":
            return {"train": train, "val": write_stream(encoder.encode(val_docs), out, "val",
                                                        cfg.tokens_per_shard)}, None
        val, sidecar = write_val_with_sidecar(encoder.encode_with_bytes(val_docs), out, cfg.tokens_per_shard)
        return {"train": train, "val": val}, sidecar


def run(p: dict, root: Path = Path(".")) -> dict:
    """Write the shards under ``root``; return the manifest."""
    cfg = from_params(ShardsConfig, p, "shards")
    started = time.perf_counter()
    model = read_model(root / TOKENIZER)
    vocab_size = load_processor(model, str(root / TOKENIZER)).vocab_size()
    transform = case_transform_of(model, str(root / TOKENIZER))
    with atomic_dir(root / OUT_DIR) as tmp:
        if cfg.source == "tokenize":
            splits, sidecar = _tokenize(cfg, model, root / CORPUS_DIR, tmp, transform)
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
        source = load_byte_source(tmp, root / TOKENIZER, vocab_size)
        val_bytes = stream_bytes(source, iter_chunks([tmp / info.name for info in splits["val"]]))
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
