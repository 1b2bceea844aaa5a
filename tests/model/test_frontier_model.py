"""Frontier model elements (docs/FRONTIER.md §2) against a slow float64 reference written out here.

The reference re-derives the whole forward from the parameters with explicit
per-head loops and an explicit document mask; the model (float64, CPU) must
match it in logits and in every parameter's gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.model.config import ModelConfig
from pgolf.model.doc_attention import dense_document_mask, flex_document_mask, masked_attention
from pgolf.model.gpt import GPT
from pgolf.model.rope import apply_partial_rope
from pgolf.model.sampling import forward_step, new_kv_cache
from pgolf.model.topology import split_encoder_decoder, visit_order
from tests.helpers.models import FRONTIER_BOS as BOS
from tests.helpers.models import frontier_config, random_float64


def sample_ids(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (2, 24), generator=gen)
    ids[0, [0, 6, 15]] = BOS   # row 0: three documents
    ids[1, [9]] = BOS          # row 1: a cut document, then a new one
    return ids


# ------------------------------------------------------------------ reference
def _rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _doc_numbers(ids: torch.Tensor) -> list[list[int]]:
    out = []
    for row in ids.tolist():
        n, docs = 0, []
        for tok in row:
            n += tok == BOS
            docs.append(n)
        out.append(docs)
    return out


def _ref_attention(model: GPT, i: int, n: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    cfg, L = model.cfg, model.cfg.num_layers
    attn = model.blocks[i].attn
    B, T, _ = n.shape
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (n @ model.qo_bank[i].T).view(B, T, H, hd)
    k = (n @ model.kv_bank[i].T).view(B, T, KV, hd)
    v = (n @ model.kv_bank[L + i].T).view(B, T, KV, hd)
    q, k = _rms(q), _rms(k)
    cos, sin = model.rope_cos[:T].double(), model.rope_sin[:T].double()
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    docs = _doc_numbers(ids)
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            g = h // (H // KV)
            outs = []
            for t in range(T):
                keys = [s for s in range(t + 1) if docs[b][s] == docs[b][t]]
                qt = q[b, t, h] * attn.q_gain[h]
                scores = torch.stack([qt @ k[b, s, g] for s in keys]) / math.sqrt(hd)
                p = torch.softmax(scores, dim=0)
                y = sum(p[j] * v[b, s, g] for j, s in enumerate(keys))
                unit = v[b, t, g] / v[b, t, g].norm()
                y = y - (y @ unit) * unit                                   # XSA (all layers)
                gate = torch.sigmoid(cfg.attn_gate_scale * (n[b, t, :cfg.attn_gate_window] @ attn.attn_gate_w[h]))
                outs.append(gate * y)
            heads.append(torch.stack(outs))
        rows.append(torch.cat(heads, dim=-1))
    return torch.stack(rows) @ model.qo_bank[L + i].T


def _ref_mlp(model: GPT, i: int, n: torch.Tensor) -> torch.Tensor:
    hidden = F.leaky_relu(n @ model.mlp_up_bank[i].T, 0.5).square()
    return hidden @ model.mlp_down_bank[i].T


def reference_logits(model: GPT, ids: torch.Tensor, encoder: list[int], decoder: list[int]) -> torch.Tensor:
    cfg = model.cfg
    e = model.tok_emb.weight[ids]
    smear = model.input_smear
    rows = []
    for t in range(ids.shape[1]):
        if t == 0:
            rows.append(e[:, 0])
            continue
        g = torch.sigmoid(e[:, t, :cfg.input_smear_window] @ smear.gate[0])
        keep = (ids[:, t] != BOS).double()
        rows.append(e[:, t] + (smear.smear_lambda * g * keep)[:, None] * e[:, t - 1])
    x = x0 = _rms(torch.stack(rows, dim=1))

    def scale(i):
        return 1 / math.sqrt(i + 1)

    def mixed(i, x):
        m = model.blocks[i].resid_mix
        return m[0] * x + m[1] * x0

    def attn_part(i, x_in):
        return model.blocks[i].attn_scale * _ref_attention(model, i, _rms(x_in) * scale(i), ids)

    def mlp_part(i, x):
        return model.blocks[i].mlp_scale * _ref_mlp(model, i, _rms(x) * scale(i))

    skips = []
    for i in encoder:
        x_in = mixed(i, x)
        x_mid = x_in + attn_part(i, x_in)
        x = x_mid + mlp_part(i, x_mid)
        skips.append(x)
    lanes = None
    for j, i in enumerate(decoder):
        if lanes is None and i >= cfg.parallel_start_layer:
            lanes = [x, x]
        if skips:
            s = torch.sigmoid(model.skip_gates[j])
            target = x if lanes is None else lanes[0]
            merged = s * target + (1 - s) * (model.skip_weights[j] * skips.pop())
            if lanes is None:
                x = merged
            else:
                lanes[0] = merged
        if lanes is None:
            x_in = mixed(i, x)
            x_mid = x_in + attn_part(i, x_in)
            x = x_mid + mlp_part(i, x_mid)
        else:
            a, m = attn_part(i, mixed(i, lanes[0])), mlp_part(i, lanes[1])
            r, p = model.parallel_resid_lambdas[i], model.parallel_post_lambdas[i]
            lanes = [r[0] * lanes[0] + p[0, 0] * a + p[1, 0] * m,
                     r[1] * lanes[1] + p[0, 1] * a + p[1, 1] * m]
    x = 0.5 * (lanes[0] + lanes[1])
    logits = _rms(x) @ model.tok_emb.weight.T
    return 30.0 * torch.tanh(logits / 30.0)


# ---------------------------------------------------------------------- tests
def test_visit_order_of_the_f1855_recurrence():
    looped = visit_order(11, 3, 5, 2, looping=True)
    assert looped == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert split_encoder_decoder(looped, True) == ((0, 1, 2, 3, 4, 5, 3, 4), (5, 3, 4, 5, 6, 7, 8, 9, 10))
    assert split_encoder_decoder(visit_order(11, 3, 5, 2, looping=False), True) == (
        (0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10))
    cfg = frontier_config(vocab_size=8192, num_layers=11, model_dim=64, num_heads=8, num_kv_heads=4,
                          xsa_layers=tuple(range(11)), recur_start=3, recur_end=5, recur_loops=2,
                          parallel_start_layer=8)
    assert cfg.num_visits == 17 and cfg.num_skip_weights == 8


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
@pytest.mark.parametrize("looping", [True, False])
def test_frontier_forward_and_gradients_match_the_float64_reference(looping):
    model = random_float64(frontier_config())
    model.set_recurrence(looping)
    encoder, decoder = ([0, 1, 2, 3], [2, 3, 4, 5]) if looping else ([0, 1, 2], [3, 4, 5])
    assert model.visits() == (tuple(encoder), tuple(decoder))
    ids = sample_ids()
    weights = torch.randn(2, 24, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    got = model.forward_logits(ids)
    (got * weights).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = reference_logits(model, ids, encoder, decoder)
    (want * weights).sum().backward()

    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        if not looping and name.startswith("skip_") and p.grad is not None:
            # Unlooped, only the first 3 of the 4 skips exist; the 4th gets no gradient.
            assert torch.all(got_grads[name][3] == 0)
        assert p.grad is not None, name
        torch.testing.assert_close(got_grads[name], p.grad, rtol=0, atol=1e-9, msg=name)


def test_perturbing_one_document_leaves_every_other_documents_logits_exactly_unchanged():
    torch.manual_seed(0)
    model = random_float64(frontier_config()).float()
    ids = sample_ids()
    perturbed = ids.clone()
    perturbed[0, 7:15] = (ids[0, 7:15] + 5) % 62 + 2  # inside document 2 of row 0 (never a BOS)
    with torch.no_grad():
        a, b = model.forward_logits(ids), model.forward_logits(perturbed)
    others = torch.ones(2, 24, dtype=torch.bool)
    others[0, 6:15] = False
    assert torch.equal(a[others], b[others])
    assert not torch.equal(a[0, 7:15], b[0, 7:15])
    # Without document masking the later document does see the change: the test can fail.
    leaky = random_float64(frontier_config(doc_attention=False)).float()
    leaky.load_state_dict(model.state_dict())
    with torch.no_grad():
        c, d = leaky.forward_logits(ids), leaky.forward_logits(perturbed)
    assert not torch.equal(c[0, 15:], d[0, 15:])


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_flex_document_mask_matches_the_dense_mask_on_cpu():
    ids = sample_ids()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 24, 8, generator=gen)
    k, v = torch.randn(2, 2, 24, 8, generator=gen), torch.randn(2, 2, 24, 8, generator=gen)
    dense = masked_attention(q, k, v, dense_document_mask(ids, BOS))
    flex = masked_attention(q, k, v, flex_document_mask(ids, BOS))
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_input_smear_bos_mask_stops_the_previous_document_leaking_into_bos():
    model = random_float64(frontier_config(input_smear_bos_mask=True))
    ids = sample_ids()
    e = model.tok_emb.weight[ids]
    out = model.input_smear(e, ids)
    bos = ids == BOS
    torch.testing.assert_close(out[bos], e[bos], rtol=0, atol=0)
    assert not torch.allclose(out[~bos][1:], e[~bos][1:])
    unmasked = model.input_smear.__class__(4, BOS, bos_mask=False).double()
    unmasked.load_state_dict(model.input_smear.state_dict())
    assert not torch.allclose(unmasked(e, ids)[0, 6], e[0, 6])


def test_kv_cache_decoding_matches_the_full_forward_with_recurrence_and_lanes():
    model = random_float64(frontier_config(doc_attention=False))
    ids = sample_ids()[:, :10]
    full = model.forward_logits(ids)
    cache = new_kv_cache(model, 10)
    steps = [forward_step(model, ids[:, :4], cache)] + [forward_step(model, ids[:, t:t + 1], cache)
                                                       for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


def test_frontier_elements_are_fresh_identities_at_init():
    """Zero-init gates/lambdas: input smear is the identity and attention gates are 0.5 at init."""
    torch.manual_seed(0)
    model = GPT(frontier_config())
    assert torch.all(model.skip_gates == 0)
    assert torch.all(model.parallel_resid_lambdas == torch.tensor(1.1, dtype=torch.float32))
    assert torch.all(model.parallel_post_lambdas == 1.0)
    assert all(torch.all(b.attn.attn_gate_w == 0) for b in model.blocks)
    ids = sample_ids()
    e = model.tok_emb.weight[ids]
    torch.testing.assert_close(model.input_smear(e, ids), e, rtol=0, atol=0)


F1855 = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
             xsa_layers=tuple(range(11)), qk_gain_init=5.0, rope_dims=16, recur_start=3, recur_end=5,
             recur_loops=2, parallel_start_layer=8, attn_gate_window=12, input_smear_window=12,
             doc_attention_impl="auto")


def test_f1855_model_has_35_945_671_parameters_tensor_by_tensor():
    with torch.device("meta"):
        model = GPT(frontier_config(**F1855))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 2048, 512) and shapes["mlp_down_bank"] == (11, 512, 2048)
    assert shapes["tok_emb.weight"] == (8192, 512)
    per_block = {"attn.q_gain": (8,), "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512),
                 "attn.attn_gate_w": (8, 12)}
    for i in range(11):
        block = {n.removeprefix(f"blocks.{i}."): s for n, s in shapes.items() if n.startswith(f"blocks.{i}.")}
        assert block == per_block
    assert shapes["skip_weights"] == shapes["skip_gates"] == (8, 512)
    assert shapes["parallel_post_lambdas"] == (11, 2, 2) and shapes["parallel_resid_lambdas"] == (11, 2)
    assert shapes["input_smear.gate"] == (1, 12) and shapes["input_smear.smear_lambda"] == ()
    assert len(shapes) == 5 + 5 * 11 + 6
    assert model.num_parameters() == 35_945_671


def test_the_f1855_profile_builds_the_35_945_671_parameter_model():
    from pgolf.config import from_params
    from pgolf.tools.profiles import compose
    for profile in ("f1855", "f1855_gpu1"):
        cfg = from_params(ModelConfig, compose(profile), "model")
        assert cfg == frontier_config(**F1855, attention_backend="cudnn", residual_dtype="autocast")
        with torch.device("meta"):
            assert GPT(cfg).num_parameters() == 35_945_671
