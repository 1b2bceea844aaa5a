"""GPT: forward pass against a plain float64 reference, wiring, init, banks, KV cache, late QAT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.model.gpt import (BANK_NAMES, GPT, ModelConfig, param_groups_by_role, param_roles,
                         rebank_state_dict, unbank_state_dict)
from pgolf.model.sampling import forward_step, new_kv_cache, sample
from pgolf.quant.grid import dequantize_grid, quantize_to_grid, row_scales
from pgolf.tools.profiles import model_preset
from tests.helpers import tiny_model_config

F64 = torch.float64

TINY = tiny_model_config(vocab_size=64, num_layers=5, num_heads=4, num_kv_heads=2, rope_dims=4,
                         xsa_layers=[3, 4], ve_layers=[3, 4], bigram_buckets=16, bigram_dim=8)

ALL_OFF = TINY.replace(
    tie_embeddings=False, logit_softcap=0.0, ln_scale=False, unet_skips=False, resid_mix=False,
    rope_dims=0, qk_norm=False, xsa_layers=(), ve_layers=(), ve_dim=0, smear_gate=False,
    bigram_buckets=0, bigram_dim=0, vrl=False)

R549 = ModelConfig.from_dict(model_preset("r549"))


def randomized(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> GPT:
    """A model whose every parameter is random (zero-init O/down would hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return model


def random_ids(cfg: ModelConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------- reference
def reference_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """docs/RECIPE.md §2.2 written out with loops, float64, straight from the parameters."""
    cfg = model.cfg
    P = {name: p.detach().to(F64) for name, p in model.named_parameters()}
    L, H, KV, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T = ids.shape
    eps = torch.finfo(F64).eps

    def norm(z):
        return z / (z.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    def rotate(z):  # z [B, T, heads, hd]
        out = z.clone()
        half = cfg.rope_dims // 2
        for t in range(T):
            for i in range(half):
                theta = t * cfg.rope_base ** (-2.0 * i / cfg.rope_dims)
                a, b = z[:, t, :, i], z[:, t, :, i + half]
                out[:, t, :, i] = a * math.cos(theta) - b * math.sin(theta)
                out[:, t, :, i + half] = a * math.sin(theta) + b * math.cos(theta)
        return out

    h = P["tok_emb.weight"][ids]
    if cfg.bigram_buckets:
        nb = cfg.bigram_buckets
        buckets = [[nb - 1] + [((36313 * int(ids[b, t])) ^ (27191 * int(ids[b, t - 1]))) % (nb - 1)
                               for t in range(1, T)] for b in range(B)]
        h = h + P["bigram.embed.weight"][torch.tensor(buckets)] @ P["bigram.proj.weight"].T * P["bigram.scale"]
    h = norm(h)
    if cfg.smear_gate:
        g = torch.sigmoid(P["smear.gate"])
        h = (1 - g) * h + g * torch.cat((torch.zeros_like(h[:, :1]), h[:, :-1]), dim=1)
    x = x0 = h
    if cfg.ve_layers:
        ve = P["value_embed.embed.weight"][ids] @ P["value_embed.proj.weight"].T * P["value_embed.scale"]
    n_enc = L // 2 if cfg.unet_skips else 0
    encoder_outputs, v0 = [], None
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        j = i - n_enc
        if cfg.unet_skips and 0 <= j < n_enc:
            x = x + P["skip_weights"][j] * encoder_outputs[n_enc - 1 - j]
        if cfg.resid_mix:
            m = P[f"blocks.{i}.resid_mix"]
            x = m[0] * x + m[1] * x0
        s = 1 / math.sqrt(i + 1) if cfg.ln_scale else 1.0
        a = norm(x) * s
        q = (a @ P["qo_bank"][i].T).view(B, T, H, hd)
        k = (a @ P["kv_bank"][i].T).view(B, T, KV, hd)
        v = a @ P["kv_bank"][L + i].T
        if i in cfg.ve_layers:
            v = v + ve * P["value_embed.layer_scales"][cfg.ve_layers.index(i)]
        if i == 0:
            v0 = v
        elif cfg.vrl:
            v = v + torch.sigmoid(P[f"blocks.{i}.attn.vrl_alpha"]) * v0
        v = v.view(B, T, KV, hd)
        if cfg.qk_norm:
            q, k = norm(q), norm(k)
        if cfg.rope_dims:
            q, k = rotate(q), rotate(k)
        q = q * P[f"blocks.{i}.attn.q_gain"][None, None, :, None]
        heads = []
        for head in range(H):
            kv = head // (H // KV)
            scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)
            y = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v[:, :, kv]
            if i in cfg.xsa_layers:
                unit = v[:, :, kv] / v[:, :, kv].norm(dim=-1, keepdim=True)
                y = y - (y * unit).sum(-1, keepdim=True) * unit
            heads.append(y)
        x = x + P[f"blocks.{i}.attn_scale"] * (torch.cat(heads, dim=-1) @ P["qo_bank"][L + i].T)
        u = F.leaky_relu(norm(x) * s @ P["mlp_up_bank"][i].T, cfg.mlp_leaky_slope) ** 2
        x = x + P[f"blocks.{i}.mlp_scale"] * (u @ P["mlp_down_bank"][i].T)
        if i < n_enc:
            encoder_outputs.append(x)
    head = P["tok_emb.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    logits = norm(x) @ head.T
    cap = cfg.logit_softcap
    return cap * torch.tanh(logits / cap) if cap else logits


@pytest.mark.parametrize("cfg", [TINY, ALL_OFF], ids=["all_on", "all_off"])
def test_forward_matches_float64_reference(cfg):
    model = randomized(cfg, dtype=F64)
    ids = random_ids(cfg, 2, 9)
    got = model.forward_logits(ids)
    # The model's RoPE tables are fp32 (as in training); everything else is float64.
    torch.testing.assert_close(got, reference_logits(model, ids), rtol=0, atol=2e-5)


def test_loss_and_token_nll_are_fp32_cross_entropy():
    model = randomized(TINY)
    ids = random_ids(TINY, 2, 10)
    x, y = ids[:, :-1], ids[:, 1:]
    nll = model.token_nll(x, y)
    logits = model.forward_logits(x).double()
    expected = -torch.log_softmax(logits, dim=-1).gather(-1, y[..., None]).squeeze(-1)
    assert nll.dtype == torch.float32 and nll.shape == y.shape
    torch.testing.assert_close(nll.double(), expected, rtol=0, atol=1e-5)
    loss = model(x, y)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, nll.mean(), rtol=1e-6, atol=0)
    assert model.forward_logits(x).abs().max() <= TINY.logit_softcap


# ----------------------------------------------------------------- wiring
def test_causal_changing_token_t_leaves_earlier_logits():
    model = randomized(TINY)
    ids = random_ids(TINY, 1, 12)
    base = model.forward_logits(ids)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 7) % TINY.vocab_size
        out = model.forward_logits(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_unet_decoder_layer_j_receives_encoder_output_lenc_minus_1_minus_j():
    model = randomized(TINY)
    inputs, outputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out[0].detach()))
    model.forward_logits(random_ids(TINY, 2, 6))
    n_enc, L = TINY.num_encoder_layers, TINY.num_layers
    assert n_enc == 2
    w = model.skip_weights.detach()
    for j in range(L - n_enc):
        i = n_enc + j
        expected = outputs[i - 1] + (w[j] * outputs[n_enc - 1 - j] if j < n_enc else 0)
        torch.testing.assert_close(inputs[i], expected, rtol=0, atol=1e-6)


