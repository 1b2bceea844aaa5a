"""Which compressor stores a quantised artifact smallest: the same tensors, re-encoded.

Reads a ``.ptz`` (pgolf/quant/artifact.py), re-encodes exactly its tensors, model
config and meta with each compressor/level, and prints one row per setting:
file bytes, bytes relative to the order-0 entropy estimate of the codes
(pgolf/quant/bit_allocation.py: Σ per-tensor entropy of the integers + scale bytes +
passthrough bytes) and encode seconds. Also written as JSON.

    python bench/compressors.py artifacts/quant/model.ptz --out compressors.json
    python bench/compressors.py model.ptz --settings lzma:9 zstd:22 zstd:19

The entropy column tells how much of the artifact is the codes' information
and how much is compressor overhead. ``--one-stream`` adds, per setting, the
size of the same arrays laid out as format version 1 did (all integers, then
all scales, then passthrough data) and compressed as one stream instead of a
frame per tensor: the comparison behind version 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.quant.artifact import compress_bytes, encode, read_artifact, stored_arrays_bytes  # noqa: E402
from pgolf.quant.bit_allocation import estimated_bytes  # noqa: E402
from pgolf.submission.export import bits_histogram  # noqa: E402

DEFAULT_SETTINGS = ("lzma:6", "lzma:9", "zstd:19", "zstd:22")


def parse_setting(text: str) -> tuple[str, int]:
    name, _, level = text.partition(":")
    if name not in ("lzma", "zstd") or not level.isdigit():
        raise SystemExit(f"--settings: {text!r} is not compressor:level (lzma:0..9 or zstd:1..22)")
    return name, int(level)


def one_stream_bytes(tensors, compressor: str, level: int) -> int:
    """The arrays grouped like with like (codes, scales, raw) and compressed as one stream."""
    quantized = [t for t in tensors if t.quantized]
    data = b"".join([*(t.q.numpy().tobytes() for t in quantized), *(t.scale.numpy().tobytes() for t in quantized),
                     *(stored_arrays_bytes(t) for t in tensors if not t.quantized)])
    return len(compress_bytes(data, compressor, level))


def compare(path: Path, settings: list[tuple[str, int]], one_stream: bool = False) -> dict:
    artifact = read_artifact(path)
    estimate = sum(estimated_bytes(t) for t in artifact.tensors)
    rows = []
    for name, level in settings:
        began = time.perf_counter()
        size = len(encode(artifact.tensors, artifact.model_config, artifact.meta, name, level))
        rows.append({"compressor": name, "level": level, "bytes": size, "vs_entropy": size / estimate,
                     "seconds": round(time.perf_counter() - began, 2)})
        if one_stream:
            rows[-1]["one_stream_bytes"] = one_stream_bytes(artifact.tensors, name, level)
    return {"artifact": str(path), "file_bytes": path.stat().st_size, "entropy_estimate_bytes": round(estimate),
            "quantized_tensors": bits_histogram(artifact.tensors), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="compressor:level ...")
    ap.add_argument("--one-stream", action="store_true", help="also size version 1's single-stream layout")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    result = compare(args.artifact, [parse_setting(s) for s in args.settings], args.one_stream)
    print(f"{result['artifact']}: {result['file_bytes']:,} bytes; entropy estimate "
          f"{result['entropy_estimate_bytes']:,}; quantised tensors {result['quantized_tensors']}")
    print("| compressor | bytes | / entropy | seconds | one stream (v1) |\n|---|---|---|---|---|")
    for r in result["rows"]:
        stream = f"{r['one_stream_bytes']:,}" if "one_stream_bytes" in r else "-"
        print(f"| {r['compressor']}-{r['level']} | {r['bytes']:,} | {r['vs_entropy']:.4f} | {r['seconds']} | {stream} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
