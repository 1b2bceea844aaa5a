"""The .ptz format: exact round trip, deterministic bytes, clear errors, no unpickling."""
from __future__ import annotations

import hashlib
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.quant import artifact
from pgolf.quant.artifact import (HEADER_BYTES, StoredTensor, decode, dequantize, encode, read_artifact, write_artifact)
from pgolf.quant.restore import load_dequantized_model
from pgolf.errors import DataError
from pgolf.model.gpt import rebank_state_dict, unbank_state_dict
from pgolf.quant.grid import dequantize_grid
from tests.helpers.models import tiny_model

REPO = Path(__file__).resolve().parents[2]


def sample_tensors() -> list[StoredTensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-31, 32, (6, 10), generator=g, dtype=torch.int8)
    scale = (torch.rand(6, generator=g) * 0.01 + 1e-3).to(torch.float16)
    emb_q = torch.randint(-127, 128, (1, 12), generator=g, dtype=torch.int8)
    return [
        StoredTensor("blocks.0.attn.c_q.weight", (6, 10), "float32", "gptq", bits=6, q=q, scale=scale),
        StoredTensor("odd.shape", (3, 2, 2), "bfloat16", "rtn", bits=8, q=emb_q,
                     scale=torch.tensor([0.02], dtype=torch.float16)),
        StoredTensor("gain", (4,), "float32", "passthrough", raw=torch.randn(4, generator=g).half()),
        StoredTensor("steps", (2,), "int64", "passthrough", raw=torch.tensor([3, -(2 ** 40)])),
        StoredTensor("flag", (), "bool", "passthrough", raw=torch.tensor(True)),
    ]


CONFIG = {"vocab_size": 64, "name": "tiny"}
META = {"quantize": {"damp": 0.01}}


@pytest.mark.parametrize("compressor,level", [("zstd", 3), ("zstd", 22), ("lzma", 6), ("lzma", 9)])
def test_round_trip_is_exact(tmp_path, compressor, level):
    tensors = sample_tensors()
    size = write_artifact(tmp_path / "m.ptz", tensors, CONFIG, META, compressor, level)
    assert size == (tmp_path / "m.ptz").stat().st_size
    back = read_artifact(tmp_path / "m.ptz")
    assert back.model_config == CONFIG and back.meta == META
    for a, b in zip(tensors, back.tensors):
        assert (a.name, a.shape, a.dtype, a.method, a.bits) == (b.name, b.shape, b.dtype, b.method, b.bits)
        if a.quantized:
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and b.scale.dtype == torch.float16
        else:
            assert torch.equal(a.raw, b.raw) and a.raw.dtype == b.raw.dtype
    state = dequantize(back)
    assert torch.equal(state["blocks.0.attn.c_q.weight"], dequantize_grid(tensors[0].q, tensors[0].scale))
    assert state["odd.shape"].shape == (3, 2, 2) and state["odd.shape"].dtype == torch.bfloat16
    assert state["steps"].dtype == torch.int64 and state["flag"].item() is True


@pytest.mark.parametrize("compressor,level", [("zstd", 22), ("lzma", 9)])
def test_file_size_is_the_index_frame_plus_each_tensors_own_frame(compressor, level):
    # What the byte-budget fit relies on: swapping one tensor changes the file by
    # exactly the difference of that tensor's frames (up to the index's few bytes).
    tensors = sample_tensors()
    size = len(encode(tensors, CONFIG, META, compressor, level))
    frames = [len(artifact.tensor_frame(t, compressor, level)) for t in tensors]
    assert frames == [len(f) for f in artifact.tensor_frames(tensors, compressor, level)]
    g = torch.Generator().manual_seed(5)
    coarser = StoredTensor(tensors[0].name, tensors[0].shape, "float32", "gptq", bits=6,
                           q=torch.randint(-3, 4, (6, 10), generator=g, dtype=torch.int8), scale=tensors[0].scale)
    swapped = [coarser, *tensors[1:]]
    swapped_size = len(encode(swapped, CONFIG, META, compressor, level))
    assert swapped_size - size == len(artifact.tensor_frame(coarser, compressor, level)) - frames[0]
    index_frame = size - HEADER_BYTES - sum(frames)
    assert 0 < index_frame < 1000


