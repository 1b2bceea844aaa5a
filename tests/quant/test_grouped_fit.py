"""The grouped layout's fit machinery: threaded frames, the frame memory, the row-order hook, the
faster L1 chain and the pruning search placed by a cheap estimate (pgolf/quant/encode_cache.py,
pgolf/quant/grouped.py, pgolf/quant/pruning.py)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pgolf.config import from_params
from pgolf.quant import compression
from pgolf.quant.artifact import decode, encode
from pgolf.quant.encode_cache import EncodeCache
from pgolf.quant.grouped import Packing, compress_frames
from pgolf.quant.policy import QuantizeConfig
from pgolf.quant.pruning import _zero_cheapest, prune_order, prune_to_target
from pgolf.quant.roles import role_grouping
from tests.helpers.models import quant_params
from tests.helpers.quantized import rtn_stored

ROLE_GROUPING = role_grouping()

SHAPES = {"attn.c_q": (32, 32), "attn.c_k": (16, 32), "attn.c_v": (16, 32), "attn.proj": (32, 32),
          "mlp.fc": (64, 32), "mlp.proj": (32, 64)}


def tiny_model(seed: int = 0, layers: int = 2) -> list:
    """Every role group, rows of varied width (so pruning has cheap and dear rows)."""
    g = torch.Generator().manual_seed(seed)
    ws = {"tok_emb.weight": torch.randn(48, 32, generator=g)}
    ws.update({f"blocks.{i}.{m}.weight": torch.randn(*s, generator=g) * torch.exp(torch.randn(s[0], 1, generator=g))
               for i in range(layers) for m, s in SHAPES.items()})
    return [rtn_stored(n, w, bits=4) for n, w in sorted(ws.items())]


def grouped_cfg(level: int = 9) -> QuantizeConfig:
    return from_params(QuantizeConfig, quant_params(quantize={"compression": "grouped", "zstd_level": level}),
                       "quantize")


def fresh(ts: list, cfg: QuantizeConfig) -> bytes:
    return encode(ts, {}, {}, cfg.compressor, cfg.compression_level, grouping=ROLE_GROUPING)


def with_one_change(ts: list, name: str) -> list:
    out = list(ts)
    i = next(i for i, t in enumerate(ts) if t.name == name)
    q = ts[i].q.clone()
    q[0, 0] = 0 if q[0, 0] != 0 else 1
    out[i] = dataclasses.replace(ts[i], q=q)
    return out


@pytest.mark.parametrize("name,level", [("zstd", 9), ("lzma", 6)])
def test_threaded_frames_equal_serial_ones(name, level):
    rng = np.random.default_rng(0)
    streams = [rng.integers(-3, 4, size=n).astype(np.int8).tobytes() for n in (5000, 20, 70000, 0, 3000)]
    serial = [compression.compress(s, name, level) for s in streams]
    assert compress_frames(streams, name, level, threads=4) == serial == compress_frames(streams, name, level, 1)


def test_cached_encodes_equal_fresh_encodes_and_recompress_only_changed_groups():
    cfg = grouped_cfg()
    ts = tiny_model()
    cache = EncodeCache({}, {}, cfg)
    first = cache.encode(ts)
    assert first == fresh(ts, cfg) and cache.grouped.compressed == 2 + 2 * 7  # layout, remainder, 7 groups × 2 layouts
    # One integer of an unsorted role: only that group's two frames are compressed again (the layout frame too
    # if the group's choice of layout flipped).
    changed = with_one_change(ts, "blocks.1.attn.c_k.weight")
    blob = cache.encode(changed)
    assert blob == fresh(changed, cfg) and blob != first and cache.grouped.compressed in (18, 19)
    assert torch.equal(decode(blob).tensors[[t.name for t in ts].index("blocks.1.attn.c_k.weight")].q,
                       changed[[t.name for t in ts].index("blocks.1.attn.c_k.weight")].q)
    # A sorted role: its group, and the remainder (its permutation may move), never a stale frame.
    sorted_change = with_one_change(changed, "blocks.0.mlp.fc.weight")
    assert cache.encode(sorted_change) == fresh(sorted_change, cfg) and 20 <= cache.grouped.compressed <= 22
    assert cache.encode(list(changed)) == blob  # from the frame memory (new list, same tensors)


def test_frame_memory_is_keyed_by_compressor_and_level():
    ts = tiny_model(seed=1, layers=1)
    cheap, dear = grouped_cfg(3), grouped_cfg(12)
    cache = EncodeCache({}, {}, cheap)
    assert cache.encode(ts) == fresh(ts, cheap)
    cache.cfg = dear  # the same cache asked for another level must not hand back level-3 frames
    copies = [dataclasses.replace(t) for t in ts]  # new objects, the same bytes: past the blob memory
    assert cache.encode(copies) == fresh(ts, dear) != fresh(ts, cheap) and cache.grouped.compressed == 2 * 16


def test_any_row_order_round_trips():
    ts = tiny_model(seed=2, layers=1)
    reverse = Packing(row_order=lambda name, q: np.arange(q.shape[0])[::-1].copy())
    blob = encode(ts, {}, {}, "zstd", 3, grouping=ROLE_GROUPING, packing=reverse)
    assert blob != fresh(ts, grouped_cfg(3))
    assert all(torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) for a, b in zip(ts, decode(blob).tensors))
    bad = Packing(row_order=lambda name, q: np.arange(q.shape[0] - 1))
    with pytest.raises(ValueError, match="row order"):
        encode(ts, {}, {}, "zstd", 3, grouping=ROLE_GROUPING, packing=bad)


def test_the_estimate_keeps_row_orders_by_name(monkeypatch):
    cfg = grouped_cfg(19)
    ts = tiny_model(seed=3)
    cache = EncodeCache({}, {}, cfg)
    estimate = cache.grouped.estimate(ts)
    assert 0 < estimate and cache.grouped.compressed == 0  # no exact frame compressed
    pruned = _zero_cheapest(ts, *prune_order(ts), 500)
    calls, real = [], compression.l1_chain
    monkeypatch.setattr(compression, "l1_chain", lambda q, device=None: calls.append(q) or real(q, device))
    assert cache.grouped.estimate(pruned) != estimate  # the new integers are compressed, not an old frame
    assert not calls  # the orders of the first integers seen are reused
    assert cache.encode(pruned) == fresh(pruned, cfg) and calls  # the exact encode orders by content


@pytest.mark.parametrize("n,cols,levels,seed", [(300, 8, 3, 0), (129, 16, 1, 1), (64, 4, 63, 2)])
def test_l1_chain_equals_the_scan_of_every_row(n, cols, levels, seed):
    """The chain that drops used rows gives the order of the one that masks them (lowest index on ties)."""
    rows = np.random.default_rng(seed).integers(-levels, levels + 1, size=(n, cols)).astype(np.int16)
    used, order = np.zeros(n, dtype=bool), [0]
    for _ in range(n - 1):
        used[order[-1]] = True
        dist = np.abs(rows - rows[order[-1]]).sum(axis=1).astype(np.int64)
        dist[used] = np.iinfo(np.int64).max
        order.append(int(dist.argmin()))
    assert compression.l1_chain(torch.from_numpy(rows), torch.device("cpu")).tolist() == order


def _zeros(ts: list) -> int:
    return sum(int((t.q == 0).sum()) for t in ts if t.quantized)


def test_pruning_with_an_estimate_finds_the_fewest_count_when_size_is_monotonic():
    ts = tiny_model(seed=4)
    total, zeros0 = int(prune_order(ts)[0].numel()), _zeros(ts)

    def exact(t) -> int:  # falls 3 bytes per zeroed entry
        return 100_000 - 3 * (_zeros(t) - zeros0)

    def estimate(t) -> int:  # another scale, curved: the calibration has to do the work
        k = _zeros(t) - zeros0
        return 50_000 - k - k * k // (4 * total)

    for want in (1, total // 3, total - 1):
        plain = prune_to_target(ts, 100_000 - 3 * want, exact)
        out = prune_to_target(ts, 100_000 - 3 * want, exact, estimate)
        assert out.fits and out.pruned == plain.pruned == want
        assert out.probes <= 2 + 4 + 2 * math.ceil(math.log2(total))
    # A useless estimate (constant) still gives the same, exact answer.
    assert prune_to_target(ts, 100_000 - 3 * 17, exact, lambda t: 7).pruned == 17


def test_grouped_pruning_meets_the_target_by_the_real_encode():
    cfg = grouped_cfg()
    ts = tiny_model(seed=5)
    cache = EncodeCache({}, {}, cfg)
    start = len(cache.encode(ts))
    target = start - start // 50
    out = prune_to_target(ts, target, lambda t: len(cache.encode(t)), cache.grouped.estimate)
    assert out.fits and 0 < out.pruned < out.candidates
    assert out.size_bytes == len(fresh(out.tensors, cfg)) <= target  # the real encode, from nothing
    owner, flat = prune_order(ts)
    assert len(fresh(_zero_cheapest(ts, owner, flat, out.pruned - 1), cfg)) > target  # one fewer misses


@pytest.mark.slow
def test_quantize_stage_prunes_a_grouped_artifact_to_its_target(tmp_path):
    import stages.hessians
    import stages.quantize
    from pgolf.submission.size import LIMIT_BYTES, bundle_reserved_bytes
    from tests.helpers.models import write_quant_root
    root = write_quant_root(tmp_path)
    stages.hessians.run(quant_params(), root)
    on = {"compression": "grouped", "lqer_top_k": 1, "lqer_rank": 2, "lqer_group": 32}
    free = stages.quantize.run(quant_params(quantize=on), root)["model_bytes"]
    margin = LIMIT_BYTES - bundle_reserved_bytes(root) - (free - 300)  # target: 300 bytes under
    m = stages.quantize.run(quant_params(quantize={**on, "prune": True, "prune_margin_bytes": margin}), root)
    blob = (root / "artifacts/quant/model.ptz").read_bytes()
    assert m["prune_fits"] and m["pruned"] > 0 and len(blob) == m["model_bytes"] <= free - 300
    art = decode(blob)
    assert encode(art.tensors, art.model_config, art.meta, "zstd", m["params"]["zstd_level"],
                  grouping=ROLE_GROUPING) == blob  # the file is a fresh encode of its own tensors
