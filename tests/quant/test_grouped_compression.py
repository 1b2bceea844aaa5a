"""The grouped layout (format 3, pgolf/quant/grouped.py) and its L1 row order (pgolf/quant/compression.py)."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from pgolf.config import from_params
from pgolf.errors import DataError, ParamError
from pgolf.quant import compression
from pgolf.quant.artifact import HEADER_BYTES, StoredTensor, decode, dequantize, encode
from pgolf.quant.encode_cache import EncodeCache
from pgolf.quant.lqer import apply_lqer
from pgolf.quant.policy import QuantizeConfig
from pgolf.quant.roles import GROUP_ROLES, SORTED_ROLES, role_grouping, role_of
from tests.helpers.models import quant_params
from tests.helpers.quantized import rtn_stored as stored

ROLE_GROUPING = role_grouping()


def l1_chain_reference(rows: np.ndarray) -> list[int]:
    """Greedy nearest neighbour in plain Python, O(n²): from row 0, the closest unused row (lowest index on ties)."""
    n = len(rows)
    order, used = [0], {0}
    while len(order) < n:
        last = rows[order[-1]].astype(np.int64)
        best, best_d = None, None
        for j in range(n):
            if j in used:
                continue
            d = int(np.abs(rows[j].astype(np.int64) - last).sum())
            if best_d is None or d < best_d:
                best, best_d = j, d
        order.append(best)
        used.add(best)
    return order


@pytest.mark.parametrize("n,cols,levels,seed", [(1, 4, 3, 0), (2, 3, 3, 1), (40, 8, 3, 2), (60, 16, 63, 3),
                                                (33, 5, 2, 4)])
def test_l1_chain_equals_the_quadratic_reference(n, cols, levels, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(-(levels // 2), levels // 2 + 1, size=(n, cols)).astype(np.int8)  # few levels: many ties
    assert compression.l1_chain(torch.from_numpy(rows)).tolist() == l1_chain_reference(rows)


def model_tensors(seed: int = 0, layers: int = 2, lqer: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.c_q": (32, 32), "attn.c_k": (16, 32), "attn.c_v": (16, 32), "attn.proj": (32, 32),
              "mlp.fc": (64, 32), "mlp.proj": (32, 64)}
    ws = {"tok_emb.weight": torch.randn(50, 32, generator=g)}
    for i in range(layers):
        ws.update({f"blocks.{i}.{m}.weight": torch.randn(*s, generator=g) for m, s in shapes.items()})
    ws["bigram.proj.weight"] = torch.randn(8, 32, generator=g)  # quantised, but no role: the remainder
    ts = [stored(n, w) for n, w in sorted(ws.items())]
    ts.append(StoredTensor("norm.weight", (32,), "float32", "passthrough", raw=torch.randn(32, generator=g).half()))
    if lqer:
        ts, _ = apply_lqer(ts, ws, lqer, 4, 64)
    return ts


def frame_table(blob: bytes) -> list[int]:
    packed = blob[HEADER_BYTES:]
    (count,) = struct.unpack_from("<I", packed)
    return list(struct.unpack_from(f"<{count}Q", packed, 4))


@pytest.mark.parametrize("compressor", ["zstd", "lzma"])
def test_grouped_round_trip_is_exact_and_frames_are_reported_exactly(compressor):
    ts = model_tensors(lqer=2)
    plain, grouped = (encode(ts, {"c": 1}, {"m": 2}, compressor, 6, grouping=g) for g in (None, ROLE_GROUPING))
    a, b = decode(plain), decode(grouped)
    assert struct.unpack_from("<H", grouped, 8)[0] == 3 and struct.unpack_from("<H", plain, 8)[0] == 2
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name
        for f in ("q", "scale", "raw"):
            assert (getattr(x, f) is None and getattr(y, f) is None) or torch.equal(getattr(x, f), getattr(y, f))
        assert (x.lqer is None) == (y.lqer is None)
    assert all(torch.equal(dequantize(a)[k], v) for k, v in dequantize(b).items())
    # One frame per group, in role order, sizes as stored in the table; every role got its frame.
    records = list(b.frames)
    assert [r["frame"] for r in records] == ["layout", "remainder", *GROUP_ROLES]
    assert [r["bytes"] for r in records] == frame_table(grouped)
    assert all(r["compressor"] == compressor for r in records)
    rows = {role: sum(t.q.numel() for t in ts if t.quantized and role_of(t.name) == role) for role in GROUP_ROLES}
    assert {r["frame"]: r["raw_bytes"] for r in records[2:]} == rows
    sorted_rows = sum(t.shape[0] for t in ts if t.quantized and role_of(t.name) in SORTED_ROLES)
    payload = struct.unpack_from("<Q", plain, 20)[0]  # the logical payload's length, as in format 2
    assert struct.unpack_from("<Q", grouped, 20)[0] == payload
    assert records[1]["raw_bytes"] == payload - sum(rows.values()) + 2 * sorted_rows


def stored_frames(blob: bytes) -> dict[str, bytes]:
    lengths = frame_table(blob)
    packed = blob[HEADER_BYTES + 4 + 8 * len(lengths):]
    starts = np.cumsum([0] + lengths)
    return {role: packed[starts[i]:starts[i + 1]] for i, role in enumerate(["layout", "remainder", *GROUP_ROLES])}


def structured_tensors():
    """model_tensors(seed 1, one layer) with c_k's rows all equal (row-major packs it smaller) and mlp.proj's
    rows each constant (transposed packs it smaller), so the writer's choice goes both ways."""
    ts = model_tensors(seed=1, layers=1)
    g = torch.Generator().manual_seed(3)
    for name, w in (("blocks.0.attn.c_k.weight", torch.randn(1, 32, generator=g).expand(16, 32)),
                    ("blocks.0.mlp.proj.weight", torch.randn(32, 1, generator=g).expand(32, 64))):
        i = next(i for i, t in enumerate(ts) if t.name == name)
        ts[i] = stored(name, w.contiguous())
    return ts


