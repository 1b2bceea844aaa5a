"""Time of the n-gram tilt's hint pass (pgolf/eval/ngram_tilt.py), projected to the challenge's val.

    python bench/ngram_tilt.py                               # 4 M synthetic tokens
    python bench/ngram_tilt.py --tokens 47851521             # the challenge's size (~2 GB of RAM)
    python bench/ngram_tilt.py --shards data/shards --vocab 8192   # a real val split (first --tokens)

Prints the vectorised pass's tokens/s, the projected seconds for the
47,851,520 CaseOps val targets (docs/FRONTIER.md §1.1; linear in N, which
slightly favours the sort's N log N), the fraction of gated targets, and the
same pass done by a sequential dict-based table (the obvious loop, on the
first ``--loop-tokens``) for comparison. JSON to ``--json`` and a table.
``cpu_seconds`` is the process's CPU time: on a shared machine it tells how
much of the wall time was the pass itself (numpy runs it on one core).

The synthetic stream mimics web text's repeats: segments of geometric
length (mean 64) that are, with probability ``--repeat``, a copy of an
earlier span and otherwise Zipf-distributed tokens. Its gated fraction is
not FineWeb's (P2135 logs 1.31%); run on the real val split for that.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.eval.ngram_tilt import stream_hints  # noqa: E402

CHALLENGE_TARGETS = 47_851_520  # CaseOps val trimmed to whole 2048/2560 sequences (docs/FRONTIER.md §1.1)


def synthetic_stream(num_tokens: int, vocab: int, repeat: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    out = np.empty(num_tokens, dtype=np.int64)
    fresh = rng.choice(vocab, size=num_tokens, p=zipf)
    pos = 0
    while pos < num_tokens:
        length = min(int(rng.geometric(1 / 64)), num_tokens - pos)
        if pos > length and rng.random() < repeat:
            src = int(rng.integers(0, pos - length))
            out[pos:pos + length] = out[src:src + length]
        else:
            out[pos:pos + length] = fresh[pos:pos + length]
        pos += length
    return out


def dict_hints(tokens: list[int], order: int, threshold: float) -> int:
    """The sequential table (the reference of tests/eval/test_ngram_tilt.py); returns the gated count."""
    k, gated, table = order - 1, 0, {}
    for p in range(k - 1, len(tokens) - 1):
        ctx, nxt = tuple(tokens[p - k + 1:p + 1]), tokens[p + 1]
        state = table.get(ctx)
        if state is None:
            state = table[ctx] = [0, 0, 0, {}]
        elif state[2] / state[0] >= threshold:
            gated += 1
        state[0] += 1
        count = state[3][nxt] = state[3].get(nxt, 0) + 1
        if count > state[2]:
            state[1], state[2] = nxt, count
    return gated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4_000_001, help="stream length (targets + 1)")
    ap.add_argument("--shards", type=Path, help="read the val split of this shard folder instead")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--order", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeat", type=float, default=0.02, help="synthetic: fraction of copied segments")
    ap.add_argument("--loop-tokens", type=int, default=200_000, help="0 skips the dict loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.shards is not None:
        from pgolf.data.shards import load_split
        tokens = load_split(args.shards, "val", args.vocab)[:args.tokens].astype(np.int64)
        source = f"val of {args.shards}"
    else:
        tokens = synthetic_stream(args.tokens, args.vocab, args.repeat, args.seed)
        source = f"synthetic (repeat {args.repeat})"
    targets = tokens.size - 1
    began, cpu_began = time.perf_counter(), time.process_time()
    _, has_hint = stream_hints(tokens, args.order, args.threshold)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    result = {"source": source, "targets": targets, "order": args.order, "threshold": args.threshold,
              "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
              "tokens_per_s": round(targets / seconds, 1),
              "projected_challenge_seconds": round(CHALLENGE_TARGETS * seconds / targets, 2),
              "gated": int(has_hint.sum()), "gated_fraction": float(has_hint.mean())}
    if args.loop_tokens:
        prefix = tokens[:args.loop_tokens + 1]
        began = time.perf_counter()
        gated = dict_hints(prefix.tolist(), args.order, args.threshold)
        loop_s = time.perf_counter() - began
        assert gated == int(stream_hints(prefix, args.order, args.threshold)[1].sum())
        result.update(loop_targets=prefix.size - 1, loop_tokens_per_s=round((prefix.size - 1) / loop_s, 1),
                      loop_projected_challenge_seconds=round(CHALLENGE_TARGETS * loop_s / (prefix.size - 1), 1))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| pass | targets | tokens/s | projected s for {CHALLENGE_TARGETS:,} | gated |")
    print("|---|---|---|---|---|")
    print(f"| vectorised (sort) | {targets:,} | {result['tokens_per_s']:,.0f} | "
          f"{result['projected_challenge_seconds']:,.1f} | {result['gated_fraction']:.2%} |")
    if args.loop_tokens:
        print(f"| dict loop | {result['loop_targets']:,} | {result['loop_tokens_per_s']:,.0f} | "
              f"{result['loop_projected_challenge_seconds']:,.1f} | |")


if __name__ == "__main__":
    main()
