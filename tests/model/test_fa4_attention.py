"""model.attention_backend fa4: pgolf's custom-op wrapper of FlashAttention-4 (pgolf/model/fa4_attention.py).

On CPU the FA4 interface is replaced by a float64 math stand-in with FA4's calling convention
([B, T, H, hd] layout, lse [B, H, T], GQA), so the wrapper's layouts, scale, autograd wiring,
fake (compile-time) shapes and the missing-package error are tested without the package. The
gpu-marked tests at the end run the real kernels against the fp32 math backend.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from pgolf.errors import ParamError
from pgolf.model import fa4_attention
from pgolf.model.attention import sdpa_gqa

F64 = torch.float64


def expanded_causal_scores(q, k, v):
    """(scores with the causal mask, k and v repeated to q's heads) for [B, H, T, hd] inputs; query head h
    reads KV head h // (H/KV)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(
        torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores, k, v


def reference(q, k, v):
    """Causal GQA attention in [B, H, T, hd], written out."""
    scores, _, v = expanded_causal_scores(q, k, v)
    return torch.softmax(scores, dim=-1) @ v


def stand_in_interface():
    """FA4's two entry points as pgolf calls them, computed in float64 by :func:`reference`."""
    def forward(q, k, v, softmax_scale, causal, return_lse):
        assert causal and return_lse and softmax_scale == q.shape[-1] ** -0.5
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        lse = torch.logsumexp(expanded_causal_scores(qh, kh, vh)[0], dim=-1)  # [B, H, T]
        out = reference(qh, kh, vh).transpose(1, 2).contiguous()
        return out, lse.float(), None, None, None  # FA4's lse is fp32

    def backward(q, k, v, out, dout, lse, scale, causal):
        # the attention backward written out (custom ops run below autograd, so no autograd here):
        # P = exp(S − lse), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = s·dS K, dK = s·dSᵀ Q;
        # a KV head's gradient sums its query heads'
        qh, kh, vh, oh, doh = (t.transpose(1, 2) for t in (q, k, v, out, dout))
        assert scale == qh.shape[-1] ** -0.5
        scores, kr, vr = expanded_causal_scores(qh, kh, vh)
        group, t = qh.shape[1] // kh.shape[1], qh.shape[2]
        assert lse.dtype == torch.float32 and lse.shape == scores.shape[:-1]
        p = torch.softmax(scores, dim=-1)  # exp(S − lse) with lse recomputed in float64
        dv = p.transpose(-1, -2) @ doh
        ds = p * (doh @ vr.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
        dq = scale * ds @ kr
        dk = scale * ds.transpose(-1, -2) @ qh
        b, h, _, hd = dk.shape
        dk, dv = (g.reshape(b, h // group, group, t, hd).sum(2) for g in (dk, dv))
        return tuple(g.transpose(1, 2).contiguous() for g in (dq, dk, dv))

    return types.SimpleNamespace(_flash_attn_fwd=forward, _flash_attn_bwd=backward)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fa4_attention, "_interface", stand_in_interface)


def qkv(b=2, h=4, kv=2, t=12, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, t, hd, generator=g, dtype=F64).requires_grad_() for heads in (h, kv, kv)]


def test_the_wrapper_gives_causal_gqa_attention_and_its_gradients(stand_in):
    q, k, v = qkv()
    upstream = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = fa4_attention.fa4_causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the plain SDPA result (what every other backend computes)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               rtol=0, atol=1e-12)


def test_the_custom_ops_pass_torch_opcheck(stand_in):
    """Schema, fake-tensor shapes (what compile sees) against the real call, autograd registration."""
    q, k, v = (t.detach().transpose(1, 2).contiguous() for t in qkv())
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")  # AOT dispatch: the compile test
    torch.library.opcheck(fa4_attention.fa4_forward, tuple(t.clone().requires_grad_() for t in (q, k, v))
                          + (8 ** -0.5,), test_utils=utils)
    out, lse = fa4_attention.fa4_forward(q, k, v, 8 ** -0.5)
    torch.library.opcheck(fa4_attention.fa4_backward, (torch.ones_like(out), q, k, v, out, lse, 8 ** -0.5),
                          test_utils=utils)


def test_a_compiled_function_keeps_the_attention_in_one_graph(stand_in):
    """fullgraph=True fails on any graph break: the op is traced through its fake, not broken around."""
    q, k, v = qkv(seed=3)

    def layer(q, k, v):
        return (fa4_attention.fa4_causal_attention(q * 2.0, k, v) ** 2).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(layer(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_off_cuda_the_fa4_backend_is_plain_sdpa(monkeypatch):
    """CPU (and fp32/fp64) inputs never reach FA4: the result is PyTorch's SDPA, bit for bit."""
    monkeypatch.setattr(fa4_attention, "_interface", lambda: pytest.fail("FA4 called off CUDA"))
    q, k, v = qkv(seed=5)
    got = sdpa_gqa(q, k, v, "fa4", is_causal=True)
    want = sdpa_gqa(q, k, v, "auto", is_causal=True)
    assert torch.equal(got, want)


def test_without_the_package_the_error_names_the_key(monkeypatch):
    monkeypatch.setattr(fa4_attention, "available", lambda: False)
    with pytest.raises(ParamError, match=r"model.attention_backend: fa4 needs the flash-attn-4 package"):
        fa4_attention._interface.__wrapped__()  # the uncached lookup


def test_the_backend_is_a_valid_param():
    from tests.helpers import tiny_model_config
    cfg = tiny_model_config(attention_backend="fa4")
    assert cfg.attention_backend == "fa4"


# ------------------------------------------------------------------ the real kernels (CUDA + flash-attn-4)
needs_fa4 = pytest.mark.skipif(not fa4_attention.available(), reason="flash-attn-4 is not installed")


@pytest.mark.gpu
@needs_fa4
def test_fa4_is_as_close_to_fp32_math_as_cudnn_is():
    """Record shape per head (T 2048, hd 64, 8 q / 4 kv heads), two sequences: out, dq, dk, dv against the
    fp32 math backend. bf16 tolerance: within twice cuDNN's own error + 1e-3 (on an H200 cuDNN's max
    errors were 8.6e-3 out, 1.1e-2 dq, 2.0e-2 dk, 3.5e-2 dv; bench/attention.py)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 2048, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    upstream = torch.randn(2, 8, 2048, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_inputs, is_causal=True, enable_gqa=True)
    ref_all = (ref, *torch.autograd.grad(ref, ref_inputs, upstream.float()))

    def errors(backend):
        out = sdpa_gqa(q, k, v, backend, is_causal=True)
        got = (out, *torch.autograd.grad(out, (q, k, v), upstream))
        return [(a.float() - b).abs().max().item() for a, b in zip(got, ref_all)]

    for fa4_err, cudnn_err in zip(errors("fa4"), errors("cudnn")):
        assert fa4_err <= 2 * cudnn_err + 1e-3, (fa4_err, cudnn_err)


@pytest.mark.gpu
@needs_fa4
def test_fa4_custom_ops_pass_opcheck_on_cuda():
    """The fake shapes and dtypes (lse fp32 [B, H, T]) are FA4's real ones."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 256, h, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    torch.library.opcheck(fa4_attention.fa4_forward, (q, k, v, 0.125),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
