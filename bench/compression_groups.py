"""Bytes per compressor per role group: plain vs grouped, with and without transpose and L1 row order.

Reads a ``.ptz`` (any format, pgolf/quant/artifact.py), or builds a synthetic
F1855-shaped quantised state (``--synthetic``: tok_emb 8192×512 and 11 layers
of c_q 512×512, c_k/c_v 256×512, proj 512×512, fc 2048×512, mlp.proj 512×2048,
int6 codes with row scale 12.85·σ_row/31 from Gaussian rows whose widths vary
by row; no learned structure, so the L1 order has nothing to find there).

For each role group (pgolf/quant/roles.py) and compressor it prints the bytes of
the group's integer codes laid out four ways:

- ``per_tensor``: each matrix's codes compressed alone (today's format 2 frames
  hold codes + scales per tensor; here codes only, for a like-for-like column);
- ``concat``: the group's matrices concatenated, row-major;
- ``transposed``: concatenated, each matrix transposed;
- ``l1_transposed``: rows in greedy L1 order, then transposed (+ the uint16
  permutation, ``perm_bytes`` raw, counted in the remainder in the file).

Then whole files: today's format 2 encode (zstd/lzma at the artifact's levels)
and the grouped format 3 encode (F1855's sorted roles) per compressor, with
their encode and decode seconds, and the L1 ordering's seconds per group.
Compressors: zstd (22, long window), lzma (9 extreme), and brotli-11 / zpaq-5
when their packages import (``pip install brotli zpaq``).

    python bench/compression_groups.py artifacts/quant/model.ptz --out groups.json
    python bench/compression_groups.py --synthetic --out groups.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

from pgolf.quant.artifact import StoredTensor, decode, encode, read_artifact  # noqa: E402
from pgolf.quant.compression import ALL_COMPRESSORS, available, compress, l1_chain  # noqa: E402
from pgolf.quant.roles import GROUP_ROLES, role_grouping, role_of  # noqa: E402

LEVELS = {"zstd": 22, "lzma": 9, "brotli": 11, "zpaq": 5}
F1855_SHAPES = {"attn.c_q": (512, 512), "attn.c_k": (256, 512), "attn.c_v": (256, 512), "attn.proj": (512, 512),
                "mlp.fc": (2048, 512), "mlp.proj": (512, 2048)}


def synthetic_tensors(layers: int = 11, vocab: int = 8192, seed: int = 0) -> list[StoredTensor]:
    """The module docstring's F1855-shaped int6 state (int7 tok_emb, as F1855 stores it)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"tok_emb.weight": (vocab, 512)}
    shapes.update({f"blocks.{i}.{m}.weight": s for i in range(layers) for m, s in F1855_SHAPES.items()})
    out = []
    for name, (rows, cols) in sorted(shapes.items()):
        qmax = 63 if name == "tok_emb.weight" else 31
        width = torch.exp(0.3 * torch.randn(rows, 1, generator=g))
        w = torch.randn(rows, cols, generator=g) * width
        s = (12.85 * w.std(dim=1) / qmax).to(torch.float16)
        q = torch.clamp(torch.round(w / s.float().unsqueeze(1)), -qmax, qmax).to(torch.int8)
        out.append(StoredTensor(name, (rows, cols), "float32", "gptq", 7 if qmax == 63 else 6, q, s))
    return out


def group_layouts(members: list[StoredTensor]) -> tuple[dict[str, bytes], int, float]:
    """The four layouts' bytes of one group's codes, its permutation bytes and the L1 ordering seconds."""
    began = time.perf_counter()
    perms = [l1_chain(t.q).numpy() for t in members]
    chain_s = time.perf_counter() - began
    qs = [t.q.numpy() for t in members]
    return ({"concat": b"".join(q.tobytes() for q in qs),
             "transposed": b"".join(np.ascontiguousarray(q.T).tobytes() for q in qs),
             "l1_transposed": b"".join(np.ascontiguousarray(q[p].T).tobytes() for q, p in zip(qs, perms))},
            2 * sum(len(p) for p in perms), chain_s)


