"""Frontier quantisation (docs/FRONTIER.md §4.1–§4.5): routing, SDClip, AWQ-lite, head Hessian, recurrence."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pgolf.errors import DataError
from pgolf.quant.artifact import decode, dequantize, encode
from pgolf.quant.awq import select_groups
from pgolf.quant.clip import sdclip_scales
from pgolf.quant.gptq import gptq_quantize
from pgolf.quant.grid import round_to_fp16
from pgolf.quant.hessian_file import HEAD_HESSIAN_KEY, hessian_key_for_module
from pgolf.quant.hessians import collect_hessians
from pgolf.quant.policy import QuantizeConfig, quantize_state_dict, realised_weights
from pgolf.quant.routing import solved_bits, tensor_class
from tests.helpers.models import tiny_model

F64 = torch.float64
CPU = torch.device("cpu")

BASE = QuantizeConfig(
    method="gptq", damp=0.01, block_size=8, act_order=True, clip_candidates=(0.99, 1.0),
    clip_metric="weight_mse", attn_bits=6, mlp_bits=6, embed_bits=7, embed_clip_quantile=0.9999,
    passthrough_numel=64, compressor="zstd", zstd_level=3, lzma_preset=6, prune=False, prune_margin_bytes=0)
FRONTIER = dataclasses.replace(BASE, clip="sdclip", embed_method="gptq", gate_int8=True, awq_top_k=1,
                               awq_group_size=8)


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def _hessian(width: int, g: torch.Generator, rows: int = 300) -> torch.Tensor:
    mix = torch.randn(width, width, generator=g, dtype=F64) / width ** 0.5 + 0.3 * torch.eye(width, dtype=F64)
    x = torch.randn(rows, width, generator=g, dtype=F64) @ mix
    return (x.T @ x).float()


def reference_sdclip_gptq(w: torch.Tensor, h: torch.Tensor, k: float, bits: int, damp: float,
                          protect: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/FRONTIER.md §4.3 written plainly in float64, one column at a time (no blocks).

    Returns (q int64 [R, N], s [R], s_hi [R]) in the original column order; ``protect`` [N] bool marks
    AWQ-lite's columns (s_hi = k·std/127, clamp ±127).
    """
    w = w.to(F64).clone()
    h = h.to(F64).clone()
    n = w.shape[1]
    qmax = 2 ** (bits - 1) - 1
    std = w.std(dim=1, unbiased=True)
    s = round_to_fp16((k * std / qmax).float()).to(F64)  # the fp16 value the artifact stores
    s_hi = round_to_fp16((k * std / 127).float()).to(F64)
    for j in range(n):  # 1. dead columns
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=F64)  # 2. damping, once
    perm = sorted(range(n), key=lambda c: (-float(h[c, c]), c))  # 3. act-order (stable)
    w, h = w[:, perm], h[perm][:, perm]
    hi = protect[perm] if protect is not None else torch.zeros(n, dtype=torch.bool)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # 4. U with UᵀU = H⁻¹
    q = torch.zeros_like(w)
    for j in range(n):  # 6. the sweep, column by column
        scale, lim = (s_hi, 127) if hi[j] else (s, qmax)
        q[:, j] = torch.clamp(torch.round(w[:, j] / scale), -lim, lim)
        err = (w[:, j] - q[:, j] * scale) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    out = torch.empty_like(q)
    out[:, perm] = q  # 7. undo the permutation
    return out.long(), s, s_hi


def test_sdclip_gptq_matches_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 24, 40, generator=g) * 0.02 * torch.exp(0.5 * torch.randn(4, 24, 40, generator=g))
    h = torch.stack([_hessian(40, g) for _ in range(4)])
    h[1, 5, :] = 0.0
    h[1, :, 5] = 0.0  # a dead column
    scales = sdclip_scales(w, 6, 13.0)
    out = gptq_quantize(w.double(), h, scales.double(), 6, damp=0.01, block_size=8, act_order=True, dtype=F64)
    for b in range(4):
        q_ref, s_ref, _ = reference_sdclip_gptq(w[b], h[b], 13.0, 6, 0.01)
        # Scales: the float32 std rounds to the same fp16 value as the float64 one (exact; the
        # relative gap between the two stds, ~1e-7, is far below fp16's 2^-11 spacing).
        assert torch.equal(scales[b, 0].double(), s_ref)
        # Float64 sweep, blocked vs column by column: the same integers exactly.
        assert torch.equal(out.q[b, 0].long(), q_ref)