def test_decode_reports_each_tensors_frame_and_refuses_a_single_stream():
    tensors = sample_tensors()
    blob = encode(tensors, CONFIG, META, "lzma", 6)
    back = decode(blob)
    assert list(back.frame_bytes) == [len(artifact.tensor_frame(t, "lzma", 6)) for t in tensors]
    assert HEADER_BYTES + back.index_frame_bytes + sum(back.frame_bytes) == len(blob)
    # Version 1's layout (everything in one stream) under a version-2 header.
    payload = artifact._decompress(blob[HEADER_BYTES:], 2, struct.unpack_from("<8sHBBQQ32s", blob)[5], "x")[0]
    packed = artifact.compress_bytes(payload, "lzma", 6)
    one_stream = struct.pack("<8sHBBQQ32s", artifact.MAGIC, artifact.FORMAT_VERSION, 2, 0, len(packed),
                             len(payload), hashlib.sha256(packed).digest()) + packed
    with pytest.raises(DataError, match="one.ptz: 1 compressed frames for 5 tensors"):
        decode(one_stream, "one.ptz")


def test_a_frame_cut_short_or_an_extra_frame_is_a_data_error():
    good = encode(sample_tensors(), CONFIG, META, "zstd", 3)
    packed = good[HEADER_BYTES:]
    raw_len = struct.unpack_from("<8sHBBQQ32s", good)[5]

    def resigned(body: bytes, raw: int) -> bytes:
        return struct.pack("<8sHBBQQ32s", artifact.MAGIC, artifact.FORMAT_VERSION, 1, 0, len(body), raw,
                           hashlib.sha256(body).digest()) + body

    with pytest.raises(DataError, match="x.ptz: compressed payload is incomplete"):
        decode(resigned(packed[:-3], raw_len), "x.ptz")
    extra = packed + artifact.compress_bytes(b"more", "zstd", 3)
    with pytest.raises(DataError, match="x.ptz: payload decompresses to more than"):
        decode(resigned(extra, raw_len), "x.ptz")
    # A frame that would inflate far past the header's length is refused before decompressing.
    bomb = artifact.compress_bytes(bytes(50_000_000), "zstd", 3)
    with pytest.raises(DataError, match="x.ptz: payload decompresses to more than .* declares 50000000"):
        decode(resigned(bomb, 100), "x.ptz")


def test_encoding_is_deterministic_and_compressor_settings_matter():
    a = encode(sample_tensors(), CONFIG, META, "zstd", 19)
    assert a == encode(sample_tensors(), CONFIG, META, "zstd", 19)
    assert a != encode(sample_tensors(), CONFIG, META, "lzma", 9)
    big = [StoredTensor("w", (256, 256), "float32", "rtn", bits=6,
                        q=(torch.arange(256 * 256) % 7 - 3).to(torch.int8).reshape(256, 256),
                        scale=torch.ones(256, dtype=torch.float16))]
    assert len(encode(big, CONFIG, META, "zstd", 1)) != len(encode(big, CONFIG, META, "zstd", 19))
    assert len(encode(big, CONFIG, META, "lzma", 0)) != len(encode(big, CONFIG, META, "lzma", 9))


def _rewrite_header(blob: bytes, **fields) -> bytes:
    magic, version, comp, reserved, plen, rlen, digest = struct.unpack_from("<8sHBBQQ32s", blob)
    values = dict(magic=magic, version=version, comp=comp, reserved=reserved, plen=plen, rlen=rlen, digest=digest)
    values.update(fields)
    return struct.pack("<8sHBBQQ32s", *values.values()) + blob[HEADER_BYTES:]


def _errors(tmp_path):
    good = encode(sample_tensors(), CONFIG, META, "zstd", 3)
    flipped = bytearray(good)
    flipped[HEADER_BYTES + 20] ^= 0xFF
    return {
        "empty": (b"", "shorter than"),
        "truncated": (good[:-10], "truncated"),
        "padded": (good + b"\0", "truncated or padded"),
        "corrupted": (bytes(flipped), "checksum mismatch"),
        "version": (_rewrite_header(good, version=1), "format version 1 is not supported"),
        "magic": (b"PK\x03\x04" + good[4:], "bad magic"),
        "compressor": (_rewrite_header(good, comp=9), "unknown compressor id 9"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "padded", "corrupted", "version", "magic", "compressor"])