def test_vrl_gates_exist_for_layers_1_to_L_minus_1_and_all_get_gradients():
    model = GPT(TINY)
    names = [n for n, _ in model.named_parameters() if n.endswith("vrl_alpha")]
    assert names == [f"blocks.{i}.attn.vrl_alpha" for i in range(1, TINY.num_layers)]
    model(random_ids(TINY, 2, 8), random_ids(TINY, 2, 8, seed=2)).backward()
    assert all(model.get_parameter(n).grad is not None for n in names)
    assert all(p.grad is not None for p in model.parameters())  # DDP-safe: nothing unused
    model = randomized(TINY)
    model(random_ids(TINY, 2, 8), random_ids(TINY, 2, 8, seed=2)).backward()
    assert all(model.get_parameter(n).grad.abs() > 0 for n in names)


def test_value_embedding_added_only_on_ve_layers():
    model = randomized(TINY)
    ids = random_ids(TINY, 2, 6)
    raw_v, own_v = {}, {}
    for i, block in enumerate(model.blocks):
        block.attn.c_v.register_forward_hook(lambda m, a, out, i=i: raw_v.__setitem__(i, out.detach()))
        block.attn.register_forward_hook(lambda m, a, out, i=i: own_v.__setitem__(i, out[1].detach()))
    model.forward_logits(ids)
    ve = model.value_embed
    base = (ve.embed.weight[ids] @ ve.proj.weight.T * ve.scale).detach()
    for i in range(TINY.num_layers):
        added = own_v[i] - raw_v[i]
        if i in TINY.ve_layers:
            expected = base * ve.layer_scales[TINY.ve_layers.index(i)].detach()
            torch.testing.assert_close(added, expected, rtol=0, atol=1e-6)
        else:
            assert added.abs().max() == 0


