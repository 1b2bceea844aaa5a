"""bench/compressors.py re-encodes an artifact's own tensors; its own setting reproduces the file."""
from __future__ import annotations

import json

import pytest

from tests.helpers.models import write_tiny_artifact

from bench.compressors import main
from pgolf.quant.artifact import read_artifact
from pgolf.quant.bit_allocation import estimated_bytes


def test_own_setting_reproduces_the_file(tmp_path, capsys):
    path = tmp_path / "model.ptz"
    write_tiny_artifact(path, with_report=False)
    result = main([str(path), "--settings", "lzma:6", "zstd:3", "--out", str(tmp_path / "c.json")])
    rows = {(r["compressor"], r["level"]): r for r in result["rows"]}
    assert rows[("lzma", 6)]["bytes"] == path.stat().st_size  # the file was written with lzma-6
    assert rows[("zstd", 3)]["bytes"] != path.stat().st_size
    estimate = sum(estimated_bytes(t) for t in read_artifact(path).tensors)
    assert result["entropy_estimate_bytes"] == round(estimate)
    assert rows[("zstd", 3)]["vs_entropy"] == pytest.approx(rows[("zstd", 3)]["bytes"] / estimate)
    assert json.loads((tmp_path / "c.json").read_text()) == result
    assert "| lzma-6 |" in capsys.readouterr().out


def test_one_stream_column_sizes_the_version_1_layout(tmp_path):
    from bench.compressors import one_stream_bytes
    from pgolf.quant.artifact import compress_bytes
    path = tmp_path / "model.ptz"
    write_tiny_artifact(path, with_report=False)
    result = main([str(path), "--settings", "zstd:3", "--one-stream"])
    tensors = read_artifact(path).tensors
    q = [t for t in tensors if t.quantized]
    data = b"".join([t.q.numpy().tobytes() for t in q] + [t.scale.numpy().tobytes() for t in q]
                    + [t.raw.numpy().tobytes() for t in tensors if not t.quantized])
    assert result["rows"][0]["one_stream_bytes"] == one_stream_bytes(tensors, "zstd", 3) \
        == len(compress_bytes(data, "zstd", 3))


def test_bad_setting_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not compressor:level"):
        main([str(tmp_path / "x.ptz"), "--settings", "brotli:5"])
