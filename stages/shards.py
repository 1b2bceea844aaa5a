"""Stage shards: tokenized corpus (or validated challenge shards) →
data/shards/{train,val}_NNNNNN.bin + manifest.json, and val_bytes_NNNNNN.bin (the val byte
sidecar) when the tokenizer is CaseOps (pgolf/data/build_shards.py)."""
from __future__ import annotations

import time
from pathlib import Path

from pgolf.config import from_params
from pgolf.data.build_shards import build_shards
from pgolf.data.shards import ShardsConfig
from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.paths import CORPUS_DIR, SHARD_DIR, TOKENIZER_MODEL, data_metrics


def run(p: dict, root: Path = Path(".")) -> dict:
    """Write the shards under ``root``; return the manifest."""
    cfg = from_params(ShardsConfig, p, "shards")
    started = time.perf_counter()
    built = build_shards(cfg, root / CORPUS_DIR, root / TOKENIZER_MODEL, root / SHARD_DIR)
    splits = built.manifest["splits"]
    write_json_atomic(root / data_metrics("shards"), {
        "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
        "train_docs": splits["train"]["documents"], "val_docs": splits["val"]["documents"],
        "val_bytes": built.val_bytes, "val_bytes_per_token": round(built.val_bytes / splits["val"]["tokens"], 4),
        "seconds": round(time.perf_counter() - started, 3)})
    return built.manifest


@stage_main
def main() -> None:
    m = run(params())
    s = m["splits"]
    print(f"shards ({m['source']}): train {s['train']['tokens']} tokens in {len(s['train']['files'])} "
          f"files, val {s['val']['tokens']} tokens in {len(s['val']['files'])} files")


if __name__ == "__main__":
    main()
