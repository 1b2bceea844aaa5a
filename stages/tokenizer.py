"""Stage tokenizer: train the challenge-style BPE on the training documents, or
check a given .model → data/tokenizer/{tokenizer.model,meta.json}."""
from __future__ import annotations

import itertools
import time
from importlib.metadata import version
from pathlib import Path

from pgolf.config import from_params
from pgolf.data.corpus import iter_jsonl
from pgolf.io import write_bytes_atomic, write_json_atomic
from pgolf.data.tokenizer import (CHALLENGE_TRAINER_SETTINGS, TokenizerConfig, check_layout, read_model,
                             sha256_bytes, train_model)
from stages.common import params, stage_main

TRAIN_DOCS = Path("data/corpus/train.jsonl")
OUT_DIR = Path("data/tokenizer")
METRICS = Path("data/metrics/tokenizer.json")


def run(p: dict, root: Path = Path(".")) -> dict:
    """Write the tokenizer under ``root``; return its meta."""
    cfg = from_params(TokenizerConfig, p, "tokenizer")
    started = time.perf_counter()
    meta: dict = {"source": cfg.source, "sentencepiece_version": version("sentencepiece")}
    if cfg.source == "train":
        docs = iter_jsonl(root / TRAIN_DOCS)
        docs = list(itertools.islice(docs, cfg.max_train_docs) if cfg.max_train_docs else docs)
        model = train_model(docs, cfg.vocab_size, cfg.case_transform)
        meta.update(train_docs=len(docs), trainer_settings=CHALLENGE_TRAINER_SETTINGS)
        where = "trained tokenizer"
    else:
        model = read_model(cfg.model_path)
        meta["model_path"] = cfg.model_path
        where = cfg.model_path
    check_layout(model, cfg.vocab_size, where, cfg.case_transform)
    meta.update(vocab_size=cfg.vocab_size, case_transform=cfg.case_transform, sha256=sha256_bytes(model))
    write_bytes_atomic(root / OUT_DIR / "tokenizer.model", model)
    write_json_atomic(root / OUT_DIR / "meta.json", meta)
    write_json_atomic(root / METRICS, {"vocab_size": cfg.vocab_size,
                                       "seconds": round(time.perf_counter() - started, 3)})
    return meta


@stage_main
def main() -> None:
    meta = run(params())
    print(f"tokenizer ({meta['source']}): vocab {meta['vocab_size']}, sha256 {meta['sha256'][:16]}")


if __name__ == "__main__":
    main()
