"""Causal self-attention whose weights are slices of the GPT's banks.

One layer's attention (docs/RECIPE.md §2.2): q, k, v projections → value embedding
added to v (chosen layers) → VRL mix of layer 0's value (layers ≥ 1) → RMSNorm
of q and k per head → partial RoPE → per-head q gain → causal SDPA with native
GQA → XSA (chosen layers) → output projection.

The projections are parameter-free :class:`BankLinear` modules called as
``module(x, weight)``: the weights live in the GPT's 3-D banks (Muon updates
them batched), while a forward-pre-hook on ``blocks.{i}.attn.c_q`` still sees
the exact input of that matmul (what GPTQ's Hessian collection needs).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf.model.rope import apply_partial_rope
# DocMask in annotations: pgolf.model.doc_attention's, not imported here (only when model.doc_attention);
# KVCache: pgolf.model.sampling's (only when sampling)

# fa4: FlashAttention-4's Hopper kernels (pgolf/model/fa4_attention.py, the optional flash-attn-4 package)
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa4")
DOC_ATTENTION_IMPLS = ("auto", "dense", "flex")  # model.doc_attention_impl (pgolf/model/doc_attention.py)

_SDPA_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    # KV-cache decoding steps: one query against a cache that grows every step.
    # "auto" picked cuDNN there at 52 ms/step (vs 14 with flash) for the record
    # model, 64 sequences, on an H200; math covers dtypes flash lacks (fp32).
    "decode": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}

# Backends whose kernels reject ``enable_gqa=True``: for these the KV heads are
# repeated to the query head count before the call (same result, more memory).
# Measured with bench/attention.py on an H200 (torch 2.11+cu130, cuDNN 9.19,
# 48×2048, 8/4 heads, fwd+bwd): cuDNN 2.31 ms native GQA (2.56 expanded),
# flash 3.68 (3.81), efficient: no native GQA kernel, 7.66 ms expanded.
EXPAND_KV_BACKENDS: frozenset[str] = frozenset({"efficient"})


# adapt(target, x) -> additive delta or None: a per-call hook for test-time adapters
# (pgolf.eval.lora); targets "q", "k", "v" here, "o", "mlp" in the block, "head" on the logits.
Adapt = Callable[[str, torch.Tensor], "torch.Tensor | None"]
# The model-wide form: adapters(slot, target, x), slot = visit index, HEAD_SLOT for "head".
Adapters = Callable[[int, str, torch.Tensor], "torch.Tensor | None"]
HEAD_SLOT = -1


def add_adapter(y: torch.Tensor, adapt: Adapt | None, target: str, x: torch.Tensor) -> torch.Tensor:
    """``y + adapt(target, x)``; ``y`` itself without an adapter (the default path is untouched)."""
    if adapt is None:
        return y
    delta = adapt(target, x)
    return y if delta is None else y + delta


class BankLinear(nn.Module):
    """``F.linear(x, weight)`` with the weight passed in: a named hook point, no parameters."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *,
             is_causal: bool, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA for q [B, H, T, hd] against k, v [B, KV, S, hd] with H a multiple of KV.

    Query head h reads KV head h // (H/KV) (the ``repeat_interleave`` grouping).
    ``backend`` picks the CUDA kernel for half-precision inputs (the bf16
    autocast of training and evaluation). PyTorch chooses instead on other
    devices (the CUDA kernels do not exist there: a GPU-trained checkpoint
    still evaluates on CPU), for fp32/fp64 inputs (flash and cuDNN are
    half-precision only) and with an explicit ``attn_mask`` (KV-cache prefill
    after a prefix), which flash and cuDNN reject.
    """
    group = q.shape[1] // k.shape[1]
    use_kernel = (backend != "auto" and q.device.type == "cuda" and attn_mask is None
                  and q.dtype in (torch.float16, torch.bfloat16))
    if use_kernel and backend == "fa4":  # the model's backend: full causal sequences (KV caches use "decode")
        from pgolf.model.fa4_attention import fa4_causal_attention  # only with model.attention_backend fa4
        return fa4_causal_attention(q, k, v)
    if use_kernel and group > 1 and backend in EXPAND_KV_BACKENDS:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    context = sdpa_kernel(_SDPA_BACKENDS[backend]) if use_kernel else contextlib.nullcontext()
    with context:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head output its component along its own token's value.

    y [B, H, T, hd], v [B, KV, T, hd]; ``y_h ← y_h − (y_h·v̂) v̂`` with v̂ the unit
    value of head h's KV group at the same position (docs/RECIPE.md §2.4).
    """
    b, h, t, hd = y.shape
    kv = v.shape[1]
    grouped = y.reshape(b, kv, h // kv, t, hd)
    unit_v = F.normalize(v, dim=-1).unsqueeze(2)
    grouped = grouped - (grouped * unit_v).sum(dim=-1, keepdim=True) * unit_v
    return grouped.reshape(b, h, t, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, *, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qk_norm: bool, qk_gain_init: float, use_xsa: bool, use_vrl_gate: bool,
                 backend: str, gate_window: int = 0, gate_scale: float = 0.5,
                 masked_attention: Callable | None = None):
        super().__init__()
        # pgolf.model.doc_attention.masked_attention with model.doc_attention (the caller imports it only then)
        self.masked_attention = masked_attention
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        self.qk_gain_init = qk_gain_init
        self.use_xsa = use_xsa
        self.backend = backend
        self.c_q = BankLinear()
        self.c_k = BankLinear()
        self.c_v = BankLinear()
        self.proj = BankLinear()
        self.q_gain = nn.Parameter(torch.empty(num_heads))
        # VRL gate σ(α) on layer 0's value; layer 0 has none (it would get no gradient).
        self.vrl_alpha = nn.Parameter(torch.empty(())) if use_vrl_gate else None
        # SparseAttnGate (pgolf.model.frontier_gates), zero-initialised.
        self.gate_scale = gate_scale
        self.attn_gate_w = nn.Parameter(torch.empty(num_heads, gate_window)) if gate_window else None
        if gate_window:  # imported only when on (pgolf/submission/optional.py)
            from pgolf.model.frontier_gates import sparse_attn_gate
            self.sparse_attn_gate = sparse_attn_gate

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.q_gain.fill_(self.qk_gain_init)
            if self.attn_gate_w is not None:
                self.attn_gate_w.zero_()
            if self.vrl_alpha is not None:
                self.vrl_alpha.zero_()

    def forward(self, x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                w_o: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                value_add: torch.Tensor | None = None, first_value: torch.Tensor | None = None,
                cache: KVCache | None = None, cache_slot: int | None = None,
                doc_mask: DocMask | None = None, adapt: Adapt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] (already normalised) → (output [B, T, D], value before VRL [B, T, KV·hd]).

        ``value_add`` is the value embedding for this layer; ``first_value`` is
        layer 0's returned value, mixed in when this layer has a VRL gate.
        ``cache_slot`` is this call's KV-cache entry (the visit index; the
        layer index by default); ``doc_mask`` makes attention document-local;
        ``adapt`` adds test-time adapter outputs to the q, k, v projections.
        """
        b, t, _ = x.shape
        q = add_adapter(self.c_q(x, w_q), adapt, "q", x).view(b, t, self.num_heads, self.head_dim)
        k = add_adapter(self.c_k(x, w_k), adapt, "k", x).view(b, t, self.num_kv_heads, self.head_dim)
        v = add_adapter(self.c_v(x, w_v), adapt, "v", x)
        if value_add is not None:
            v = v + value_add
        own_value = v
        if self.vrl_alpha is not None:
            if first_value is None:
                raise ValueError(f"layer {self.layer_idx} has a VRL gate but got no layer-0 value")
            v = v + torch.sigmoid(self.vrl_alpha).to(v.dtype) * first_value
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q = apply_partial_rope(q, *rope)
            k = apply_partial_rope(k, *rope)
        # Gain and casts in the projection's [B, T, heads, hd] layout; the
        # transposes are views (SDPA takes strided inputs). The casts to v's dtype
        # undo any upcast by the norms or fp32 tables under autocast.
        q = (q * self.q_gain.to(q.dtype)[None, None, :, None]).to(v.dtype).transpose(1, 2)
        k = k.to(v.dtype).transpose(1, 2)
        v = v.transpose(1, 2)
        own_v = v
        is_causal, mask = True, None
        if cache is not None:
            prefix = cache.length
            k, v = cache.append(self.layer_idx if cache_slot is None else cache_slot, k, v)
            if prefix > 0:
                is_causal = False
                if t > 1:
                    key_pos = torch.arange(prefix + t, device=x.device)
                    query_pos = prefix + torch.arange(t, device=x.device)
                    mask = key_pos[None, :] <= query_pos[:, None]
        # The training kernel is chosen for full sequences; cuDNN rejects decoding shapes.
        backend = self.backend if cache is None else "decode"
        if doc_mask is not None:
            if cache is not None:
                raise ValueError("document-local attention is not supported with a KV cache")
            y = self.masked_attention(q, k, v, doc_mask)
        else:
            y = sdpa_gqa(q, k, v, backend, is_causal=is_causal, attn_mask=mask)
        if self.use_xsa:
            y = exclude_self_value(y, own_v)
        if self.attn_gate_w is not None:
            y = self.sparse_attn_gate(y, x, self.attn_gate_w, self.gate_scale)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.proj(y, w_o), own_value
