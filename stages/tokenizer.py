"""Stage tokenizer: train the challenge-style BPE on the training documents, or
check a given .model → data/tokenizer/{tokenizer.model,meta.json}."""
from __future__ import annotations

import time
from pathlib import Path

from pgolf.config import from_params
from pgolf.data.tokenizer import TokenizerConfig, build_tokenizer
from pgolf.io import write_bytes_atomic, write_json_atomic
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.paths import CORPUS_TRAIN, TOKENIZER_META, TOKENIZER_MODEL, data_metrics


def run(p: dict, root: Path = Path(".")) -> dict:
    """Write the tokenizer under ``root``; return its meta."""
    cfg = from_params(TokenizerConfig, p, "tokenizer")
    started = time.perf_counter()
    model, meta = build_tokenizer(cfg, root / CORPUS_TRAIN)
    write_bytes_atomic(root / TOKENIZER_MODEL, model)
    write_json_atomic(root / TOKENIZER_META, meta)
    write_json_atomic(root / data_metrics("tokenizer"), {"vocab_size": cfg.vocab_size,
                                                         "seconds": round(time.perf_counter() - started, 3)})
    return meta


@stage_main
def main() -> None:
    meta = run(params())
    print(f"tokenizer ({meta['source']}): vocab {meta['vocab_size']}, sha256 {meta['sha256'][:16]}")


if __name__ == "__main__":
    main()
