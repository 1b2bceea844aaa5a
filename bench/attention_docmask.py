"""Time document-local causal attention (forward + backward) by each candidate GPU path.

Shape defaults to the record's per-GPU micro-batch: 48 rows × 2048 tokens, 8
query heads sharing 4 KV heads, head_dim 64, bf16. Rows are packed from
documents whose lengths are drawn from an exponential distribution (mean
``--mean-doc-tokens``; FineWeb documents average roughly 1,000-1,500 sp8192
tokens), each starting with BOS, as ``pgolf.model.doc_attention`` sees them.

Candidates (every masked one is checked against the dense-mask math result):

* ``causal_cudnn`` / ``causal_flash``: plain causal SDPA, NOT document-masked
  (the cost of today's attention, the floor to compare with);
* ``dense_mask_sdpa``: explicit boolean [B, 1, T, T] mask through SDPA
  (PyTorch picks the kernel; the ``dense`` implementation);
* ``dense_mask_efficient``: the same mask forced onto the memory-efficient kernel;
* ``flex``: FlexAttention (compiled) with the document block mask, the
  ``flex`` implementation; its block-mask build time is reported separately
  (it runs once per forward, shared by all layers);
* ``flex_packed``: the same tokens as ONE packed row per GPU (``train.packed_rows``,
  F1855's layout), documents cut into segments of ≤ ``--packed-cap`` tokens.

Block-mask build, ms per forward: ``pairwise`` is ``create_block_mask``
evaluating every (query, key) pair (the builder before the segment-range
one; skipped for the packed row, 98,304² pairs), ``segment_ranges`` is
``flex_document_mask`` as the model calls it, eager, and ``segment_ranges_compiled``
the same under ``torch.compile`` (as inside the compiled training step).

    python bench/attention_docmask.py [--batch 48 --seq 2048 --mean-doc-tokens 1200 --iters 20 --packed-cap 2048]

Prints one JSON object, then a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import time_fwd_bwd  # noqa: E402  (one timing loop for both attention benches)
from pgolf.model.doc_attention import (dense_document_mask, flex_document_mask,  # noqa: E402
                                       flex_document_mask_pairwise)

BOS = 1


def packed_ids(batch: int, seq: int, mean_doc: float, seed: int) -> torch.Tensor:
    """Rows cut from one stream of BOS-led documents with exponential lengths (≥ 2 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    n = batch * seq
    stream = torch.randint(2, 8192, (n,), generator=gen)
    pos = int(torch.randint(0, int(mean_doc), (1,), generator=gen))  # first row starts mid-document
    while pos < n:
        stream[pos] = BOS
        pos += max(2, int(torch.empty(1).exponential_(1.0 / mean_doc, generator=gen)))
    return stream.view(batch, seq)


def build_time(builder, ids: torch.Tensor, span=None, repeats: int = 10) -> float:
    """Mean ms of one block-mask build (after one untimed call: compilation, caches)."""
    builder(ids, BOS, span)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        builder(ids, BOS, span)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mean-doc-tokens", type=float, default=1200.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packed-cap", type=int, default=2048, help="segment cap of the packed-row case")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.attention_docmask needs CUDA: no GPU is visible, nothing to time.")
    dev, dt = torch.device("cuda"), torch.bfloat16
    b, t, h, kv, hd = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    ids = packed_ids(b, t, args.mean_doc_tokens, args.seed).to(dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    q = torch.randn(b, h, t, hd, device=dev, dtype=dt, generator=gen, requires_grad=True)
    k = torch.randn(b, kv, t, hd, device=dev, dtype=dt, generator=gen, requires_grad=True)
    v = torch.randn(b, kv, t, hd, device=dev, dtype=dt, generator=gen, requires_grad=True)
    grad_out = torch.randn(b, h, t, hd, device=dev, dtype=dt, generator=gen)
    dense = dense_document_mask(ids, BOS)
    packed = ids.view(1, b * t)
    cap = torch.tensor(args.packed_cap, device=dev)
    compiled_builder = torch.compile(flex_document_mask, dynamic=False)
    build_ms = {"rows": {"pairwise": build_time(flex_document_mask_pairwise, ids),
                         "segment_ranges": build_time(flex_document_mask, ids),
                         "segment_ranges_compiled": build_time(compiled_builder, ids)},
                "packed": {"pairwise": None,
                           "segment_ranges": build_time(flex_document_mask, packed, cap),
                           "segment_ranges_compiled": build_time(compiled_builder, packed, cap)}}
    block = flex_document_mask(ids, BOS)
    block_packed = flex_document_mask(packed, BOS, cap)
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    def as_packed(x):  # [B, heads, T, hd] → [1, heads, B·T, hd]: the same tokens as one row
        return x.transpose(0, 1).reshape(1, x.shape[1], b * t, x.shape[3])

    def sdpa(backends, mask, causal):
        def fn(q, k, v):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return fn

    candidates = {
        "causal_cudnn": (sdpa([SDPBackend.CUDNN_ATTENTION], None, True), False, False),
        "causal_flash": (sdpa([SDPBackend.FLASH_ATTENTION], None, True), False, False),
        "dense_mask_sdpa": (sdpa(None, dense, False), True, True),
        "dense_mask_efficient": (sdpa([SDPBackend.EFFICIENT_ATTENTION], dense, False), True, True),
        "flex": (lambda q, k, v: flex(q, k, v, block_mask=block, enable_gqa=True), True, True),
        "flex_packed": (lambda q, k, v: flex(as_packed(q), as_packed(k), as_packed(v), block_mask=block_packed,
                                             enable_gqa=True), True, False),  # its own mask: unchecked
    }
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense,
                                                   enable_gqa=True)
    rows = {}
    for name, (fn, masked, checked) in candidates.items():
        try:
            with torch.no_grad():
                err = (fn(q, k, v).float() - reference).abs().max().item() if checked else None
            ms = time_fwd_bwd(fn, (q, k, v), grad_out, args.warmup, args.iters)
            rows[name] = {"ms_fwd_bwd": ms, "doc_masked": masked, "max_abs_err_vs_math": err}
        except Exception as exc:  # a backend that rejects the shape/mask is a result too
            rows[name] = {"ms_fwd_bwd": None, "doc_masked": masked, "error": f"{type(exc).__name__}: {exc}"[:200]}
    docs_per_row = float((ids == BOS).sum(dim=1).float().mean())
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "shape": {"batch": b, "seq": t, "heads": h, "kv_heads": kv, "head_dim": hd},
              "mean_doc_tokens": args.mean_doc_tokens, "bos_per_row": docs_per_row,
              "packed_cap": args.packed_cap, "block_mask_build_ms": build_ms, "candidates": rows}
    print(json.dumps(result, indent=2))
    print(f"\n{'candidate':24s} {'ms fwd+bwd':>11s} {'doc-masked':>10s} {'max err':>9s}")
    for name, r in rows.items():
        ms = f"{r['ms_fwd_bwd']:.2f}" if r["ms_fwd_bwd"] is not None else "failed"
        err = f"{r['max_abs_err_vs_math']:.1e}" if r.get("max_abs_err_vs_math") is not None else "-"
        print(f"{name:24s} {ms:>11s} {str(r['doc_masked']):>10s} {err:>9s}")
    print("\nflex block-mask build, ms per forward (shared by all layers):")
    print(f"{'layout':8s} {'pairwise':>10s} {'segment_ranges':>15s} {'compiled':>9s}")
    for layout, r in build_ms.items():
        cells = [f"{r[key]:.2f}" if r[key] is not None else "-"
                 for key in ("pairwise", "segment_ranges", "segment_ranges_compiled")]
        print(f"{layout:8s} {cells[0]:>10s} {cells[1]:>15s} {cells[2]:>9s}")


if __name__ == "__main__":
    main()