def test_policy_sdclip_uses_the_class_k_and_stays_within_one_step_of_the_reference():
    g = torch.Generator().manual_seed(4)
    state = {"blocks.0.attn.c_q.weight": torch.randn(16, 16, generator=g) * 0.02,
             "blocks.0.mlp.fc.weight": torch.randn(32, 16, generator=g) * 0.02}
    hs = {"blocks.0.attn.qkv": _hessian(16, g), "blocks.0.mlp.fc": _hessian(16, g)}
    cfg = dataclasses.replace(BASE, clip="sdclip", sdclip_k_attn=9.0, sdclip_k_mlp=5.0)
    result = quantize_state_dict(state, hs, 300, cfg, CPU)
    rows = {r["name"]: r for r in result.report}
    for name, key, k in (("blocks.0.attn.c_q.weight", "blocks.0.attn.qkv", 9.0),
                         ("blocks.0.mlp.fc.weight", "blocks.0.mlp.fc", 5.0)):
        stored = next(t for t in result.tensors if t.name == name)
        q_ref, s_ref, _ = reference_sdclip_gptq(state[name], hs[key], k, 6, 0.01)
        assert torch.equal(stored.scale.double(), s_ref)
        # The policy sweeps in float32: an integer may round the other way, never by more than one
        # step, and only rarely (tolerance: 2 % of the entries).
        diff = (stored.q.long() - q_ref).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02
        assert rows[name]["clip"] == k and rows[name]["clip_rule"] == "sdclip"


def _frontier_state(g: torch.Generator, tied: bool = True) -> tuple[dict, dict]:
    state = {"tok_emb.weight": torch.randn(48, 16, generator=g) * 0.05,
             "blocks.0.attn.attn_gate_w": torch.randn(4, 12, generator=g) * 0.3,
             "blocks.0.attn.q_gain": torch.ones(4),
             "blocks.0.attn.c_q.weight": torch.randn(16, 16, generator=g) * 0.02,
             "blocks.0.mlp.fc.weight": torch.randn(32, 16, generator=g) * 0.02,
             "blocks.0.mlp.proj.weight": torch.randn(16, 32, generator=g) * 0.02}
    if not tied:
        state["lm_head.weight"] = torch.randn(48, 16, generator=g) * 0.05
    hs = {"blocks.0.attn.qkv": _hessian(16, g), "blocks.0.mlp.fc": _hessian(16, g),
          "blocks.0.mlp.proj": _hessian(32, g), HEAD_HESSIAN_KEY: _hessian(16, g)}
    return state, hs


def test_routing_rules():
    g = torch.Generator().manual_seed(5)
    state, _ = _frontier_state(g)
    assert tensor_class("blocks.0.attn.attn_gate_w", state["blocks.0.attn.attn_gate_w"], FRONTIER) == "gate"
    assert tensor_class("blocks.0.attn.attn_gate_w", state["blocks.0.attn.attn_gate_w"], BASE) == "passthrough"
    assert tensor_class("blocks.0.attn.attn_gate_w", torch.zeros(4, 4), FRONTIER) == "passthrough"  # 16 < 32
    assert solved_bits(state, FRONTIER) == {"tok_emb.weight": 7, "blocks.0.attn.c_q.weight": 6,
                                            "blocks.0.mlp.fc.weight": 6, "blocks.0.mlp.proj.weight": 6}
    assert "tok_emb.weight" not in solved_bits(state, BASE)
    untied, _ = _frontier_state(g, tied=False)  # an untied embedding is a lookup table: no output Hessian
    assert "tok_emb.weight" not in solved_bits(untied, FRONTIER)


def test_gate_is_int8_per_row_of_the_row_max():
    g = torch.Generator().manual_seed(6)
    state, hs = _frontier_state(g)
    result = quantize_state_dict(state, hs, 300, dataclasses.replace(FRONTIER, awq_top_k=0), CPU)
    gate = next(t for t in result.tensors if t.name == "blocks.0.attn.attn_gate_w")
    w = state["blocks.0.attn.attn_gate_w"].double()
    s_ref = round_to_fp16((w.abs().amax(dim=1) / 127).float()).double()
    assert gate.bits == 8 and torch.equal(gate.scale.double(), s_ref)
    assert torch.equal(gate.q.long(), torch.round(w / s_ref[:, None]).clamp(-127, 127).long())


