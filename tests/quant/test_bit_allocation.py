"""Fitting the artifact to the byte limit: entropy estimate, greedy demotion, the library and the stage."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

import stages.hessians
import stages.quantize
from pgolf.quant.artifact import StoredTensor, compress_bytes, encode, read_artifact
from pgolf.quant.restore import load_dequantized_model
from pgolf.quant.bit_allocation import (Option, code_entropy_bits, compressed_alone_bytes, estimated_bytes,
                                  fit_to_limit, greedy_demote)
from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.quant.policy import QuantizeConfig, quantize_state_dict, tensor_class
from pgolf.submission.size import LIMIT_BYTES, bundle_reserved_bytes
from tests.helpers.models import quant_params as params, write_quant_root

F64 = torch.float64
CPU = torch.device("cpu")
D, KV, HID, LAYERS, TOKENS = 32, 16, 64, 2, 500

BASE = QuantizeConfig(
    method="gptq", damp=0.01, block_size=16, act_order=True, clip_candidates=(0.99, 1.0),
    clip_metric="weight_mse", attn_bits=6, mlp_bits=6, embed_bits=8, embed_clip_quantile=0.9999,
    passthrough_numel=300, compressor="zstd", zstd_level=3, lzma_preset=6, prune=False,
    prune_margin_bytes=0, fit_to_limit=True, fit_min_bits=5)


def cfg(**changes) -> QuantizeConfig:
    return dataclasses.replace(BASE, **changes)


# --------------------------------------------------------------- size estimate
def test_entropy_estimate_equals_a_hand_computation():
    q = torch.tensor([[0, 0, 0, 1], [-1, 0, 2, 2]], dtype=torch.int8)
    # counts: 0 ×4, 2 ×2, 1 ×1, −1 ×1 of N = 8 → 4·log2(8/4) + 2·log2(8/2) + 1·log2(8) + 1·log2(8) = 14 bits
    assert code_entropy_bits(q) == pytest.approx(14.0, abs=1e-12)
    t = StoredTensor(name="m", shape=(2, 4), dtype="float32", method="gptq", bits=6, q=q,
                     scale=torch.ones(2, dtype=torch.float16))
    assert estimated_bytes(t) == pytest.approx(14 / 8 + 2 * 2, abs=1e-12)
    raw = StoredTensor(name="r", shape=(3, 5), dtype="float32", method="passthrough",
                       raw=torch.zeros(3, 5, dtype=torch.float16))
    assert estimated_bytes(raw) == 30.0
    assert code_entropy_bits(torch.full((7,), 3, dtype=torch.int8)) == 0.0  # one symbol carries no information


# --------------------------------------------------------------- greedy rule
def _codes_tensor(name: str, codes: torch.Tensor, bits: int) -> StoredTensor:
    return StoredTensor(name=name, shape=tuple(codes.shape), dtype="float32", method="gptq", bits=bits,
                        q=codes.to(torch.int8), scale=torch.full((codes.shape[0],), 0.01, dtype=torch.float16))


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_compressed_alone_tracks_the_real_encode_where_entropy_does_not():
    g = torch.Generator().manual_seed(0)
    wide = _codes_tensor("wide", torch.randn(1024, 512, generator=g).mul(9.4).round().clamp(-31, 31), 6)
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 0.8 / 1.4).sample((1024, 512))
    peaked = _codes_tensor("peaked", laplace.round().clamp(-15, 15), 5)
    real = {t.name: len(encode([t], {}, {}, "zstd", 19)) for t in (wide, peaked)}
    alone = dict(zip(("wide", "peaked"), compressed_alone_bytes([wide, peaked], "zstd", 19)))
    entropy = {t.name: estimated_bytes(t) for t in (wide, peaked)}
    # Ratios to the real single-tensor encodes (which add a small index and header): measured
    # 1.002 / 1.011 against the tensors compressed alone, 1.005 / 1.040 against their entropy.
    alone_spread = real["peaked"] / alone["peaked"] - real["wide"] / alone["wide"]
    entropy_spread = real["peaked"] / entropy["peaked"] - real["wide"] / entropy["wide"]
    assert abs(alone_spread) < 0.015 < entropy_spread  # peaked codes cost more than their entropy says
    assert alone["wide"] == len(compress_bytes(wide.q.numpy().tobytes() + wide.scale.numpy().tobytes(),
                                               "zstd", 19))


def table(*rows: tuple[int, float, float]) -> list[Option]:
    return [Option(bits, size, err) for bits, size, err in rows]


# Step ratios (Δerror / Δbytes): A 6→5 0.1, A 5→4 0.4; B 6→5 0.2, B 5→4 1.0; C 6→5 0.1 (ties A, name wins).
HAND = {"B": table((6, 200, 0), (5, 150, 10), (4, 120, 40)),
        "A": table((6, 100, 0), (5, 80, 2), (4, 65, 8)),
        "C": table((6, 50, 0), (5, 40, 1))}


@pytest.mark.parametrize("budget,expected", [
    (350, {"A": 0, "B": 0, "C": 0}),  # already within: nothing moves
    (330, {"A": 1, "B": 0, "C": 0}),  # 350 → 330
    (325, {"A": 1, "B": 0, "C": 1}),  # → 320: the tie at 0.1 goes to A first, then C
    (300, {"A": 1, "B": 1, "C": 1}),  # → 270
    (260, {"A": 2, "B": 1, "C": 1}),  # → 255
    (100, {"A": 2, "B": 2, "C": 1}),  # unreachable: everything at its last option (225)
])
def test_greedy_takes_the_cheapest_error_per_byte_first(budget, expected):
    assert greedy_demote(HAND, {n: 0 for n in HAND}, budget) == expected


def test_greedy_continues_from_a_given_start_and_skips_steps_that_save_nothing():
    assert greedy_demote(HAND, {"A": 1, "B": 0, "C": 1}, 260) == {"A": 2, "B": 1, "C": 1}
    flat = {"X": table((6, 100, 0), (5, 100, 0.0), (4, 50, 1)), "Y": table((6, 100, 0), (5, 90, 50))}
    # X's first step saves nothing (inf), so Y's costly step goes first; X moves only when Y is exhausted.
    assert greedy_demote(flat, {"X": 0, "Y": 0}, 195) == {"X": 0, "Y": 1}
    assert greedy_demote(flat, {"X": 0, "Y": 0}, 150) == {"X": 2, "Y": 1}


def random_convex_tables(seed: int, matrices: int = 4, levels: int = 3) -> dict[str, list[Option]]:
    """Tables whose error-per-byte ratio grows with each step down (diminishing returns)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(matrices):
        size, err, ratio = 100 + 100 * float(torch.rand((), generator=g)), 0.0, 0.0
        rows = [(6, size, err)]
        for lv in range(1, levels):
            saved = 5 + 30 * float(torch.rand((), generator=g))
            ratio += 0.05 + float(torch.rand((), generator=g))
            size, err = size - saved, err + ratio * saved
            rows.append((6 - lv, size, err))
        out[f"m{m}"] = table(*rows)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_greedy_prefixes_are_optimal_against_exhaustive_search(seed):
    """With diminishing returns, every greedy stop point has the least total error of any
    assignment at most its size (it is on the lower convex hull): checked by enumeration."""
    tables = random_convex_tables(seed)
    names = sorted(tables)
    everything = list(itertools.product(*[range(len(tables[n])) for n in names]))

    def totals(levels: dict[str, int]) -> tuple[float, float]:
        return (math.fsum(tables[n][levels[n]].est_bytes for n in names),
                math.fsum(tables[n][levels[n]].error for n in names))

    full, _ = totals({n: 0 for n in names})
    smallest, _ = totals({n: len(tables[n]) - 1 for n in names})
    stops = set()
    for budget in torch.linspace(smallest - 1, full, 60).tolist():
        levels = greedy_demote(tables, {n: 0 for n in names}, budget)
        size, error = totals(levels)
        assert size <= budget or all(levels[n] == len(tables[n]) - 1 for n in names)
        best = min(totals(dict(zip(names, combo)))[1] for combo in everything
                   if totals(dict(zip(names, combo)))[0] <= size + 1e-9)
        assert error <= best + 1e-9, (budget, levels)
        stops.add(tuple(levels[n] for n in names))
    assert len(stops) >= len(names) + 1  # the sweep visited many stop points, not just the ends