def test_bad_files_raise_one_line_data_errors_naming_the_file(tmp_path, case):
    blob, message = _errors(tmp_path)[case]
    path = tmp_path / f"{case}.ptz"
    path.write_bytes(blob)
    with pytest.raises(DataError) as info:
        read_artifact(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def _signed(payload: bytes) -> bytes:
    packed = artifact.compress_bytes(payload, "zstd", 3)
    return struct.pack("<8sHBBQQ32s", artifact.MAGIC, artifact.FORMAT_VERSION, 1, 0, len(packed), len(payload),
                       hashlib.sha256(packed).digest()) + packed


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_payload_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickled = pickle.dumps({"tensors": [_Exploit(marker)]})
    for payload in (pickled, struct.pack("<I", len(pickled)) + pickled):
        with pytest.raises(DataError, match="index"):
            decode(_signed(payload), "evil.ptz")
    assert not marker.exists()


def test_inconsistent_index_is_a_data_error():
    index = b'{"model_config":{},"meta":{},"tensors":[{"name":"w","shape":[2,2],"dtype":"float32",' \
            b'"method":"rtn","bits":6,"q":{"dtype":"int8","offset":0,"nbytes":400},' \
            b'"scale":{"dtype":"float16","offset":0,"nbytes":4}}]}'
    with pytest.raises(DataError, match="tensor w: array reference .* outside"):
        decode(_signed(struct.pack("<I", len(index)) + index + bytes(8)), "x.ptz")


@pytest.mark.slow
def test_stage_entry_prints_one_line_and_exits_1_on_a_bad_artifact(tmp_path):
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"not an artifact at all, just text" * 3)
    code = ("from pgolf.pipeline.launch import stage_main; from pgolf.quant.restore import load_dequantized_model; "
            f"stage_main(lambda: load_dequantized_model({str(bad)!r}, 'cpu'))()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: not a pgolf quantised artifact (bad magic b'not an a')"]


def test_load_dequantized_model_rebuilds_the_gpt(tmp_path):
    model = tiny_model()
    cfg = model.cfg
    state = unbank_state_dict(model.state_dict(), cfg)
    tensors = []
    for name, t in sorted(state.items()):
        if t.dim() == 2 and t.numel() > 256:
            scale = (t.abs().amax(1) / 31).clamp_min(1e-6).half()
            q = torch.round(t / scale.float()[:, None]).clamp(-31, 31).to(torch.int8)
            tensors.append(StoredTensor(name, tuple(t.shape), "float32", "rtn", bits=6, q=q, scale=scale))
        else:
            tensors.append(StoredTensor(name, tuple(t.shape), "float32", "passthrough", raw=t.half()))
    write_artifact(tmp_path / "m.ptz", tensors, cfg.to_dict(), {}, "zstd", 3)
    loaded = load_dequantized_model(tmp_path / "m.ptz", "cpu")
    assert not loaded.training and loaded.cfg == cfg
    expected = rebank_state_dict(dequantize(read_artifact(tmp_path / "m.ptz")), cfg)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    ids = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded.forward_logits(ids)).all()


def test_artifact_for_another_model_is_a_data_error(tmp_path):
    model = tiny_model()
    tensors = [StoredTensor("tok_emb.weight", (64, 32), "float32", "passthrough", raw=torch.zeros(64, 32).half())]
    write_artifact(tmp_path / "m.ptz", tensors, model.cfg.to_dict(), {}, "zstd", 3)
    with pytest.raises(DataError, match="does not match its model config"):
        load_dequantized_model(tmp_path / "m.ptz", "cpu")
    write_artifact(tmp_path / "c.ptz", tensors, {"vocab_size": 64}, {}, "zstd", 3)
    with pytest.raises(DataError, match="c.ptz: bad model_config"):
        load_dequantized_model(tmp_path / "c.ptz", "cpu")