def measure(tensors: list[StoredTensor], compressors: list[str], model_config: dict, meta: dict) -> dict:
    groups: dict[str, dict] = {}
    for role in GROUP_ROLES:
        members = [t for t in tensors if t.quantized and len(t.shape) == 2 and role_of(t.name) == role]
        if not members:
            continue
        layouts, perm_bytes, chain_s = group_layouts(members)
        row = {"tensors": len(members), "values": sum(t.q.numel() for t in members), "perm_bytes": perm_bytes,
               "l1_seconds": round(chain_s, 2), "bytes": {}}
        for c in compressors:
            per = {"per_tensor": sum(len(compress(t.q.numpy().tobytes(), c, LEVELS[c])) for t in members)}
            per.update({k: len(compress(v, c, LEVELS[c])) for k, v in layouts.items()})
            row["bytes"][c] = per
        groups[role] = row
    files = {}
    for c in ("zstd", "lzma"):
        blob, enc = timed(lambda: encode(tensors, model_config, meta, c, LEVELS[c]))
        _, dec = timed(lambda: decode(blob))
        files[f"plain/{c}"] = {"bytes": len(blob), "encode_s": round(enc, 1), "decode_s": round(dec, 1)}
    for c in compressors:
        blob, enc = timed(lambda: encode(tensors, model_config, meta, c, LEVELS[c], grouping=role_grouping()))
        art, dec = timed(lambda: decode(blob))
        files[f"grouped/{c}"] = {"bytes": len(blob), "encode_s": round(enc, 1), "decode_s": round(dec, 1),
                                 "frames": {f["frame"]: f["bytes"] for f in art.frames}}
    return {"groups": groups, "files": files, "compressors": compressors,
            "codes": sum(t.q.numel() for t in tensors if t.quantized)}


def print_tables(result: dict) -> None:
    print(f"{'group':<10} {'values':>10} {'compressor':<7} {'per_tensor':>11} {'concat':>11} {'transposed':>11} "
          f"{'l1_transp':>11} {'perm':>7} {'l1 s':>6}")
    for role, row in result["groups"].items():
        for c, b in row["bytes"].items():
            print(f"{role:<10} {row['values']:>10,} {c:<7} {b['per_tensor']:>11,} {b['concat']:>11,} "
                  f"{b['transposed']:>11,} {b['l1_transposed']:>11,} {row['perm_bytes']:>7,} {row['l1_seconds']:>6}")
    totals = {c: {k: sum(r["bytes"][c][k] for r in result["groups"].values())
                  for k in ("per_tensor", "concat", "transposed", "l1_transposed")} for c in result["compressors"]}
    for c, t in totals.items():
        print(f"{'all codes':<10} {result['codes']:>10,} {c:<7} {t['per_tensor']:>11,} {t['concat']:>11,} "
              f"{t['transposed']:>11,} {t['l1_transposed']:>11,}")
    print(f"\n{'file':<16} {'bytes':>12} {'encode s':>9} {'decode s':>9}")
    for name, f in result["files"].items():
        print(f"{name:<16} {f['bytes']:>12,} {f['encode_s']:>9} {f['decode_s']:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="a .ptz (omit with --synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="an F1855-shaped synthetic int6/int7 state")
    ap.add_argument("--layers", type=int, default=11, help="--synthetic: layers (11 = F1855)")
    ap.add_argument("--vocab", type=int, default=8192, help="--synthetic: tok_emb rows (8192 = F1855)")
    ap.add_argument("--compressors", nargs="+", default=[c for c in ALL_COMPRESSORS if available(c)])
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.synthetic == (args.artifact is not None):
        raise SystemExit("error: give an artifact path or --synthetic (not both)")
    missing = [c for c in args.compressors if c not in ALL_COMPRESSORS or not available(c)]
    if missing:
        raise SystemExit(f"error: --compressors: {missing} unknown or not installed")
    if args.synthetic:
        tensors, model_config, meta, source = synthetic_tensors(args.layers, args.vocab), {}, {}, (
            f"synthetic f1855 shape, {args.layers} layers, vocab {args.vocab}")
    else:
        art = read_artifact(args.artifact)
        tensors, model_config, meta, source = art.tensors, art.model_config, art.meta, str(args.artifact)
    result = {"source": source, **measure(tensors, args.compressors, model_config, meta)}
    print_tables(result)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
