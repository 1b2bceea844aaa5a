"""Time causal GQA attention (forward + backward) under each SDPA backend.

Default shape is the record's per-GPU micro-batch: 48 × 2048 tokens, 8 query
heads sharing 4 KV heads, head_dim 64, bf16. For every backend it times the
native GQA call (``enable_gqa=True``) and the expanded-KV call
(``repeat_interleave`` first), and checks both against the math backend, so
``pgolf.model.attention.EXPAND_KV_BACKENDS`` can be set from evidence.

    python -m bench.attention [--batch 48 --seq 2048 --iters 20]   (from the repo root)
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention(q, k, v, backend: SDPBackend | None, expand_kv: bool) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if expand_kv:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    backends = [backend] if backend is not None else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand_kv)


def time_fwd_bwd(fn, inputs, grad_out, warmup: int, iters: int) -> float:
    """Median milliseconds of forward + backward."""
    for _ in range(warmup):
        torch.autograd.grad(fn(*inputs), inputs, grad_out)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(*inputs), inputs, grad_out)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.attention needs CUDA: no GPU is visible, nothing to time.")

    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(heads):
        return torch.randn(args.batch, heads, args.seq, args.head_dim, device="cuda",
                           dtype=torch.bfloat16, generator=g).requires_grad_()

    q, k, v = rand(args.heads), rand(args.kv_heads), rand(args.kv_heads)
    grad_out = torch.randn_like(q)
    # Reference on a slice (the math backend materialises the T×T scores).
    ref_slice = (slice(0, 2),)
    with torch.no_grad():
        reference = attention(q[ref_slice], k[ref_slice], v[ref_slice], None, expand_kv=True).float()

    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print(f"shape: batch {args.batch} × seq {args.seq}, {args.heads} q / {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, bf16, causal, forward+backward")
    for name, backend in BACKENDS.items():
        for expand_kv in (False, True):
            label = f"{name:9s} {'expanded KV' if expand_kv else 'native GQA ':11s}"
            try:
                with torch.no_grad():
                    out = attention(q[ref_slice], k[ref_slice], v[ref_slice], backend, expand_kv)
                err = (out.float() - reference).abs().max().item()
                ms = time_fwd_bwd(lambda a, b, c: attention(a, b, c, backend, expand_kv),
                                  (q, k, v), grad_out, args.warmup, args.iters)
                print(f"{label} {ms:8.2f} ms   max|Δ| vs math {err:.2e}")
            except RuntimeError as exc:
                print(f"{label}   unsupported: {str(exc).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()
