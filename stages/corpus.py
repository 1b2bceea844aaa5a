"""Stage corpus: documents → data/corpus/{train,val}.jsonl + manifest.json.

See pgolf/data/corpus.py for the sources and the exact validation/training split.
"""
from __future__ import annotations

import time
from pathlib import Path

from pgolf.config import from_params
from pgolf.data.corpus import CorpusConfig, build_split, write_split
from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.paths import CORPUS_MANIFEST, CORPUS_TRAIN, CORPUS_VAL, data_metrics


def run(p: dict, root: Path = Path(".")) -> dict:
    """Build the corpus under ``root``; return the manifest."""
    cfg = from_params(CorpusConfig, p, "corpus")
    started = time.perf_counter()
    manifest = write_split(build_split(cfg), root / CORPUS_TRAIN, root / CORPUS_VAL, cfg.val_docs)
    write_json_atomic(root / CORPUS_MANIFEST, manifest)
    write_json_atomic(root / data_metrics("corpus"), {
        "train_docs": manifest["train_docs"], "val_docs": manifest["val_docs"],
        "train_bytes": manifest["train_bytes"], "val_bytes": manifest["val_bytes"],
        "dropped_docs": manifest["dropped_docs"],
        "seconds": round(time.perf_counter() - started, 3)})
    return manifest


@stage_main
def main() -> None:
    m = run(params())
    print(f"corpus ({m['source']}): {m['train_docs']} train docs ({m['train_bytes'] / 1e6:.2f} MB), "
          f"{m['val_docs']} val docs ({m['val_bytes'] / 1e6:.2f} MB), {m['dropped_docs']} dropped")


if __name__ == "__main__":
    main()