def test_hook_points_see_the_exact_matmul_input():
    model = randomized(TINY)
    L = TINY.num_layers
    seen = {}
    names = {f"blocks.{i}.{p}": (bank, idx) for i in range(L) for p, bank, idx in [
        ("attn.c_q", "qo_bank", i), ("attn.c_k", "kv_bank", i), ("attn.c_v", "kv_bank", L + i),
        ("attn.proj", "qo_bank", L + i), ("mlp.fc", "mlp_up_bank", i), ("mlp.proj", "mlp_down_bank", i)]}
    for name in names:
        module = model.get_submodule(name)
        assert list(module.parameters()) == []
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    model.forward_logits(random_ids(TINY, 2, 5))
    for name, (bank, idx) in names.items():
        x, out = seen[name]
        torch.testing.assert_close(out, x @ model.get_parameter(bank)[idx].T, rtol=0, atol=1e-6)


def _block_stream_dtypes(model: GPT, ids: torch.Tensor) -> tuple[set, torch.Tensor]:
    """dtypes of the residual stream entering/leaving every block, and the logits."""
    seen: set = set()
    hooks = [b.register_forward_hook(lambda m, args, out: seen.update({args[0].dtype, out[0].dtype}))
             for b in model.blocks]
    logits = model.forward_logits(ids)
    for h in hooks:
        h.remove()
    return seen, logits


def test_residual_dtype_autocast_carries_the_stream_in_the_autocast_dtype():
    ids = random_ids(TINY, 2, 6)
    fp32_stream = randomized(TINY.replace(residual_dtype="float32"))
    low_stream = randomized(TINY.replace(residual_dtype="autocast"))
    # Without autocast the setting changes nothing, bit for bit.
    dtypes_a, logits_a = _block_stream_dtypes(fp32_stream, ids)
    dtypes_b, logits_b = _block_stream_dtypes(low_stream, ids)
    assert dtypes_a == dtypes_b == {torch.float32}
    assert torch.equal(logits_a, logits_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes_a, logits_a = _block_stream_dtypes(fp32_stream, ids)
        dtypes_b, logits_b = _block_stream_dtypes(low_stream, ids)
        loss = low_stream(ids, random_ids(TINY, 2, 6, seed=2))
    assert dtypes_a == {torch.float32}
    assert dtypes_b == {torch.bfloat16}  # every scale/mix kept the stream bf16
    assert logits_b.dtype == torch.float32
    # Same function at bf16 precision (logits are O(10) with these random weights).
    torch.testing.assert_close(logits_b, logits_a, rtol=0.05, atol=0.5)
    assert (logits_b - logits_a).abs().max() > 0
    loss.backward()
    for name in ("blocks.1.attn_scale", "blocks.1.mlp_scale", "blocks.1.resid_mix", "skip_weights"):
        grad = low_stream.get_parameter(name).grad
        assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0, name


# -------------------------------------------------------------- init/banks
def test_init_statistics():
    torch.manual_seed(0)
    cfg = TINY.replace(model_dim=64, num_heads=4, num_kv_heads=2, bigram_dim=16)
    model = GPT(cfg)
    L = cfg.num_layers
    assert model.qo_bank[L:].abs().max() == 0 and model.mlp_down_bank.abs().max() == 0
    eye = torch.eye(cfg.model_dim)
    for i in range(L):
        q = model.qo_bank[i].detach()
        torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-5)
        for w in (model.kv_bank[i], model.kv_bank[L + i]):  # wide: orthonormal rows
            torch.testing.assert_close(w @ w.T, torch.eye(cfg.kv_dim), rtol=0, atol=1e-5)
        up = model.mlp_up_bank[i].detach()  # tall: orthonormal columns
        torch.testing.assert_close(up.T @ up, eye, rtol=0, atol=1e-5)
    bp = model.bigram.proj.weight.detach()  # [D, bigram_dim]
    torch.testing.assert_close(bp.T @ bp, torch.eye(cfg.bigram_dim), rtol=0, atol=1e-5)
    assert model.bigram.embed.weight.abs().max() == 0
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert model.value_embed.embed.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.bigram.scale.item() == pytest.approx(0.05) and model.value_embed.scale.item() == pytest.approx(0.1)
    assert all(torch.equal(b.attn.q_gain, torch.full((4,), 1.5)) for b in model.blocks)
    assert torch.equal(model.blocks[0].resid_mix, torch.stack([torch.ones(64), torch.zeros(64)]))
    assert model.smear.gate.abs().max() == 0 and torch.equal(model.skip_weights, torch.ones(2, 64))


