"""Which compressor stores a quantised artifact smallest: the same tensors, re-encoded.

Reads a ``.ptz`` (pgolf/artifact.py), re-encodes exactly its tensors, model
config and meta with each compressor/level, and prints one row per setting:
file bytes, bytes relative to the order-0 entropy estimate of the codes
(pgolf/bit_allocation.py: Σ per-tensor entropy of the integers + scale bytes +
passthrough bytes) and encode seconds. Also written as JSON.

    python bench/compressors.py artifacts/quant/model.ptz --out compressors.json
    python bench/compressors.py model.ptz --settings lzma:9 zstd:22 zstd:19

The entropy column tells how much of the artifact is the codes' information
and how much is compressor overhead; ``quantize.fit_to_limit`` predicts sizes
from that estimate, so a compressor that tracks it closely also fits in fewer
rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.artifact import encode, read_artifact  # noqa: E402
from pgolf.bit_allocation import estimated_bytes  # noqa: E402
from pgolf.export import bits_histogram  # noqa: E402

DEFAULT_SETTINGS = ("lzma:6", "lzma:9", "zstd:19", "zstd:22")


def parse_setting(text: str) -> tuple[str, int]:
    name, _, level = text.partition(":")
    if name not in ("lzma", "zstd") or not level.isdigit():
        raise SystemExit(f"--settings: {text!r} is not compressor:level (lzma:0..9 or zstd:1..22)")
    return name, int(level)


def compare(path: Path, settings: list[tuple[str, int]]) -> dict:
    artifact = read_artifact(path)
    estimate = sum(estimated_bytes(t) for t in artifact.tensors)
    rows = []
    for name, level in settings:
        began = time.perf_counter()
        size = len(encode(artifact.tensors, artifact.model_config, artifact.meta, name, level))
        rows.append({"compressor": name, "level": level, "bytes": size, "vs_entropy": size / estimate,
                     "seconds": round(time.perf_counter() - began, 2)})
    return {"artifact": str(path), "file_bytes": path.stat().st_size, "entropy_estimate_bytes": round(estimate),
            "quantized_tensors": bits_histogram(artifact.tensors), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="compressor:level ...")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    result = compare(args.artifact, [parse_setting(s) for s in args.settings])
    print(f"{result['artifact']}: {result['file_bytes']:,} bytes; entropy estimate "
          f"{result['entropy_estimate_bytes']:,}; quantised tensors {result['quantized_tensors']}")
    print("| compressor | bytes | / entropy | seconds |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['compressor']}-{r['level']} | {r['bytes']:,} | {r['vs_entropy']:.4f} | {r['seconds']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
