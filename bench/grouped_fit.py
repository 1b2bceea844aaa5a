"""The grouped layout's byte fit: encode, fit probe, pruning probe and prune_to_target, before vs after.

``before``: the encode every probe used to do (pgolf/quant/grouped.py with
its frames compressed one after another, row orders by content, remembered
by pgolf/quant/compression.py's chain cache) and the exact-only pruning
search; ``after``: the quantize stage's EncodeCache (pgolf/quant/encode_cache.py:
the same bytes, frames on threads and remembered by their raw stream) and
the pruning search placed by its cheap estimate. On an F1855-shaped
quantised state (bench/compression_groups.py's ``synthetic_tensors``) or a
``.ptz``'s own tensors it times, per path:

- ``full_encode``: one encode from cold (no chain or frame cached);
- ``fit_probe``: the encode after one mlp.fc matrix is demoted a bit
  (its integers halved), as a fit round does;
- ``prune_probe``: the encode after the cheapest 1 % of the ±1 entries are zeroed;
- ``estimate_s`` (after only): one pruning probe's cheap estimate;
- ``prune``: :func:`pgolf.quant.pruning.prune_to_target` to ``--target-drop``
  (2 %) below the unpruned size, with its exact probes, count and size.

Then checks: the unpruned blobs and the pruned answer's blobs are the same
bytes both ways, the answer equals a fresh ``artifact.encode`` byte for byte,
decodes to the chosen integers and is within the target, and one entry fewer
misses it. And the greedy L1 chain's seconds per sorted shape (on the GPU
when there is one).

    python bench/grouped_fit.py --layers 2 --vocab 2048        # this 2-core machine
    python bench/grouped_fit.py --no-before-prune --out grouped_fit.json   # full F1855 size (the GPU box)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

from bench.compression_groups import synthetic_tensors  # noqa: E402  (one builder of the synthetic state)
from pgolf.quant import compression  # noqa: E402
from pgolf.quant.artifact import decode, encode, read_artifact  # noqa: E402
from pgolf.quant.encode_cache import EncodeCache  # noqa: E402
from pgolf.quant.grouped import Packing, compress_frames, l1_row_order  # noqa: E402
from pgolf.quant.pruning import _zero_cheapest, prune_order, prune_to_target  # noqa: E402
from pgolf.quant.roles import SORTED_ROLES, role_grouping, role_of  # noqa: E402

OLD_PACKING = Packing(l1_row_order, functools.partial(compress_frames, threads=1))


def demote_one(tensors: list) -> list:
    """``tensors`` with the first mlp.fc matrix a bit narrower (integers halved, scales doubled)."""
    i = next(i for i, t in enumerate(tensors) if t.name.endswith("mlp.fc.weight"))
    t = tensors[i]
    out = list(tensors)
    out[i] = dataclasses.replace(t, bits=t.bits - 1, q=torch.round(t.q.float() / 2).to(torch.int8),
                                 scale=(t.scale.float() * 2).to(t.scale.dtype))
    return out


def measure_path(name: str, tensors: list, target_drop: float, cfg, prune: bool = True) -> tuple[dict, dict]:
    """(timings, what the checks need) of one path."""
    compression._CHAINS.clear()
    if name == "before":
        def size(ts):
            return encode(ts, {}, {}, cfg.compressor, cfg.compression_level, grouping=role_grouping(),
                          packing=OLD_PACKING)
        cache = None
    else:
        cache = EncodeCache({}, {}, cfg)
        size = cache.encode
    blob, full_s = timed(lambda: size(tensors), digits=2)
    _, fit_s = timed(lambda: size(demote_one(tensors)), digits=2)
    owner, flat = prune_order(tensors)
    probe = _zero_cheapest(tensors, owner, flat, owner.numel() // 100)
    _, probe_s = timed(lambda: size(probe), digits=2)
    estimate = None if cache is None else cache.grouped.estimate
    estimate_s = None if cache is None else timed(lambda: estimate(probe), digits=2)[1]
    target = int(len(blob) * (1 - target_drop))
    row = {"full_encode_s": full_s, "fit_probe_s": fit_s, "prune_probe_s": probe_s, "estimate_s": estimate_s,
           "bytes": len(blob), "target_bytes": target}
    outcome = None
    if prune:
        outcome, row["prune_s"] = timed(lambda: prune_to_target(tensors, target, lambda ts: len(size(ts)), estimate),
                                       digits=2)
        row.update(prune_probes=outcome.probes, pruned=outcome.pruned, candidates=outcome.candidates,
                   pruned_bytes=outcome.size_bytes, fits=outcome.fits)
    if cache is not None:
        row["frames_compressed"] = cache.grouped.compressed
    return row, {"blob": blob, "outcome": outcome, "encode": size}


def chain_seconds(tensors: list) -> dict[str, float]:
    """Seconds of one greedy L1 chain per sorted matrix shape (device: the GPU if there is one)."""
    out = {}
    for t in tensors:
        shape = "x".join(map(str, t.shape))
        if t.quantized and role_of(t.name) in SORTED_ROLES and shape not in out:
            out[shape] = timed(lambda: compression.l1_chain(t.q), digits=2)[1]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, help="a .ptz whose tensors to use (default: synthetic)")
    ap.add_argument("--layers", type=int, default=11, help="synthetic: layers (11 = F1855)")
    ap.add_argument("--vocab", type=int, default=8192, help="synthetic: tok_emb rows (8192 = F1855)")
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--level", type=int, default=22)
    ap.add_argument("--target-drop", type=float, default=0.02, help="prune target below the unpruned size")
    ap.add_argument("--no-before-prune", action="store_true",
                    help="skip the before path's prune_to_target (tens of its probes at full size)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    tensors = (read_artifact(args.artifact).tensors if args.artifact
               else synthetic_tensors(args.layers, args.vocab))
    cfg = SimpleNamespace(compression="grouped", compressor=args.compressor, compression_level=args.level)
    before, old = measure_path("before", tensors, args.target_drop, cfg, prune=not args.no_before_prune)
    after, new = measure_path("after", tensors, args.target_drop, cfg)
    chosen = new["outcome"].tensors
    final = new["encode"](chosen)
    decoded = decode(final).tensors
    owner, flat = prune_order(tensors)
    fewer = _zero_cheapest(tensors, owner, flat, new["outcome"].pruned - 1)
    checks = {"unpruned_blob_identical": old["blob"] == new["blob"],
              "pruned_blob_identical": None if old["outcome"] is None else (
                  old["encode"](old["outcome"].tensors) == new["encode"](old["outcome"].tensors)),
              "final_equals_fresh_encode": final == encode(chosen, {}, {}, args.compressor, args.level,
                                                           grouping=role_grouping()),
              "final_within_target": len(final) <= after["target_bytes"],
              "one_fewer_misses": len(new["encode"](fewer)) > after["target_bytes"],
              "final_round_trips": all(torch.equal(a.q, b.q) for a, b in zip(chosen, decoded) if a.quantized)}
    result = {"source": str(args.artifact) if args.artifact else f"synthetic f1855 shape, {args.layers} layers, "
              f"vocab {args.vocab}", "compressor": f"{args.compressor}-{args.level}",
              "threads": torch.get_num_threads(), "before": before,
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "after": after,
              "checks": checks,
              "chain_s": chain_seconds(tensors)}
    print(f"{'':<14} {'full encode s':>13} {'fit probe s':>11} {'prune probe s':>13} {'prune s':>8} "
          f"{'probes':>6} {'pruned':>9} {'bytes':>11}")
    for name in ("before", "after"):
        r = {"prune_s": "-", "prune_probes": "-", "pruned": "-", "pruned_bytes": "-", **result[name]}
        print(f"{name:<14} {r['full_encode_s']:>13} {r['fit_probe_s']:>11} {r['prune_probe_s']:>13} "
              f"{r['prune_s']:>8} {r['prune_probes']:>6} {r['pruned']:>9} {r['pruned_bytes']:>11}")
    print("checks", checks, "chain seconds", result["chain_s"])
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
