"""Time causal GQA attention (forward + backward) under each SDPA backend.

Default shape is the record's per-GPU micro-batch: 48 × 2048 tokens, 8 query
heads sharing 4 KV heads, head_dim 64, bf16. For every backend it times the
native GQA call (``enable_gqa=True``) and the expanded-KV call
(``repeat_interleave`` first), and checks both against the math backend, so
``pgolf.model.attention.EXPAND_KV_BACKENDS`` can be set from evidence. With
the flash-attn-4 package installed it also times ``fa4`` (pgolf's custom-op
wrapper, pgolf/model/fa4_attention.py; native GQA only) and checks its
gradients against the math backend's.

    python -m bench.attention [--batch 48 --seq 2048 --iters 20]   (from the repo root)
"""
from __future__ import annotations

import argparse
import sys

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.model import fa4_attention  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention(q, k, v, backend: SDPBackend | str | None, expand_kv: bool) -> torch.Tensor:
    if backend == "fa4":
        return fa4_attention.fa4_causal_attention(q, k, v)
    group = q.shape[1] // k.shape[1]
    if expand_kv:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    backends = [backend] if backend is not None else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand_kv)


def median_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_fwd_bwd(fn, inputs, grad_out, warmup: int, iters: int) -> float:
    """Median milliseconds of forward + backward."""
    return median_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out), warmup, iters)


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
    ref_inputs = [t[ref_slice].detach().float().requires_grad_() for t in (q, k, v)]
    reference = attention(*ref_inputs, None, expand_kv=True)
    ref_grads = torch.autograd.grad(reference, ref_inputs, grad_out[ref_slice].float())

    def errors(backend, expand_kv) -> str:
        """Max |Δ| of the output and of dq, dk, dv against the fp32 math backend, on the slice."""
        inputs = [t[ref_slice].detach().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, backend, expand_kv)
        grads = torch.autograd.grad(out, inputs, grad_out[ref_slice])
        deltas = [(a.float() - b).abs().max().item() for a, b in zip((out, *grads), (reference, *ref_grads))]
        return "max|Δ| vs fp32 math: out {:.1e} dq {:.1e} dk {:.1e} dv {:.1e}".format(*deltas)

    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print(f"shape: batch {args.batch} × seq {args.seq}, {args.heads} q / {args.kv_heads} kv heads, "
          f"head_dim {args.head_dim}, bf16, causal, forward+backward")
    cases = [(name, backend, expand_kv) for name, backend in BACKENDS.items() for expand_kv in (False, True)]
    if fa4_attention.available():
        cases.append(("fa4", "fa4", False))
    else:
        print("fa4: the flash-attn-4 package is not installed (pip install '.[fa4]')")
    for name, backend, expand_kv in cases:
        label = f"{name:9s} {'expanded KV' if expand_kv else 'native GQA ':11s}"
        try:
            err = errors(backend, expand_kv)
            ms = time_fwd_bwd(lambda a, b, c: attention(a, b, c, backend, expand_kv),
                              (q, k, v), grad_out, args.warmup, args.iters)
            with torch.no_grad():
                fwd_ms = median_ms(lambda: attention(q, k, v, backend, expand_kv), args.warmup, args.iters)
            print(f"{label} {ms:8.2f} ms fwd+bwd  {fwd_ms:6.2f} ms fwd   {err}")
        except (RuntimeError, AssertionError, ImportError) as exc:
            print(f"{label}   unsupported: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")


if __name__ == "__main__":
    main()