def test_unbank_rebank_round_trip_is_exact():
    model = randomized(TINY)
    sd = model.state_dict()
    flat = unbank_state_dict(sd, TINY)
    L, D, KVD, Hd = TINY.num_layers, TINY.model_dim, TINY.kv_dim, TINY.mlp_hidden
    assert not set(BANK_NAMES) & set(flat)
    assert flat["blocks.2.attn.c_q.weight"].shape == (D, D)
    assert flat["blocks.2.attn.c_k.weight"].shape == (KVD, D)
    assert flat["blocks.2.mlp.fc.weight"].shape == (Hd, D)
    assert flat["blocks.2.mlp.proj.weight"].shape == (D, Hd)
    assert torch.equal(flat["blocks.3.attn.proj.weight"], sd["qo_bank"][L + 3])
    assert torch.equal(flat["blocks.1.attn.c_v.weight"], sd["kv_bank"][L + 1])
    assert flat["blocks.0.attn.c_q.weight"].untyped_storage().data_ptr() != sd["qo_bank"].untyped_storage().data_ptr()
    back = rebank_state_dict(flat, TINY)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ----------------------------------------------------------------- counts
def test_record_parameter_counts():
    with torch.device("meta"):
        assert GPT(R549).num_parameters() == 26_928_220  # PR #549's logged count
        # PR #960: BigramHash 3072×128 (+196,608) and 10 VRL gates.
        assert GPT(R549.replace(bigram_buckets=3072, vrl=True)).num_parameters() == 27_124_838
        r960 = ModelConfig.from_dict(model_preset("r960"))
        assert r960 == R549.replace(bigram_buckets=3072, vrl=True)
        # R1019: XSA on all 11 layers, BigramHash 3072×112 (its logged count).
        assert GPT(ModelConfig.from_dict(model_preset("r1019"))).num_parameters() == 27_067_484


def test_param_roles_partition_and_assign_recipe_groups():
    model = GPT(TINY)
    roles = param_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert {n for n, r in roles.items() if r == "bank"} == set(BANK_NAMES)
    assert {n for n, r in roles.items() if r == "embed"} == {
        "tok_emb.weight", "bigram.embed.weight", "value_embed.embed.weight"}
    assert roles["bigram.proj.weight"] == roles["value_embed.proj.weight"] == "scalar"
    groups = param_groups_by_role(model)
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert param_roles(GPT(ALL_OFF))["lm_head.weight"] == "embed"


def test_config_validation_names_the_key():
    bad = {**TINY.to_dict(), "num_kv_heads": 3}
    with pytest.raises(ParamError, match=r"model\.num_kv_heads"):
        from_params(ModelConfig, {"model": bad}, "model")
    with pytest.raises(ParamError, match=r"model\.xsa_layers"):
        from_params(ModelConfig, {"model": {**TINY.to_dict(), "xsa_layers": [5]}}, "model")
    with pytest.raises(ParamError, match=r"model\.rope_dims"):
        from_params(ModelConfig, {"model": {**TINY.to_dict(), "rope_dims": 3}}, "model")
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY


def test_rope_tables_cached_and_computed_agree():
    from pgolf.model.gpt import ROPE_TABLE_POSITIONS
    from pgolf.model.rope import rope_tables
    model = GPT(TINY)
    for start, length in [(0, 7), (ROPE_TABLE_POSITIONS - 3, 9), (ROPE_TABLE_POSITIONS + 5, 2)]:
        expected = rope_tables(torch.arange(start, start + length), TINY.rope_dims, TINY.rope_base)
        got = model._rope(start, length)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert GPT(ALL_OFF)._rope(0, 4) is None


