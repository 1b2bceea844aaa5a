"""Model pieces against plain float64 references: XSA, partial RoPE, GQA attention,
SmearGate, BigramHash, value embedding wiring."""
from __future__ import annotations

import math

import pytest
import torch

from pgolf.model.attention import CausalSelfAttention, exclude_self_value, sdpa_gqa
from pgolf.model.embeddings import BigramHash, SmearGate, bigram_bucket_ids
from pgolf.model.rope import apply_partial_rope, rope_tables

F64 = torch.float64


def reference_gqa_attention(q, k, v, causal=True):
    """Explicit softmax attention; KV head j serves query heads j*g..(j+1)*g-1."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        t, s = q.shape[2], k.shape[2]
        allowed = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("backend", ["auto", "math"])
def test_gqa_attention_matches_float64_reference(heads, kv_heads, backend):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, 7, 8, generator=g, dtype=F64)
    k = torch.randn(2, kv_heads, 7, 8, generator=g, dtype=F64)
    v = torch.randn(2, kv_heads, 7, 8, generator=g, dtype=F64)
    got = sdpa_gqa(q, k, v, backend, is_causal=True)
    torch.testing.assert_close(got, reference_gqa_attention(q, k, v), rtol=0, atol=1e-12)


def test_masked_attention_after_prefix_matches_reference():
    # Prefill of 3 queries after a 4-token prefix: query i sees keys 0..4+i.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=F64)
    k = torch.randn(1, 2, 7, 8, generator=g, dtype=F64)
    v = torch.randn(1, 2, 7, 8, generator=g, dtype=F64)
    mask = torch.arange(7)[None, :] <= (4 + torch.arange(3))[:, None]
    got = sdpa_gqa(q, k, v, "auto", is_causal=False, attn_mask=mask)
    torch.testing.assert_close(got, reference_gqa_attention(q, k, v), rtol=0, atol=1e-12)


def test_xsa_removes_exactly_the_own_value_component():
    g = torch.Generator().manual_seed(2)
    heads, kv_heads = 6, 2
    y = torch.randn(2, heads, 5, 8, generator=g, dtype=F64)
    v = torch.randn(2, kv_heads, 5, 8, generator=g, dtype=F64)
    got = exclude_self_value(y, v)
    group = heads // kv_heads
    for h in range(heads):
        unit = v[:, h // group] / v[:, h // group].norm(dim=-1, keepdim=True)
        # No component left along the token's own value ...
        assert (got[:, h] * unit).sum(-1).abs().max() < 1e-12
        # ... and nothing else changed.
        expected = y[:, h] - (y[:, h] * unit).sum(-1, keepdim=True) * unit
        torch.testing.assert_close(got[:, h], expected, rtol=0, atol=1e-12)


def _attention_module(use_xsa, use_vrl_gate=False):
    return CausalSelfAttention(layer_idx=1, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                               qk_gain_init=1.5, use_xsa=use_xsa, use_vrl_gate=use_vrl_gate,
                               backend="auto").to(F64)


def test_xsa_in_attention_uses_the_value_after_ve_and_vrl():
    g = torch.Generator().manual_seed(3)
    d, kv = 32, 16
    x = torch.randn(2, 6, d, generator=g, dtype=F64)
    w_q, w_k, w_v = (torch.randn(rows, d, generator=g, dtype=F64) / 6 for rows in (d, kv, kv))
    eye = torch.eye(d, dtype=F64)  # W_o = I exposes the head outputs
    ve = torch.randn(2, 6, kv, generator=g, dtype=F64)
    v0 = torch.randn(2, 6, kv, generator=g, dtype=F64)
    outs = []
    for use_xsa in (False, True):
        attn = _attention_module(use_xsa, use_vrl_gate=True)
        attn.reset_parameters()
        with torch.no_grad():
            attn.vrl_alpha.fill_(0.3)
        outs.append(attn(x, w_q, w_k, w_v, eye, None, value_add=ve, first_value=v0)[0])
    plain, xsa = (o.view(2, 6, 4, 8) for o in outs)
    fed_v = (x @ w_v.T + ve + torch.sigmoid(torch.tensor(0.3, dtype=F64)) * v0).view(2, 6, 2, 8)
    unit = fed_v / fed_v.norm(dim=-1, keepdim=True)
    unit = unit.repeat_interleave(2, dim=2)
    expected = plain - (plain * unit).sum(-1, keepdim=True) * unit
    torch.testing.assert_close(xsa, expected, rtol=0, atol=1e-12)


def test_attention_module_matches_plain_reference():
    g = torch.Generator().manual_seed(4)
    d, kv, t = 32, 16, 6
    x = torch.randn(2, t, d, generator=g, dtype=F64)
    w_q, w_k, w_v, w_o = (torch.randn(rows, d, generator=g, dtype=F64) / 6 for rows in (d, kv, kv, d))
    attn = _attention_module(use_xsa=False)
    attn.reset_parameters()
    rope = rope_tables(torch.arange(t), 4, 100.0)
    got, _ = attn(x, w_q, w_k, w_v, w_o, rope)

    def heads(z, n):
        z = z.view(2, t, n, 8)
        z = z / z.pow(2).mean(-1, keepdim=True).add(torch.finfo(F64).eps).sqrt()
        cos, sin = (c.to(F64)[None, :, None, :] for c in rope)
        r1, r2 = z[..., :2], z[..., 2:4]
        z = torch.cat((r1 * cos - r2 * sin, r1 * sin + r2 * cos, z[..., 4:]), dim=-1)
        return z.transpose(1, 2)

    q = heads(x @ w_q.T, 4) * 1.5
    k = heads(x @ w_k.T, 2)
    v = (x @ w_v.T).view(2, t, 2, 8).transpose(1, 2)
    y = reference_gqa_attention(q, k, v).transpose(1, 2).reshape(2, t, d)
    torch.testing.assert_close(got, y @ w_o.T, rtol=0, atol=1e-10)


# --------------------------------------------------------------------- RoPE
def reference_rotation(x, positions, rope_dims, base):
    """Rotate each pair (i, i + rope_dims/2) by pos·base^(-2i/rope_dims), float64."""
    out = x.clone()
    half = rope_dims // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            theta = pos * base ** (-2.0 * i / rope_dims)
            a, b = x[:, t, :, i], x[:, t, :, i + half]
            out[:, t, :, i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, t, :, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


def test_partial_rope_matches_reference_and_leaves_other_dims():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 3, 16, generator=g, dtype=F64)
    positions = list(range(4, 13))
    got = apply_partial_rope(x, *rope_tables(torch.tensor(positions), 6, 500.0))
    assert torch.equal(got[..., 6:], x[..., 6:])
    # Tables are fp32 (as in training), so agreement is to fp32 angle precision.
    torch.testing.assert_close(got, reference_rotation(x, positions, 6, 500.0), rtol=0, atol=1e-5)


def test_partial_rope_scores_depend_only_on_position_difference():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64)

    def score(m, n):
        qm = apply_partial_rope(q, *rope_tables(torch.tensor([m]), 8, 10000.0))
        kn = apply_partial_rope(k, *rope_tables(torch.tensor([n]), 8, 10000.0))
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (40, 1), (17, 17)]:
        for shift in (1, 13, 200):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the difference


def test_zero_rope_dims_is_identity():
    x = torch.randn(1, 3, 2, 8, dtype=F64)
    assert torch.equal(apply_partial_rope(x, *rope_tables(torch.arange(3), 0, 10000.0)), x)


# --------------------------------------------------------------- SmearGate
def test_smear_gate_on_hand_made_input():
    smear = SmearGate(2).to(F64)
    with torch.no_grad():
        smear.gate.copy_(torch.tensor([0.0, math.log(3.0)], dtype=F64))  # g = 0.5, 0.75
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=F64)
    expected = torch.tensor([[[0.5, 0.5], [2.0, 2.5], [4.0, 4.5]]], dtype=F64)
    torch.testing.assert_close(smear(h), expected, rtol=0, atol=1e-12)
    # A continuation uses the given previous input instead of zeros.
    prev = torch.tensor([[10.0, 20.0]], dtype=F64)
    torch.testing.assert_close(smear(h[:, :1], prev), torch.tensor([[[5.5, 15.5]]], dtype=F64),
                               rtol=0, atol=1e-12)


# -------------------------------------------------------------- BigramHash
def _int32(x: int) -> int:
    """Two's-complement wrap of a Python int to int32."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def test_bigram_buckets_by_hand():
    ids = torch.tensor([[3, 1000, 17, 17]])
    got = bigram_bucket_ids(ids, 1536)
    expected = [
        1535,                                   # position 0: reserved bucket B-1
        (36313 * 1000 ^ 27191 * 3) % 1535,      # = 36313000 XOR 81573 mod 1535
        (36313 * 17 ^ 27191 * 1000) % 1535,
        (36313 * 17 ^ 27191 * 17) % 1535,
    ]
    assert expected == [1535, 419, 425, 1332]
    assert got.tolist() == [expected]
    assert got.dtype == torch.int64


