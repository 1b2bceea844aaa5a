"""The code-byte reserve: an eval-only params edit changes the bundle but not what quantize reads."""
from __future__ import annotations

import json

import pytest

import stages.bundle
from pgolf.errors import ParamError
from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
from pgolf.submission.limits import reserved_code_bytes
from pgolf.submission.size import bundle_reserved_bytes
from pgolf.tools.profiles import compose
from tests.helpers.sweep import make_project, run


def test_reserve_rounds_up_to_the_quantum():
    assert [reserved_code_bytes(n, 1024) for n in (1, 1023, 1024, 1025, 58_973)] == [1024, 1024, 1024, 2048, 59_392]
    assert reserved_code_bytes(58_973, 1) == 58_973  # quantum 1: the exact bytes


def test_eval_only_edit_leaves_the_quantize_input_unchanged(tmp_path):
    a, b = compose("cpu", ["eval_ttt.lr=0.004"]), compose("cpu", ["eval_ttt.lr=0.0041"])
    ma, mb = stages.bundle.run(a, tmp_path / "a"), stages.bundle.run(b, tmp_path / "b")
    assert (tmp_path / "a" / BUNDLE).read_bytes() != (tmp_path / "b" / BUNDLE).read_bytes()
    assert ma["sha256"] != mb["sha256"]
    # Same reserve file byte for byte (what DVC hashes), though the bundles differ.
    assert (tmp_path / "a" / BUNDLE_RESERVE).read_bytes() == (tmp_path / "b" / BUNDLE_RESERVE).read_bytes()
    assert bundle_reserved_bytes(tmp_path / "a") == ma["reserved_bytes"] == reserved_code_bytes(ma["counted_bytes"], 1024)
    assert ma["reserved_bytes"] - 1024 < ma["counted_bytes"] <= ma["reserved_bytes"]
    exact = stages.bundle.run(compose("cpu", ["bundle.reserve_quantum=1"]), tmp_path / "c")
    assert json.loads((tmp_path / "c" / BUNDLE_RESERVE).read_text()) == {"reserved_bytes": exact["counted_bytes"]}


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_quantum_is_refused(tmp_path, bad):
    with pytest.raises(ParamError, match="bundle.reserve_quantum"):
        stages.bundle.run(compose("cpu", [f"bundle.reserve_quantum={bad}"]), tmp_path)
    assert not (tmp_path / BUNDLE).exists()


@pytest.mark.slow
def test_dvc_eval_only_edit_reruns_bundle_but_not_quantize(tmp_path):
    root = make_project(tmp_path / "proj")
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    model = (root / "artifacts/quant/model.ptz").read_bytes()
    log = run(["dvc", "exp", "run", "-S", "eval_ttt.lr=0.0031"], root)
    assert "Running stage 'bundle'" in log and "Running stage 'eval_ttt'" in log
    assert "Running stage 'quantize'" not in log, "an eval-only edit re-quantised"
    assert (root / "artifacts/quant/model.ptz").read_bytes() == model