# ---------------------------------------------------------------- KV cache
def test_kv_cache_logits_equal_full_recompute():
    model = randomized(TINY).eval()
    ids = random_ids(TINY, 3, 13)
    with torch.no_grad():
        full = model.forward_logits(ids)
        for chunks in ([1] * 13, [4, 1, 3, 5]):
            cache = new_kv_cache(model, 13)
            pieces, start = [], 0
            for size in chunks:
                pieces.append(forward_step(model, ids[:, start:start + size], cache))
                start += size
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_sample_matches_sampling_from_full_recompute():
    model = randomized(TINY).eval()
    got = sample(model, 4, 10, 0.8, torch.Generator().manual_seed(3), "cpu")
    assert got.shape == (4, 10) and got.dtype == torch.long
    assert got.min() >= 0 and got.max() < TINY.vocab_size
    g = torch.Generator().manual_seed(3)
    expected = torch.randint(TINY.vocab_size, (4, 1), generator=g)
    with torch.no_grad():
        for _ in range(9):
            probs = torch.softmax(model.forward_logits(expected)[:, -1] / 0.8, dim=-1)
            expected = torch.cat((expected, torch.multinomial(probs, 1, generator=g)), dim=1)
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_kv_cache_and_sampling_on_cuda(autocast):
    model = randomized(TINY.replace(attention_backend="cudnn")).cuda().eval()
    ids = random_ids(TINY, 3, 13).cuda()
    tol = 5e-2 if autocast else 1e-4
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        full = model.forward_logits(ids)
        cache = new_kv_cache(model, 13)
        steps = torch.cat([forward_step(model, ids[:, t:t + 1], cache) for t in range(13)], dim=1)
        torch.testing.assert_close(steps, full, rtol=0, atol=tol)
        out = sample(model, 4, 16, 0.8, torch.Generator(device="cuda").manual_seed(0), "cuda")
    assert out.shape == (4, 16) and 0 <= out.min() and out.max() < TINY.vocab_size


# ---------------------------------------------------------------- late QAT
def _quantized_copy(model: GPT, bits: int) -> GPT:
    copy = randomized(TINY)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in BANK_NAMES:
            w = copy.get_parameter(name)
            s = row_scales(w, bits)
            w.copy_(dequantize_grid(quantize_to_grid(w, s, bits), s))
    return copy


def test_late_qat_uses_export_grid_and_passes_gradients():
    model = randomized(TINY).train()
    ids, tgt = random_ids(TINY, 2, 8), random_ids(TINY, 2, 8, seed=5)
    plain = model(ids, tgt)
    model.set_qat(False, 6)
    assert torch.equal(model(ids, tgt), plain)
    model.set_qat(True, 6)
    qat = model(ids, tgt)
    assert (qat - plain).abs() > 1e-4
    reference = _quantized_copy(model, 6).train()
    ref_loss = reference(ids, tgt)
    torch.testing.assert_close(qat, ref_loss, rtol=0, atol=1e-5)
    qat.backward()
    ref_loss.backward()
    for name in BANK_NAMES:  # STE: gradient of the quantised weights, passed straight through
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0
        torch.testing.assert_close(grad, reference.get_parameter(name).grad, rtol=1e-4, atol=1e-6)
    model.eval()
    torch.testing.assert_close(model(ids, tgt), plain, rtol=0, atol=0)  # eval forwards: no QAT
    with pytest.raises(ValueError):
        model.set_qat(True, 1)


def test_fp16_scale_rounding_matches_a_real_fp16_cast():
    # quant_grid.round_to_fp16 replaces a cast pair inductor would drop; check it
    # on every fp16 value, the midpoints between them (ties) and random magnitudes.
    from pgolf.quant.grid import round_to_fp16
    grid = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    mids = (grid[:-1] + grid[1:]) / 2
    above = torch.nextafter(mids, torch.full_like(mids, 1e9))
    randoms = torch.rand(50_000, generator=torch.Generator().manual_seed(0)).double() * 10.0 ** torch.randint(
        -9, 4, (50_000,), generator=torch.Generator().manual_seed(1))
    x = torch.cat((grid, mids, above, randoms)).float()
    x = torch.cat((x, -x))
    assert torch.equal(round_to_fp16(x), x.to(torch.float16).to(torch.float32))


@pytest.mark.slow
def test_late_qat_switch_acts_under_torch_compile_without_recompiling():
    torch._dynamo.reset()
    cfg = TINY.replace(num_layers=2, xsa_layers=(1,), ve_layers=(1,), model_dim=16, num_heads=2,
                       num_kv_heads=1, bigram_buckets=8, bigram_dim=4, ve_dim=4)
    model = randomized(cfg).train()
    ids, tgt = random_ids(cfg, 2, 8), random_ids(cfg, 2, 8, seed=5)
    eager_plain = model(ids, tgt).detach()
    model.set_qat(True, 6)
    eager_qat = model(ids, tgt).detach()
    model.set_qat(False, 6)
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        off = compiled(ids, tgt)
    except Exception as exc:  # no C compiler or an inductor gap on this box
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(off.detach(), eager_plain, rtol=0, atol=1e-5)
    model.set_qat(True, 6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        on = compiled(ids, tgt)
    torch.testing.assert_close(on.detach(), eager_qat, rtol=0, atol=1e-5)
    assert (on - off).abs() > 1e-4
    model.zero_grad()
    on.backward()
    assert all(model.get_parameter(n).grad.abs().max() > 0 for n in BANK_NAMES)