def test_tied_embedding_goes_through_gptq_with_the_head_hessian():
    g = torch.Generator().manual_seed(7)
    state, hs = _frontier_state(g)
    cfg = dataclasses.replace(FRONTIER, awq_top_k=0)
    result = quantize_state_dict(state, hs, 300, cfg, CPU)
    emb = next(t for t in result.tensors if t.name == "tok_emb.weight")
    q_ref, s_ref, _ = reference_sdclip_gptq(state["tok_emb.weight"], hs[HEAD_HESSIAN_KEY], 14.0, 7, 0.01)
    assert emb.bits == 7 and torch.equal(emb.scale.double(), s_ref)
    diff = (emb.q.long() - q_ref).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02
    missing = {k: v for k, v in hs.items() if k != HEAD_HESSIAN_KEY}
    with pytest.raises(DataError, match="no Hessian 'head' for tok_emb.weight"):
        quantize_state_dict(state, missing, 300, cfg, CPU, "h.pt")


def brute_force_groups(candidates: dict, group: int, top_k: int) -> list[tuple[str, int]]:
    """Every aligned full group of every tensor scored with explicit loops, best first."""
    scored = []
    for name, (w, rms) in candidates.items():
        rows, cols = w.shape
        for start in range(0, cols - group + 1, group):
            total = 0.0
            for c in range(start, start + group):
                total += float(rms[c]) * sum(abs(float(w[r, c])) for r in range(rows)) / rows
            scored.append((-total, name, start))
    return [(name, start) for _, name, start in sorted(scored)[:top_k]]


@pytest.mark.parametrize("top_k", [1, 3])
def test_awq_group_selection_matches_brute_force(top_k):
    g = torch.Generator().manual_seed(8)
    candidates = {f"t{i}": (torch.randn(6, 20, generator=g), torch.rand(20, generator=g) * (i + 1))
                  for i in range(3)}
    chosen = select_groups(candidates, 4, top_k)
    got = sorted((name, start) for name, (starts, _) in chosen.items() for start in starts)
    assert got == sorted(brute_force_groups(candidates, 4, top_k))


def test_protected_columns_have_less_error_than_int6_and_match_the_reference():
    g = torch.Generator().manual_seed(9)
    state, hs = _frontier_state(g)
    rms = {k: torch.sqrt(torch.diagonal(h) / 300) for k, h in hs.items()}
    rms["blocks.0.mlp.fc"][8:16] *= 50.0  # make one group of mlp.fc clearly the most salient
    result = quantize_state_dict(state, hs, 300, FRONTIER, CPU, act_rms=rms)
    rows = {r["name"]: r for r in result.report}
    assert rows["blocks.0.mlp.fc.weight"]["awq"]["starts"] == [8]
    assert sum(1 for r in result.report if r.get("awq")) == 1  # top-1 model-wide
    plain = quantize_state_dict(state, hs, 300, dataclasses.replace(FRONTIER, awq_top_k=0), CPU)
    w, hi = realised_weights(state, result.tensors)["blocks.0.mlp.fc.weight"]
    _, lo = realised_weights(state, plain.tensors)["blocks.0.mlp.fc.weight"]
    err_hi = (w[:, 8:16] - hi[:, 8:16]).double().pow(2).sum()
    err_lo = (w[:, 8:16] - lo[:, 8:16]).double().pow(2).sum()
    assert err_hi <= err_lo
    protect = torch.zeros(16, dtype=torch.bool)
    protect[8:16] = True
    stored = next(t for t in result.tensors if t.name == "blocks.0.mlp.fc.weight")
    q_ref, s_ref, s_hi_ref = reference_sdclip_gptq(state["blocks.0.mlp.fc.weight"], hs["blocks.0.mlp.fc"], 11.5, 6,
                                                   0.01, protect)
    assert torch.equal(stored.protect.scale.double(), s_hi_ref)
    diff = (stored.q.long() - q_ref).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02
    assert bool((stored.protect.scale.float() < stored.scale.float() / 3).all())  # ~31/127 of the int6 step


def test_awq_needs_activation_rms():
    g = torch.Generator().manual_seed(10)
    state, hs = _frontier_state(g)
    with pytest.raises(DataError, match="activation RMS"):
        quantize_state_dict(state, hs, 300, FRONTIER, CPU, "h.pt")


def test_artifact_round_trip_with_protected_columns():
    g = torch.Generator().manual_seed(11)
    state, hs = _frontier_state(g)
    rms = {k: torch.sqrt(torch.diagonal(h) / 300) for k, h in hs.items()}
    result = quantize_state_dict(state, hs, 300, FRONTIER, CPU, act_rms=rms)
    blob = encode(result.tensors, {"d": 1}, {}, "zstd", 3)
    back = decode(blob)
    restored = dequantize(back)
    for name, (_, realised) in realised_weights(state, result.tensors).items():
        assert torch.equal(restored[name].float().reshape(realised.shape), realised)
    protected = [t for t in back.tensors if t.protect is not None]
    assert len(protected) == 1 and protected[0].protect.size == 8
    # A protected group that points past the columns is refused.
    bad = [dataclasses.replace(t, protect=dataclasses.replace(t.protect, starts=torch.tensor([100], dtype=torch.int16)))
           if t.protect is not None else t for t in result.tensors]
    with pytest.raises(DataError, match="fall outside"):
        decode(encode(bad, {"d": 1}, {}, "zstd", 3))


