"""Causal attention through FlashAttention-4's Hopper kernels (``model.attention_backend: fa4``).

The ``flash-attn-4`` package (Tri Dao's CuTe-DSL FlashAttention; its SM90 path
carries FA3's tile choices, the attention of the April records) is optional:
nothing imports this module unless the backend is chosen, and on CPU, in fp32
or with an explicit mask the caller keeps SDPA (pgolf/model/attention.py).

Its autograd function is opaque to ``torch.compile`` (a graph break per layer),
so the forward and backward are wrapped here as two custom ops with fake
(shape-only) implementations: the compiled step stays one graph and inductor
fuses around the calls as it does around cuDNN's.

Layout: FA4 takes [B, T, H, hd]; the caller's [B, H, T, hd] tensors are
transposed views of that layout, so the transposes are free. GQA is native
(KV heads H/KV times fewer, query head h reads KV head h // (H/KV)). The
forward also returns the per-row log-sum-exp (lse, fp32 [B, H, T]), which
the backward needs.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from pgolf.errors import ParamError


def available() -> bool:
    """True where the flash-attn-4 package can be imported (it needs a CUDA build of torch to run)."""
    return importlib.util.find_spec("flash_attn") is not None and \
        importlib.util.find_spec("flash_attn.cute") is not None


@functools.cache  # called by every forward and backward: look the package up once
def _interface():
    if not available():
        raise ParamError("model.attention_backend", "fa4 needs the flash-attn-4 package "
                         "(pip install '.[fa4]' on a CUDA machine); or choose cudnn")
    from flash_attn.cute import interface  # optional dependency: imported at the first call
    return interface


@torch.library.custom_op("pgolf::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention, q [B, T, H, hd], k/v [B, T, KV, hd] → (out [B, T, H, hd], lse fp32 [B, H, T])."""
    out, lse, *_ = _interface()._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(),
                                                softmax_scale=scale, causal=True, return_lse=True)
    return out, lse


@fa4_forward.register_fake
def _(q, k, v, scale):
    b, t, h, _ = q.shape
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("pgolf::fa4_backward", mutates_args=())
def fa4_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`fa4_forward` for the output gradient ``grad_out``."""
    dq, dk, dv = _interface()._flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                                              grad_out.contiguous(), lse.contiguous(), scale, True)[:3]
    return dq, dk, dv


@fa4_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_backward(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's causal result for q [B, H, T, hd] and k, v [B, KV, T, hd] (bf16/fp16 on CUDA), as [B, H, T, hd]."""
    scale = q.shape[-1] ** -0.5
    out, _ = fa4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out.transpose(1, 2)