def grouped_zstd(ts: list) -> tuple[bytes, dict[str, bytes], dict]:
    """(the grouped zstd-3 blob, its frames by name, its layout JSON)."""
    blob = encode(ts, {}, {}, "zstd", 3, grouping=ROLE_GROUPING)
    frames = stored_frames(blob)
    return blob, frames, json.loads(compression.decompress(frames["layout"], "zstd", 1 << 20))


def group_streams(group: dict, ts: list) -> tuple[bytes, bytes]:
    """(transposed, row-major) stream of a layout group's members, each in its stored row order."""
    q = {t.name: t.q.numpy() for t in ts if t.quantized}
    ms = [q[n][compression.l1_chain(torch.from_numpy(q[n])).numpy()] if srt else q[n]
          for n, _, _, _, srt in group["members"]]
    return (b"".join(np.ascontiguousarray(a.T).tobytes() for a in ms), b"".join(a.tobytes() for a in ms))


def test_each_group_is_stored_in_the_layout_that_compresses_smaller():
    ts = structured_tensors()
    blob, frames, layout = grouped_zstd(ts)
    flags = {g["role"]: g["transposed"] for g in layout["groups"]}
    assert flags["attn.c_k"] is False and flags["mlp.proj"] is True   # both ways on this input
    for g in layout["groups"]:
        transposed, row_major = group_streams(g, ts)
        sizes = [len(compression.compress(x, "zstd", 3)) for x in (transposed, row_major)]
        want = transposed if sizes[0] <= sizes[1] else row_major
        assert g["transposed"] == (sizes[0] <= sizes[1]) and len(frames[g["role"]]) == min(sizes)
        assert compression.decompress(frames[g["role"]], "zstd", 1 << 20) == want
    for x, y in zip(ts, decode(blob).tensors):   # both layouts read back exactly
        assert x.name == y.name and (x.q is None or torch.equal(x.q, y.q))


def test_a_layout_without_the_flag_reads_as_transposed():
    """Files written before the writer chose per group have no ``transposed`` key: every group transposed."""
    ts = model_tensors(seed=1, layers=1)
    blob, frames, layout = grouped_zstd(ts)
    streams = {g["role"]: compression.decompress(frames[g["role"]], "zstd", 1 << 20) for g in layout["groups"]}
    for g in layout["groups"]:   # the old writer: every group transposed, no flag
        if not g.pop("transposed"):
            streams[g["role"]] = group_streams(g, ts)[0]
    old = [compression.compress(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode(), "zstd", 3),
           frames["remainder"], *(compression.compress(streams[r], "zstd", 3) for r in GROUP_ROLES)]
    packed = struct.pack(f"<I{len(old)}Q", len(old), *map(len, old)) + b"".join(old)
    for x, y in zip(ts, decode(_resealed(blob, packed)).tensors):
        assert x.name == y.name and (x.q is None or torch.equal(x.q, y.q))


def test_the_stored_group_stream_is_the_row_ordered_matrix():
    ts = model_tensors(seed=1, layers=1)
    blob, frames, layout = grouped_zstd(ts)
    transposed = {g["role"]: g["transposed"] for g in layout["groups"]}
    emb = next(t for t in ts if t.name == "tok_emb.weight")
    fc = next(t for t in ts if t.name == "blocks.0.mlp.fc.weight")
    k = next(t for t in ts if t.name == "blocks.0.attn.c_k.weight")
    stream = {role: compression.decompress(f, "zstd", 1 << 20) for role, f in frames.items()}

    def laid(a: np.ndarray, role: str) -> bytes:
        return np.ascontiguousarray(a.T if transposed[role] else a).tobytes()
    perm = compression.l1_chain(emb.q)
    assert stream["tok_emb"] == laid(emb.q.numpy()[perm.numpy()], "tok_emb")
    assert stream["mlp.fc"] == laid(fc.q.numpy()[compression.l1_chain(fc.q).numpy()], "mlp.fc")
    assert stream["attn.c_k"] == laid(k.q.numpy(), "attn.c_k")  # not a sorted role: no row order
    q_perm = compression.l1_chain(next(t for t in ts if t.name == "blocks.0.attn.c_q.weight").q)
    # Permutations close the remainder, members in data-section order (blocks.0.* sort before tok_emb).
    perms = [q_perm, compression.l1_chain(fc.q), perm]
    assert stream["remainder"].endswith(b"".join(p.numpy().astype("<u2").tobytes() for p in perms))