def recurrent_model():
    return tiny_model(0, num_layers=7, xsa_layers=[2], ve_layers=[], recur_start=3, recur_end=5, recur_loops=2)


def test_recurrent_hessians_sum_every_visit_and_head_and_rms_match_a_plain_recompute():
    model = recurrent_model()
    assert model.looping
    ids = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(1))
    # Reference without hooks: wrap each block linear's forward to record its inputs.
    seen: dict[str, list[torch.Tensor]] = {}
    originals = {}
    for name, module in model.named_modules():
        if hessian_key_for_module(name) is not None:
            originals[name] = module.forward

            def recording(x, *rest, _name=name, _orig=module.forward):
                seen.setdefault(_name, []).append(x.detach().clone())
                return _orig(x, *rest)
            module.forward = recording
    with torch.no_grad():
        hidden = model.final_hidden(ids)
    for name, module in model.named_modules():
        if name in originals:
            del module.forward
    assert {len(seen[f"blocks.{i}.attn.c_q"]) for i in (3, 4, 5)} == {3}
    assert {len(seen[f"blocks.{i}.mlp.fc"]) for i in (0, 1, 2, 6)} == {1}
    hs = collect_hessians(model, [ids], CPU, no_autocast, head=True, activation_rms=True)
    for name, inputs in seen.items():
        if not name.endswith(("c_k", "c_v")):
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).to(F64)
            key = hessian_key_for_module(name)
            torch.testing.assert_close(hs.hessians[key].double(), flat.T @ flat, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hs.act_rms[key].double(), flat.pow(2).mean(dim=0).sqrt(),
                                       rtol=1e-5, atol=1e-7)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(F64)
    torch.testing.assert_close(hs.hessians[HEAD_HESSIAN_KEY].double(), flat.T @ flat, rtol=1e-5, atol=1e-6)
    assert hs.num_tokens == ids.numel()
    plain = collect_hessians(model, [ids], CPU, no_autocast)
    assert HEAD_HESSIAN_KEY not in plain.hessians and plain.act_rms == {}
    assert all(torch.equal(plain.hessians[k], hs.hessians[k]) for k in plain.hessians)
    assert not math.isnan(float(hs.act_rms[HEAD_HESSIAN_KEY].sum()))


def test_hessian_file_round_trips_act_rms_and_rejects_a_mismatched_one(tmp_path):
    from pgolf.quant.hessian_file import HessianSet, load_hessians, save_hessians
    g = torch.Generator().manual_seed(12)
    hs = HessianSet({"blocks.0.mlp.fc": _hessian(8, g), HEAD_HESSIAN_KEY: _hessian(8, g)}, 300, 3,
                    act_rms={"blocks.0.mlp.fc": torch.rand(8, generator=g), HEAD_HESSIAN_KEY: torch.rand(8, generator=g)})
    save_hessians(tmp_path / "h.pt", hs)
    back = load_hessians(tmp_path / "h.pt")
    assert set(back.act_rms) == set(hs.act_rms)
    assert all(torch.equal(back.act_rms[k], hs.act_rms[k]) for k in hs.act_rms)
    save_hessians(tmp_path / "plain.pt", dataclasses.replace(hs, act_rms={}))
    assert load_hessians(tmp_path / "plain.pt").act_rms == {}
    save_hessians(tmp_path / "bad.pt", dataclasses.replace(hs, act_rms={"blocks.0.mlp.fc": torch.rand(5)}))
    with pytest.raises(DataError, match="act_rms 'blocks.0.mlp.fc' does not match"):
        load_hessians(tmp_path / "bad.pt")


def test_pruning_costs_protected_entries_at_their_own_scale():
    from pgolf.quant.pruning import prune_order
    from pgolf.quant.protected import ProtectedColumns
    from pgolf.quant.artifact import StoredTensor
    q = torch.ones(2, 4, dtype=torch.int8)
    t = StoredTensor("blocks.0.mlp.fc.weight", (2, 4), "float32", "gptq", 6, q, torch.tensor([1.0, 2.0]).half(),
                     protect=ProtectedColumns(torch.tensor([2], dtype=torch.int16), 2, torch.tensor([0.1, 0.2]).half()))
    owner, flat = prune_order([t])
    # Protected entries (columns 2, 3) cost 0.01 / 0.04, row 0's others 1, row 1's others 4.
    assert flat.tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