# --------------------------------------------------------------- library end to end
def _hessian(width: int, g: torch.Generator) -> torch.Tensor:
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + 0.3 * torch.eye(width)
    x = torch.randn(TOKENS, width, generator=g) @ mix
    return (x.to(F64).T @ x.to(F64)).float()


def synthetic_model(seed: int = 0):
    """Unbanked state dict of a 2-layer model (MLP matrices larger than attention ones) and Hessians."""
    g = torch.Generator().manual_seed(seed)

    def gaussian(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    state = {"tok_emb.weight": gaussian(64, D), "norm.weight": torch.ones(D)}
    hessians = {}
    for i in range(LAYERS):
        p = f"blocks.{i}"
        state.update({f"{p}.attn.c_q.weight": gaussian(D, D), f"{p}.attn.c_k.weight": gaussian(KV, D),
                      f"{p}.attn.c_v.weight": gaussian(KV, D), f"{p}.attn.proj.weight": gaussian(D, D),
                      f"{p}.mlp.fc.weight": gaussian(HID, D), f"{p}.mlp.proj.weight": gaussian(D, HID)})
        hessians.update({f"{p}.attn.qkv": _hessian(D, g), f"{p}.attn.proj": _hessian(D, g),
                         f"{p}.mlp.fc": _hessian(D, g), f"{p}.mlp.proj": _hessian(HID, g)})
    return state, hessians


STATE, HESSIANS = synthetic_model()
BLOCKS = sorted(n for n in STATE if tensor_class(n, STATE[n], BASE) in ("attn", "mlp"))


def size_of(tensors) -> int:
    return len(encode(tensors, {}, {}, "zstd", 3))


def quantized(config: QuantizeConfig, hessians=HESSIANS):
    return quantize_state_dict(STATE, hessians, TOKENS, config, CPU, "h.pt")


def fit(config: QuantizeConfig, target: int, result=None, hessians=HESSIANS):
    result = result if result is not None else quantized(config, hessians)
    return fit_to_limit(result, STATE, hessians, TOKENS, config, CPU, target, size_of, "h.pt")


@pytest.fixture(scope="module")
def sizes(one_thread_module):
    """Encoded bytes with every block matrix at 6, 5 and 4 bits, and the 6- and 5-bit results."""
    six, five, four = (quantized(cfg(attn_bits=b, mlp_bits=b, fit_to_limit=False)) for b in (6, 5, 4))
    return {"six": size_of(six.tensors), "five": size_of(five.tensors), "four": size_of(four.tensors),
            "result6": six, "result5": five}


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_through_the_stage_cache_compresses_each_tensor_once(sizes, monkeypatch):
    import pgolf.quant.encode_cache as encode_cache_mod
    compressed = []
    real_frames = encode_cache_mod.tensor_frames
    monkeypatch.setattr(encode_cache_mod, "tensor_frames", lambda ts, *a: compressed.extend(ts) or real_frames(ts, *a))
    cache = encode_cache_mod.EncodeCache({}, {}, cfg())
    target = (sizes["six"] + sizes["five"]) // 2
    out = fit_to_limit(sizes["result6"], STATE, HESSIANS, TOKENS, cfg(), CPU, target,
                       lambda ts: len(cache.encode(ts)), "h.pt",
                       frame_sizes=lambda ts: [len(f) for f in cache.frames(ts)])
    assert out.fits and len(out.rounds) >= 1
    assert len({id(t) for t in compressed}) == len(compressed)  # no frame compressed twice
    # Every 5-bit option was sized through the cache, chosen or not.
    assert sum(t.bits == 5 for t in compressed if t.quantized) == len(BLOCKS)
    # Same answer as sizing every option on its own.
    alone = fit_to_limit(sizes["result6"], STATE, HESSIANS, TOKENS, cfg(), CPU, target,
                         lambda ts: len(cache.encode(ts)), "h.pt")
    assert (alone.bits, alone.size_bytes) == (out.bits, out.size_bytes)


def test_fit_reaches_a_target_between_int6_and_int5(sizes):
    assert sizes["six"] > sizes["five"] > sizes["four"]
    target = (sizes["six"] + sizes["five"]) // 2
    six, five = sizes["result6"], sizes["result5"]
    out = fit(cfg(), target, six)
    assert out.fits and out.size_bytes <= target and size_of(out.tensors) == out.size_bytes
    assert out.initial_bytes == sizes["six"] and len(out.rounds) >= 1
    assert 0 < out.demoted < len(BLOCKS)
    by_name6 = {t.name: t for t in six.tensors}
    by_name5 = {t.name: t for t in five.tensors}
    rows6, rows5 = ({r["name"]: r for r in res.report} for res in (six, five))
    demoted = []
    for t, row in zip(out.tensors, out.report):
        assert row["name"] == t.name and row["bits"] == t.bits
        if t.name not in BLOCKS:
            assert t is by_name6[t.name] and row is rows6[t.name]  # only block matrices are touched
            continue
        assert t.bits in (5, 6) and out.bits[t.name] == t.bits
        # A demoted matrix is exactly what quantising it at 5 bits gives: the same GPTQ and clip search.
        same = by_name5[t.name] if t.bits == 5 else by_name6[t.name]
        assert torch.equal(t.q, same.q) and torch.equal(t.scale, same.scale)
        assert row == (rows5 if t.bits == 5 else rows6)[t.name]
        if t.bits == 5:
            demoted.append(t.name)
    assert len(demoted) == out.demoted and out.error_metric == "hessian"
    expected = math.fsum(rows5[n]["hessian_error"] - rows6[n]["hessian_error"] for n in demoted)
    assert out.error_increase == pytest.approx(expected, rel=1e-12)
    again = fit(cfg(), target)
    assert encode(again.tensors, {}, {}, "zstd", 3) == encode(out.tensors, {}, {}, "zstd", 3)


def test_bracket_search_returns_a_probed_fitting_prefix_despite_non_monotone_sizes(sizes):
    import pgolf.quant.bit_allocation as alloc
    target = (sizes["six"] + sizes["five"]) // 2
    six = sizes["result6"]
    probes: list[tuple[int, int]] = []

    def demoted(tensors) -> int:
        return sum(1 for t in tensors if t.name in BLOCKS and t.bits == 5)

    def bumpy_size(tensors) -> int:
        # Real size plus a bump on every odd number of demoted matrices: not monotone.
        size = size_of(tensors) + (400 if demoted(tensors) % 2 else 0)
        probes.append((demoted(tensors), size))
        return size

    out = fit_to_limit(six, STATE, HESSIANS, TOKENS, cfg(), CPU, target, bumpy_size, "h.pt")
    assert out.fits and out.size_bytes <= target and out.size_bytes == bumpy_size(out.tensors)
    probes.pop()
    assert len(out.rounds) <= alloc.MAX_ROUNDS + 1 and len(probes) == 1 + len(out.rounds)
    # The answer is the fewest-demotion probe that fitted.
    fitted = [d for d, size in probes[1:] if size <= target]
    assert out.demoted == min(fitted)
    # No probe with fewer demotions than the answer fitted, so stopping there was right.
    assert all(size > target for d, size in probes if d < out.demoted)


def test_demotion_order_prefixes_are_the_greedy_for_every_budget():
    import pgolf.quant.bit_allocation as alloc
    tables = random_convex_tables(3, matrices=5, levels=3)
    order = alloc.demotion_order(tables, {n: 0 for n in tables})
    assert len(order) == sum(len(t) - 1 for t in tables.values())
    for k in range(len(order) + 1):
        levels = {n: order[:k].count(n) for n in tables}
        budget = sum(tables[n][levels[n]].est_bytes for n in tables)
        assert greedy_demote(tables, {n: 0 for n in tables}, budget) == levels


def test_a_target_already_met_changes_nothing(sizes):
    six = sizes["result6"]
    out = fit(cfg(), sizes["six"], six)
    assert out.fits and out.demoted == 0 and out.rounds == [] and out.error_increase == 0.0
    assert out.tensors is six.tensors and out.report is six.report
    off = quantized(cfg(fit_to_limit=False))
    assert encode(out.tensors, {}, {}, "zstd", 3) == encode(off.tensors, {}, {}, "zstd", 3)


def test_an_unreachable_target_leaves_everything_at_fit_min_bits(sizes):
    out = fit(cfg(), sizes["five"] - 1, sizes["result6"])
    assert not out.fits and out.demoted == len(BLOCKS)
    assert set(out.bits.values()) == {5} and out.size_bytes == sizes["five"]


def test_fit_min_bits_decides_whether_a_low_target_fits(sizes):
    target = (sizes["five"] + sizes["four"]) // 2
    at5 = fit(cfg(fit_min_bits=5), target, sizes["result6"])
    at4 = fit(cfg(fit_min_bits=4), target, sizes["result6"])
    assert not at5.fits and min(at5.bits.values()) == 5
    assert at4.fits and at4.size_bytes <= target and min(at4.bits.values()) == 4
    assert all(b >= 4 for b in at4.bits.values())


def test_without_hessians_the_error_is_the_summed_squared_weight_error(sizes):
    rtn = cfg(method="rtn")
    result = quantized(rtn, hessians={})
    target = (size_of(result.tensors) + sizes["five"]) // 2
    out = fit(rtn, target, result, hessians={})
    assert out.fits and out.error_metric == "weight_sse" and out.demoted > 0
    rows = {r["name"]: r for r in result.report}
    demoted = [r for r in out.report if r["name"] in BLOCKS and r["bits"] == 5]
    expected = math.fsum((r["weight_mse"] - rows[r["name"]]["weight_mse"]) * STATE[r["name"]].numel()
                         for r in demoted)
    assert out.error_increase == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("key,value", [("fit_min_bits", 1), ("fit_min_bits", 9), ("fit_to_limit", "yes")])
def test_bad_fit_params_name_their_key(key, value):
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(BASE).items()}
    with pytest.raises(ParamError, match=f"quantize.{key}"):
        from_params(QuantizeConfig, {"quantize": {**raw, key: value}}, "quantize")


