"""Tokenisation throughput of the shards stage's encoder, in MB/s of UTF-8 text.

Encodes the embedded corpus (params.yaml, section corpus) with the tokenizer
at data/tokenizer/tokenizer.model, or one trained on the spot, on every core
(and on one worker for comparison). Pool start-up is included in the timing:
it is part of what the stage pays.

    python bench/tokenize_throughput.py [--workers 0] [--repeat 3] [--model PATH]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from pgolf.config import from_params, load_params  # noqa: E402
from pgolf.data.corpus import CorpusConfig, build_split  # noqa: E402
from pgolf.data.tokenizer import DocumentEncoder, available_cores, read_model, train_model  # noqa: E402


def throughput(model: bytes, docs: list[str], workers: int, repeat: int) -> tuple[float, int]:
    """Best of ``repeat`` runs: (MB/s, tokens)."""
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        with DocumentEncoder(model, workers) as encoder:
            tokens = sum(chunk.size for chunk in encoder.encode(docs))
        best = min(best, time.perf_counter() - start)
    return mb / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--model", default="data/tokenizer/tokenizer.model",
                        help="SentencePiece model (trained on the corpus if the file is absent)")
    args = parser.parse_args()
    params = load_params("params.yaml")
    split = build_split(from_params(CorpusConfig, params, "corpus"))
    val, train = list(split.val), list(split.train)
    docs = val + train
    if Path(args.model).is_file():
        model, source = read_model(args.model), args.model
    else:
        model, source = train_model(train, params["tokenizer"]["vocab_size"]), "trained now"
    workers = args.workers or available_cores()
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} docs, {mb:.2f} MB; tokenizer: {source}")
    for n in sorted({1, workers}):
        rate, tokens = throughput(model, docs, n, args.repeat)
        print(f"workers={n}: {rate:.2f} MB/s ({tokens} tokens, {mb * 1e6 / tokens:.3f} bytes/token)")


if __name__ == "__main__":
    main()
