"""`pgolf export`: folder contents and submission.json values from tiny fake-but-valid outputs; refusals."""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from pgolf.quant.artifact import read_artifact

from pgolf.tools.cli import main
from pgolf.submission.export import git_commit
from pgolf.io import write_json_atomic
from pgolf.submission.bundle import build_bundle
from pgolf.io import file_sha256
from pgolf.submission.size import report_dict, size_report
from pgolf.pipeline.paths import BUNDLE
from tests.helpers.export_root import (PARAMS_YAML, REPO, SLIDING, TRAIN, TTT, make_export_root, write_bundle,
                                       write_eval, write_size)
from tests.helpers.models import write_tiny_artifact

pytestmark = pytest.mark.slow  # each test builds a pipeline run and its bundle (seconds)



@pytest.fixture
def root(tmp_path) -> Path:
    return make_export_root(tmp_path)


def export(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["export", "--root", str(root), "--out", str(out), *extra])
    o, e = capsys.readouterr()
    return code, o, e


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_export_writes_the_submission_folder(root, tmp_path, capsys):
    out = tmp_path / "submission"
    code, stdout, err = export(capsys, root, out)
    assert code == 0, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(["README.md", "submission.json", "pgolf_results.json", "model.ptz", "params.yaml",
                            "dvc.lock",
                            "logs/train/train.log", "logs/eval_ttt/ttt.log", "train_gpt.py", "requirements.txt"])
    assert (out / "train_gpt.py").read_bytes() == (root / BUNDLE).read_bytes()
    assert (out / "model.ptz").read_bytes() == (root / "artifacts/quant/model.ptz").read_bytes()
    assert (out / "params.yaml").read_text() == PARAMS_YAML
    assert (out / "logs/train/train.log").read_text() == "step 40/40 loss 4.0\n"

    s = json.loads((out / "pgolf_results.json").read_text())
    size = json.loads((root / "artifacts/size.json").read_text())
    assert (s["val_bpb"], s["val_loss"], s["headline_eval"]) == (1.2, 2.4, "ttt")
    assert (s["val_bpb_sliding"], s["val_bpb_ttt"], s["val_bpb_nonoverlap"]) == (1.25, 1.2, 1.3)
    assert s["bytes_model"] == (root / "artifacts/quant/model.ptz").stat().st_size == size["model_bytes"]
    assert s["bytes_code"] == (out / "train_gpt.py").stat().st_size == size["code_bytes"]
    assert s["bytes_total"] == s["bytes_code"] + s["bytes_model"] and s["fits"] is True
    assert (s["steps"], s["train_seconds"], s["final_weights"]) == (40, 12.5, "ema")
    assert s["seeds"] == {"train": 1337, "corpus": 11, "hessians": 13}
    assert s["model"]["num_layers"] == 3 and s["model"]["vocab_size"] == 64
    assert s["quantize"]["method"] == "rtn" and s["quantization_weight_mse_mean"] == 2.5e-6
    assert s["quantization_gap_bpb"] is None
    stored = [t.bits for t in read_artifact(root / "artifacts/quant/model.ptz").tensors if t.bits is not None]
    assert s["quantized_bits"] == {f"int{b}": stored.count(b) for b in sorted(set(stored), reverse=True)}
    assert sum(s["quantized_bits"].values()) == len(stored) > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s["date"]) and s["pgolf_version"]
    assert s["git_commit"] is None  # tmp_path is not a git checkout
    assert sorted(s["files"]) == files

    readme = (out / "README.md").read_text()
    assert "| val_bpb, headline | **1.20000000** (ttt) |" in readme
    assert "| val_bpb, sliding window | 1.25000000 |" in readme
    assert "1.20000000 (gain +0.050000 vs sliding)" in readme
    assert (f"code {s['bytes_code']:,} + model {s['bytes_model']:,} = {s['bytes_total']:,} of 16,000,000 "
            f"(fits, headroom {16_000_000 - s['bytes_total']:,})") in readme
    assert "| training | 40 steps in 12.5 s, 312.5 ms/step; final weights ema |" in readme
    assert "| seeds | train 1337, corpus 11, hessians 13 |" in readme
    assert "val_bpb 1.20000000 (ttt)" in stdout
    assert main(["inspect", "--json", str(out / "submission.json")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "submission"


def test_headline_is_sliding_when_ttt_did_not_run(root, tmp_path, capsys):
    (root / "artifacts/eval_ttt/metrics.json").unlink()
    assert export(capsys, root, tmp_path / "out")[0] == 0
    s = json.loads((tmp_path / "out/pgolf_results.json").read_text())
    assert (s["val_bpb"], s["val_loss"], s["headline_eval"], s["val_bpb_ttt"]) == (1.25, 2.5, "sliding", None)
    assert "| val_bpb, legal score-first TTT | not run |" in (tmp_path / "out/README.md").read_text()


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_over_limit_is_refused_unless_allowed(root, tmp_path, capsys):
    size = write_size(root, limit=1000)
    out = tmp_path / "out"
    code, _, err = export(capsys, root, out)
    assert code == 1 and not out.exists()
    over = size["total_bytes"] - 1000
    assert err == (f"error: {root / 'artifacts/size.json'}: submission is {size['total_bytes']:,} bytes, over the "
                   f"1,000-byte limit by {over:,}; not exporting (pass --allow-over-limit to export it marked "
                   "as over the limit)\n")
    code, _, err = export(capsys, root, out, "--allow-over-limit")
    assert code == 0, err
    s = json.loads((out / "pgolf_results.json").read_text())
    assert s["fits"] is False and s["bytes_limit"] == 1000
    assert f"**OVER THE LIMIT by {over:,}**" in (out / "README.md").read_text()


@pytest.mark.parametrize("missing", ["artifacts/quant/model.ptz", "artifacts/size.json", BUNDLE,
                                     "artifacts/bundle/metrics.json",
                                     "artifacts/eval_sliding/metrics.json", "artifacts/train/metrics.json",
                                     "params.yaml"])
def test_missing_required_input_is_refused(root, tmp_path, capsys, missing):
    (root / missing).unlink()
    code, _, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert err == f"error: {root / missing}: required input missing (run the pipeline: dvc repro)\n"


@pytest.mark.slow  # > 1 s: kept out of the fast lane
def test_stale_size_report_and_bad_metrics_are_refused(root, tmp_path, capsys):
    # other params, and surely another size: compressed sizes come in 13-byte steps, so a one-key edit alone can
    # leave the file size (which is what size.json pairs with) unchanged
    write_bundle(root, PARAMS_YAML + "size: {enforce: true}\nnote: " + hashlib.sha256(b"x").hexdigest() * 4 + "\n")
    code, _, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "size.json is stale, re-run the size_check stage" in err
    write_bundle(root)
    write_size(root)
    write_eval(root, "eval_sliding", {**SLIDING, "val_bpb": "1.2"})
    code, _, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and err.endswith("eval_sliding/metrics.json: key 'val_bpb' missing or not a number\n")
    blob = bytearray((root / "artifacts/quant/model.ptz").read_bytes())
    blob[-10] ^= 0xFF  # same size, so only the artifact's own checksum can catch it
    (root / "artifacts/quant/model.ptz").write_bytes(bytes(blob))
    write_size(root)  # a tampered file whose results all name it: only its checksum is left to catch it
    write_eval(root, "eval_sliding", SLIDING)
    write_eval(root, "eval_ttt", TTT)
    code, _, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "checksum mismatch" in err and not (tmp_path / "out").exists()


def test_quantisation_gap_from_an_unquantised_eval(root, tmp_path, capsys):
    write_json_atomic(tmp_path / "float.json", {"val_bpb": 1.24, "val_loss": 2.48})
    assert export(capsys, root, tmp_path / "out", "--prequant-metrics", str(tmp_path / "float.json"))[0] == 0
    s = json.loads((tmp_path / "out/pgolf_results.json").read_text())
    assert s["quantization_gap_bpb"] == pytest.approx(1.25 - 1.24, abs=1e-15)
    assert "+0.010000 bpb (quantised − unquantised, sliding eval)" in (tmp_path / "out/README.md").read_text()


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_out_folder_rules(root, tmp_path, capsys):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    code, _, err = export(capsys, root, unrelated)
    assert code == 1 and "is not an earlier pgolf export" in err
    assert (unrelated / "thesis.tex").read_text() == "precious"
    code, _, err = export(capsys, root, root)
    assert code == 1 and "contains the pipeline's own files" in err

    out = tmp_path / "out"
    assert export(capsys, root, out)[0] == 0
    (out / "stray.txt").write_text("left from before")
    write_eval(root, "eval_ttt", {**TTT, "val_bpb": 1.1})
    assert export(capsys, root, out)[0] == 0  # an earlier export is replaced whole
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "pgolf_results.json").read_text())["val_bpb"] == 1.1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_git_commit_of_a_checkout():
    commit, dirty = git_commit(REPO)
    if commit is None:
        pytest.skip("the source tree is not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)
