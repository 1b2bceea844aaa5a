"""Per-tensor policy: classes, clip search, every quantize param reaching its code, ±1 pruning."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import pgolf.quant.encode_cache as encode_cache_mod
import pgolf.quant.policy as quantize_mod
from pgolf.quant.artifact import encode
from pgolf.errors import DataError
from pgolf.quant.gptq import gptq_quantize
from pgolf.quant.pruning import _zero_cheapest, prune_order, prune_to_target
from pgolf.quant.policy import (QuantizeConfig, candidate_scales, quantize_state_dict,
                            row_quantiles, tensor_class)
from pgolf.quant.grid import row_scales
from pgolf.model.layout import block_weight
from pgolf.quant.hessian_file import hessian_key_for_weight

F64 = torch.float64
CPU = torch.device("cpu")
D, KV, HID, LAYERS = 32, 16, 48, 2

BASE = QuantizeConfig(
    method="gptq", damp=0.01, block_size=8, act_order=True, clip_candidates=(0.9, 0.95, 0.99, 1.0),
    clip_metric="weight_mse", attn_bits=4, mlp_bits=4, embed_bits=8, embed_clip_quantile=0.999,
    passthrough_numel=300, compressor="zstd", zstd_level=3, lzma_preset=6, prune=False,
    prune_margin_bytes=0)


def cfg(**changes) -> QuantizeConfig:
    return dataclasses.replace(BASE, **changes)


def _hessian(width: int, g: torch.Generator) -> torch.Tensor:
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + 0.3 * torch.eye(width)
    x = torch.randn(400, width, generator=g) @ mix
    return (x.to(F64).T @ x.to(F64)).float()


def synthetic_model(seed: int = 0):
    """Unbanked state dict of a 2-layer model and its Hessians."""
    g = torch.Generator().manual_seed(seed)

    def gaussian(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    state = {"tok_emb.weight": gaussian(64, D), "bigram.proj.weight": gaussian(8, D)}
    hessians = {}
    for i in range(LAYERS):
        p = f"blocks.{i}"
        state.update({f"{p}.attn.c_q.weight": gaussian(D, D), f"{p}.attn.c_k.weight": gaussian(KV, D),
                      f"{p}.attn.c_v.weight": gaussian(KV, D), f"{p}.attn.proj.weight": gaussian(D, D),
                      f"{p}.mlp.fc.weight": gaussian(HID, D), f"{p}.mlp.proj.weight": gaussian(D, HID),
                      f"{p}.attn.q_gain": torch.full((4,), 1.5), f"{p}.attn.vrl_alpha": torch.zeros(())})
        hessians.update({f"{p}.attn.qkv": _hessian(D, g), f"{p}.attn.proj": _hessian(D, g),
                         f"{p}.mlp.fc": _hessian(D, g), f"{p}.mlp.proj": _hessian(HID, g)})
    return state, hessians


STATE, HESSIANS = synthetic_model()
TOKENS = 400


def run(config: QuantizeConfig, state=STATE, hessians=HESSIANS):
    return quantize_state_dict(state, hessians, TOKENS, config, CPU, "h.pt")


def by_name(result):
    return {t.name: t for t in result.tensors}, {r["name"]: r for r in result.report}


def test_tensor_classes_follow_the_first_matching_rule():
    c = cfg()
    assert tensor_class("blocks.3.attn.c_k.weight", torch.zeros(16, 32), c) == "attn"
    assert tensor_class("blocks.3.attn.proj.weight", torch.zeros(32, 32), c) == "attn"
    assert tensor_class("blocks.0.mlp.proj.weight", torch.zeros(32, 48), c) == "mlp"
    assert tensor_class("blocks.0.mlp.proj.weight", torch.zeros(10, 30), c) == "passthrough"  # 300 ≤ 300
    assert tensor_class("tok_emb.weight", torch.zeros(64, 32), c) == "embed"
    assert tensor_class("value_embed.embed.weight", torch.zeros(20, 20), c) == "embed"
    assert tensor_class("blocks.0.attn.q_gain", torch.zeros(400), c) == "embed"
    assert tensor_class("steps", torch.zeros(1000, dtype=torch.long), c) == "passthrough"


def test_row_quantiles_match_torch_quantile():
    w = torch.randn(5, 37, generator=torch.Generator().manual_seed(1), dtype=F64).abs()
    probs = (0.01, 0.5, 0.999, 0.9999984, 1.0)
    expected = torch.quantile(w, torch.tensor(probs, dtype=F64), dim=-1)
    torch.testing.assert_close(row_quantiles(w, probs), expected, rtol=1e-12, atol=1e-15)


def test_candidate_scales_are_fp16_grid_scales_of_the_quantile_clip():
    w = STATE["blocks.0.mlp.fc.weight"]
    scales = candidate_scales(w[None], 6, (0.9, 1.0))
    for c, p in enumerate((0.9, 1.0)):
        clip = torch.quantile(w.abs(), p, dim=-1)
        assert torch.equal(scales[0, c], row_scales(w, 6, clip=clip))


def _reference_choice(name: str, config: QuantizeConfig) -> tuple[int, list[float], list[float]]:
    """Chosen candidate by brute force: one GPTQ call per candidate, float64 errors."""
    w = STATE[name]
    h = HESSIANS[hessian_key_for_weight(name)]
    bits = config.attn_bits if ".attn." in name else config.mlp_bits
    mse, hess = [], []
    for p in config.clip_candidates:
        scale = candidate_scales(w[None], bits, (p,))
        q = gptq_quantize(w[None], h[None], scale, bits, damp=config.damp, block_size=config.block_size,
                          act_order=config.act_order).q[0, 0]
        diff = w.to(F64) - q.to(F64) * scale[0, 0].to(F64)[:, None]
        mse.append(float(diff.pow(2).mean()))
        hess.append(float(torch.trace(diff @ h.to(F64) @ diff.T)) / TOKENS)
    errors = hess if config.clip_metric == "hessian" else mse
    return errors.index(min(errors)), mse, hess


@pytest.mark.parametrize("metric", ["weight_mse", "hessian"])
def test_clip_choice_minimises_the_chosen_metric(metric):
    config = cfg(clip_metric=metric)
    tensors, report = by_name(run(config))
    disagreements = 0
    for name in [n for n in STATE if tensor_class(n, STATE[n], config) in ("attn", "mlp")]:
        best, mse, hess = _reference_choice(name, config)
        assert report[name]["clip"] == config.clip_candidates[best], name
        assert report[name]["weight_mse"] == pytest.approx(mse[best], rel=1e-9)
        assert report[name]["hessian_error"] == pytest.approx(hess[best], rel=1e-6)
        disagreements += mse.index(min(mse)) != hess.index(min(hess))
    assert disagreements > 0  # otherwise this test could not tell the metrics apart


def _quantized(result):
    return {t.name: t.q for t in result.tensors if t.quantized}


def _differs(a, b) -> bool:
    qa, qb = _quantized(a), _quantized(b)
    return qa.keys() != qb.keys() or any(not torch.equal(qa[k], qb[k]) for k in qa)


@pytest.mark.parametrize("change", [
    dict(damp=0.5), dict(act_order=False), dict(clip_candidates=(1.0,)), dict(clip_metric="hessian"),
    dict(method="rtn"), dict(attn_bits=5), dict(mlp_bits=7), dict(embed_bits=6),
    dict(embed_clip_quantile=0.9), dict(passthrough_numel=600)])
def test_every_quantize_param_changes_the_integers(change):
    assert _differs(run(cfg()), run(cfg(**change)))


def test_block_size_reaches_the_solver(monkeypatch):
    # Blocking does not change GPTQ's result in exact arithmetic, so check the plumbing.
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["block_size"])
        return gptq_quantize(*args, **kwargs)

    monkeypatch.setattr(quantize_mod, "gptq_quantize", spy)
    run(cfg(block_size=5))
    assert seen and set(seen) == {5}


@pytest.mark.parametrize("attn_bits,mlp_bits", [(5, 7), (7, 5), (8, 4)])
def test_other_bit_widths_stay_on_their_grid(attn_bits, mlp_bits):
    tensors, report = by_name(run(cfg(attn_bits=attn_bits, mlp_bits=mlp_bits)))
    for name, t in tensors.items():
        if ".attn.c_" in name or ".mlp." in name:
            bits = attn_bits if ".attn." in name else mlp_bits
            assert t.bits == bits and report[name]["bits"] == bits
            assert int(t.q.abs().max()) <= 2 ** (bits - 1) - 1
            assert int(t.q.abs().max()) == 2 ** (bits - 1) - 1  # the row max reaches the grid edge


def test_classes_methods_and_report_fields():
    tensors, report = by_name(run(cfg()))
    assert tensors["tok_emb.weight"].bits == 8 and tensors["tok_emb.weight"].method == "rtn"
    assert tensors["bigram.proj.weight"].raw.dtype == torch.float16
    assert tensors["blocks.1.attn.vrl_alpha"].shape == ()
    assert tensors["blocks.0.mlp.proj.weight"].method == "gptq"
    row = report["blocks.0.mlp.proj.weight"]
    assert row["class"] == "mlp" and row["shape"] == [D, HID] and row["fallback"] == "none"
    assert row["stored_bytes"] == D * HID + 2 * D
    assert row["scale_min"] <= row["scale_mean"] <= row["scale_max"] and row["rows_at_scale_floor"] == 0
    assert list(tensors) == sorted(STATE)


def test_missing_or_misshaped_hessian_is_a_data_error():
    hessians = dict(HESSIANS)
    del hessians["blocks.1.mlp.fc"]
    with pytest.raises(DataError, match="h.pt: no Hessian 'blocks.1.mlp.fc' for blocks.1.mlp.fc.weight"):
        run(cfg(), hessians=hessians)
    hessians["blocks.1.mlp.fc"] = torch.eye(3)
    with pytest.raises(DataError, match=r"has shape \(3, 3\)"):
        run(cfg(), hessians=hessians)
    _, report = by_name(run(cfg(method="rtn"), hessians={}))  # RTN + weight MSE needs no Hessian
    assert report["blocks.1.mlp.fc.weight"]["hessian_error"] is None
    _, report = by_name(run(cfg(method="rtn")))  # ...but reports the Hessian error when it has one
    assert report["blocks.1.mlp.fc.weight"]["hessian_error"] > 0


def test_cholesky_fallbacks_are_counted_and_reported():
    hessians = dict(HESSIANS)
    hessians["blocks.0.mlp.fc"] = -torch.eye(D)
    result = run(cfg(), hessians=hessians)
    assert result.fallbacks == {"more_damping": 0, "round_to_nearest": 1}
    _, report = by_name(result)
    assert report["blocks.0.mlp.fc.weight"]["fallback"] == "round_to_nearest"
    assert report["blocks.0.mlp.fc.weight"]["method"] == "rtn"


# ------------------------------------------------------------------ pruning
def _size(tensors):
    return len(encode(tensors, {}, {}, "zstd", 3))


def test_pruning_reaches_the_target_with_the_fewest_cheapest_entries():
    tensors = run(cfg()).tensors
    before = _size(tensors)
    target = before - 150
    out = prune_to_target(tensors, target, _size)
    assert out.fits and out.size_bytes == _size(out.tensors) <= target and out.pruned > 0
    changed_costs, kept_costs = [], []
    for old, new in zip(tensors, out.tensors):
        if not (old.quantized and block_weight(old.name)):
            assert old is new
            continue
        changed = old.q != new.q
        assert (old.q[changed].abs() == 1).all() and (new.q[changed] == 0).all()
        costs = old.scale.float()[:, None].pow(2).expand_as(old.q)
        changed_costs.append(costs[changed])
        kept_costs.append(costs[(old.q.abs() == 1) & ~changed])
    assert sum(c.numel() for c in changed_costs) == out.pruned
    assert torch.cat(changed_costs).max() <= torch.cat(kept_costs).min()
    # Minimal: one entry fewer does not fit.
    fewer = _zero_cheapest(tensors, *prune_order(tensors), out.pruned - 1)
    assert _size(fewer) > target


def test_pruning_targets_change_the_result_and_impossible_targets_change_nothing():
    tensors = run(cfg()).tensors
    before = _size(tensors)
    near, far = prune_to_target(tensors, before - 50, _size), prune_to_target(tensors, before - 300, _size)
    assert 0 < near.pruned < far.pruned
    fits_already = prune_to_target(tensors, before, _size)
    assert fits_already.pruned == 0 and fits_already.fits and fits_already.tensors == tensors
    hopeless = prune_to_target(tensors, 100, _size)
    assert not hopeless.fits and hopeless.pruned == 0 and hopeless.tensors == tensors
    no_candidates = [t for t in tensors if block_weight(t.name) is None]
    assert prune_to_target(no_candidates, 10**9, _size).fits
    assert not prune_to_target(no_candidates, 100, _size).fits


def test_config_validation_names_the_key():
    from pgolf.config import from_params
    from pgolf.errors import ParamError
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(BASE).items()}
    for key, bad in (("damp", -1.0), ("attn_bits", 9), ("clip_candidates", [0.0]), ("zstd_level", 0),
                     ("compressor", "gzip")):
        with pytest.raises(ParamError, match=f"quantize.{key}"):
            from_params(QuantizeConfig, {"quantize": {**raw, key: bad}}, "quantize")


def test_encode_cache_compresses_each_tensor_once(monkeypatch):
    tensors = quantize_state_dict(STATE, HESSIANS, TOKENS, BASE, CPU).tensors
    compressed = []
    real_frames = encode_cache_mod.tensor_frames
    monkeypatch.setattr(encode_cache_mod, "tensor_frames", lambda ts, *a: compressed.extend(ts) or real_frames(ts, *a))
    cache = encode_cache_mod.EncodeCache({"d": 1}, {"m": 2}, BASE)
    first = cache.encode(tensors)
    assert first == encode(tensors, {"d": 1}, {"m": 2}, BASE.compressor, BASE.compression_level)
    assert cache.encode(list(tensors)) is first and len(compressed) == len(tensors)  # same objects, new list
    pruned = prune_to_target(tensors, len(first) - 40, lambda ts: len(cache.encode(ts))).tensors
    assert cache.encode(pruned) != first
    assert encode(pruned, {"d": 1}, {"m": 2}, BASE.compressor, BASE.compression_level) == cache.encode(pruned)
    # Only tensors the probes changed were compressed again.
    changed = {id(t) for t in compressed[len(tensors):]}
    assert changed and all(id(t) not in changed for t in tensors)
    assert len({id(t) for t in compressed}) == len(compressed)  # none compressed twice


def test_pruning_search_interpolates_to_the_exact_count_in_few_probes():
    tensors = run(cfg()).tensors
    owner, flat = prune_order(tensors)
    total = int(owner.numel())
    zeros0 = sum(int((t.q == 0).sum()) for t in tensors if t.quantized)

    def linear_size(ts) -> int:  # 3 bytes saved per zeroed entry: what an encode roughly does
        return 100_000 - 3 * (sum(int((t.q == 0).sum()) for t in ts if t.quantized) - zeros0)

    want = total * 2 // 3
    out = prune_to_target(tensors, 100_000 - 3 * want, linear_size)
    assert out.fits and out.pruned == want  # exactly the fewest
    assert out.probes <= 5 < math.ceil(math.log2(total)) + 2  # a plain bisection would need ~log2(total)
    noisy = prune_to_target(tensors, 100_000 - 3 * want,
                            lambda ts: linear_size(ts) + (7 if linear_size(ts) % 2 else 0))
    assert noisy.fits and noisy.size_bytes <= 100_000 - 3 * want
    assert noisy.probes <= 2 * math.ceil(math.log2(total)) + 2