def test_bigram_buckets_wrap_like_int32():
    # 36313·70000 overflows int32; the records' hash wraps, then takes a non-negative mod.
    ids = torch.tensor([[5, 70000]])
    product = _int32(_int32(36313 * 70000) ^ _int32(27191 * 5))
    assert product < 0
    assert bigram_bucket_ids(ids, 3072).tolist() == [[3071, product % 3071]]


def test_bigram_continuation_uses_previous_id():
    ids = torch.tensor([[8, 9, 10], [1, 2, 3]])
    full = bigram_bucket_ids(ids, 100)
    tail = bigram_bucket_ids(ids[:, 1:], 100, prev_ids=ids[:, 0])
    assert torch.equal(full[:, 1:], tail)
    assert bigram_bucket_ids(ids[:, :1], 100).tolist() == [[99], [99]]


def test_bigram_module_output():
    module = BigramHash(num_buckets=8, bigram_dim=3, model_dim=4).to(F64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        module.embed.weight.copy_(torch.randn(8, 3, generator=g, dtype=F64))
        module.proj.weight.copy_(torch.randn(4, 3, generator=g, dtype=F64))
        module.scale.fill_(0.05)
    ids = torch.tensor([[2, 5, 1]])
    buckets = [7, (36313 * 5 ^ 27191 * 2) % 7, (36313 * 1 ^ 27191 * 5) % 7]
    expected = module.embed.weight[buckets] @ module.proj.weight.T * 0.05
    torch.testing.assert_close(module(ids)[0], expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient", "math"])
def test_cuda_backends_match_reference(backend):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 8, 256, 64, generator=g)
    k = torch.randn(2, 4, 256, 64, generator=g)
    v = torch.randn(2, 4, 256, 64, generator=g)
    expected = reference_gqa_attention(q.to(F64), k.to(F64), v.to(F64))
    got = sdpa_gqa(*(t.cuda().bfloat16() for t in (q, k, v)), backend, is_causal=True)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=3e-2)