def test_fit_min_bits_must_leave_something_to_demote():
    with pytest.raises(ParamError, match="fit_min_bits: must be below attn_bits"):
        cfg(fit_min_bits=6)
    cfg(fit_min_bits=6, fit_to_limit=False)  # harmless when fitting is off
    cfg(fit_min_bits=6, mlp_bits=7)  # MLP matrices can still go 7 → 6


# --------------------------------------------------------------- stage
@pytest.mark.slow
def test_stage_fits_the_artifact_and_reports_the_bits(tmp_path):
    root = write_quant_root(tmp_path)
    stages.hessians.run(params(), root)
    off = stages.quantize.run(params(), root)
    off_bytes = (root / "artifacts/quant/model.ptz").read_bytes()
    code = bundle_reserved_bytes(root)
    margin = LIMIT_BYTES - code - (off["model_bytes"] - 300)  # target: 300 bytes below the int6 artifact
    m = stages.quantize.run(params(quantize={"fit_to_limit": True, "prune_margin_bytes": margin}), root)
    assert m["fit_fits"] and 0 < m["fit_demoted"] and m["fit_rounds"] >= 1
    assert m["model_bytes"] == m["fit_bytes"] <= m["fit_target_bytes"] == off["model_bytes"] - 300
    # The initial encode is the int6 artifact (its meta spells a longer prune_margin_bytes).
    assert 0 <= m["fit_initial_bytes"] - off["model_bytes"] < 20 and m["fit_code_bytes"] == code
    assert m["fit_error_metric"] == "hessian" and m["fit_error_increase"] > 0
    report = json.loads((root / "artifacts/quant/report.json").read_text())
    blocks = [r for r in report if r["class"] in ("attn", "mlp")]
    hist: dict[str, dict[str, int]] = {}
    for r in blocks:
        hist.setdefault(r["class"], {}).setdefault(str(r["bits"]), 0)
        hist[r["class"]][str(r["bits"])] += 1
    assert m["fit_bits_by_class"] == hist
    assert sum(r["bits"] == 5 for r in blocks) == m["fit_demoted"]
    stored = {t.name: t.bits for t in read_artifact(root / "artifacts/quant/model.ptz").tensors}
    assert all(stored[r["name"]] == r["bits"] for r in report if r["bits"] is not None)
    load_dequantized_model(root / "artifacts/quant/model.ptz", "cpu")  # the mixed-width artifact decodes
    log = (root / "artifacts/quant/quantize.log").read_text()
    assert "fit round 1:" in log and "matrices demoted" in log

    # Already within the target: the very same bytes as with fit_to_limit off.
    same = stages.quantize.run(params(quantize={"fit_to_limit": True}), root)
    assert same["fit_demoted"] == 0 and same["fit_fits"]
    assert (root / "artifacts/quant/model.ptz").read_bytes() == off_bytes
