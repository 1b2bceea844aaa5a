"""The code-byte reserve: an eval-only params edit changes the bundle but not what quantize reads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stages.bundle
from pgolf.errors import ParamError
from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
from pgolf.submission.limits import reserved_code_bytes
from pgolf.submission.size import bundle_reserved_bytes
from pgolf.tools.profiles import compose

REPO = Path(__file__).resolve().parents[2]


def test_reserve_rounds_up_to_the_quantum():
    assert [reserved_code_bytes(n, 1024) for n in (1, 1023, 1024, 1025, 58_973)] == [1024, 1024, 1024, 2048, 59_392]
    assert reserved_code_bytes(58_973, 1) == 58_973  # quantum 1: the exact bytes


@pytest.mark.slow  # > 1 s: kept out of the fast lane
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


def _materialise(root: Path) -> None:
    """Every dep and out of every stage that is not there yet, as a placeholder file."""
    for spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"placeholder {path.name}\n")


def _run(root: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(root),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_dvc_eval_only_edit_reruns_bundle_but_not_quantize(tmp_path):
    """What `dvc repro` would re-run after an eval-only edit, with the real bundle stage and the real dvc.yaml."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("pgolf", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    _run(root, sys.executable, "-m", "stages.bundle")
    _materialise(root)
    _run(root, "dvc", "init", "--no-scm", "-q")
    _run(root, "dvc", "commit", "-f", "-q")
    assert json.loads(_run(root, "dvc", "status", "--json")) == {}
    before = (root / BUNDLE).read_bytes()

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval_ttt"]["lr"] = params["eval_ttt"]["lr"] * 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, sys.executable, "-m", "stages.bundle")  # what `dvc repro` runs first for this edit
    assert (root / BUNDLE).read_bytes() != before
    changed = set(json.loads(_run(root, "dvc", "status", "--json")))
    assert {"bundle", "size_check", "eval_ttt"} <= changed  # size_check sees the new train_gpt.py
    assert "quantize" not in changed, "an eval-only edit would re-quantise"
    # Control: with the exact bytes reserved (quantum 1) the same kind of edit does reach quantize.
    params["bundle"]["reserve_quantum"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, sys.executable, "-m", "stages.bundle")
    assert "quantize" in set(json.loads(_run(root, "dvc", "status", "--json")))