def _resealed(blob: bytes, packed: bytes) -> bytes:
    """``blob``'s header over new packed bytes with a correct length and checksum (to reach the frames)."""
    head = bytearray(blob[:HEADER_BYTES])
    struct.pack_into("<Q", head, 12, len(packed))
    head[28:60] = hashlib.sha256(packed).digest()
    return bytes(head) + packed


def test_corrupt_or_truncated_frames_give_one_data_error_line():
    blob = encode(model_tensors(seed=2, layers=1), {}, {}, "zstd", 3, grouping=ROLE_GROUPING)
    packed = blob[HEADER_BYTES:]
    lengths = frame_table(blob)
    cases = {"truncated file": blob[:-5],
             "cut frame": _resealed(blob, packed[:-5]),
             "bad frame table": _resealed(blob, struct.pack("<I", 1) + packed[4:])}
    flipped = bytearray(packed)
    flipped[4 + 8 * len(lengths) + sum(lengths[:3]) + 7] ^= 0xFF  # inside the tok_emb frame
    cases["corrupt group frame"] = _resealed(blob, bytes(flipped))
    for what, bad in cases.items():
        with pytest.raises(DataError) as err:
            decode(bad, "m.ptz")
        message = str(err.value)
        assert message.startswith("m.ptz: ") and "\n" not in message, (what, message)


def test_encode_cache_grouped_blob_equals_the_direct_encode():
    cfg = from_params(QuantizeConfig, quant_params(quantize={"compression": "grouped"}), "quantize")
    ts = model_tensors(seed=3, layers=1)
    cache = EncodeCache({"c": 1}, {}, cfg)
    assert cache.encode(ts) == encode(ts, {"c": 1}, {}, cfg.compressor, cfg.compression_level, grouping=ROLE_GROUPING)
    assert len(cache.frames(ts)) == len(ts)  # the fit's per-tensor estimates still work


@pytest.mark.parametrize("changes,key", [({"compressor": "brotli"}, "compressor"),
                                         ({"compression": "zipped"}, "compression"),
                                         ({"compressor": "gzip", "compression": "grouped"}, "compressor")])
def test_bad_compression_params_name_their_key(changes, key):
    with pytest.raises(ParamError, match=f"quantize.{key}"):
        from_params(QuantizeConfig, quant_params(quantize=changes), "quantize")


@pytest.mark.parametrize("name", ["brotli", "zpaq"])
def test_optional_compressors_round_trip_when_installed(name):
    if not compression.available(name):
        with pytest.raises(ParamError, match="not installed"):
            from_params(QuantizeConfig, quant_params(quantize={"compression": "grouped", "compressor": name}),
                        "quantize")
        return
    ts = model_tensors(seed=4, layers=1)
    blob = encode(ts, {}, {}, name, 9, grouping=ROLE_GROUPING)
    assert {r["compressor"] for r in decode(blob).frames} == {name}
    assert all(torch.equal(x.q, y.q) for x, y in zip(ts, decode(blob).tensors) if x.quantized)


def test_inspect_shows_the_groups_their_compressor_and_the_lqer_tensors(tmp_path):
    from pgolf.tools.inspect_model import summarise_artifact
    ts = model_tensors(seed=5, layers=1, lqer=2)
    path = tmp_path / "model.ptz"
    path.write_bytes(encode(ts, {}, {}, "lzma", 6, grouping=ROLE_GROUPING))
    summary = summarise_artifact(path)
    assert [f["frame"] for f in summary.facts["frames"]] == ["layout", "remainder", *GROUP_ROLES]
    assert all(f["compressor"] == "lzma" for f in summary.facts["frames"])
    corrected = {r["name"]: r["lqer"] for r in summary.facts["tensors"] if r["lqer"]}
    assert corrected == {t.name: {"mode": t.lqer.mode, "rank": 4, "group": 64, "bytes": t.lqer.stored_bytes()}
                         for t in ts if t.lqer is not None} and len(corrected) == 2
    text = "\n".join(summary.lines)
    assert "LQER on 2 tensors" in text and "mlp.fc" in text and "grouped layout" in text


@pytest.mark.gpu
def test_l1_chain_on_the_gpu_equals_the_cpu_order():
    rows = torch.randint(-3, 4, (300, 16), generator=torch.Generator().manual_seed(6)).to(torch.int8)
    assert torch.equal(compression.l1_chain(rows, torch.device("cuda")), compression.l1_chain(rows, torch.device("cpu")))
