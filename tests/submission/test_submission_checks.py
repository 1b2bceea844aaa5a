"""Fast checks of the submission pieces: bundle build/read, the budgets and their gate, export's provenance.

Issue 18 item 4 (a new model.ptz exported with an older model's TTT score) is reproduced here as
the files a `dvc repro size_check` after a quantize.damp change leaves: a new artifact and a new
size.json beside the eval metrics of the old artifact.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.errors import DataError, PgolfError
from pgolf.io import write_json_atomic
from pgolf.submission.budget import budget_lines, budget_report, over_budget_message
from pgolf.submission.bundle import build_bundle, read_bundle, strip_docstrings, unpacked_sources
from pgolf.io import file_sha256
from pgolf.submission.size import bundle_reserved_bytes, size_report
from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
from pgolf.tools.cli import main as cli
import stages.budget
from tests.helpers.export_root import SLIDING, TTT, make_export_root, write_eval, write_size

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"train": {"seed": 7}, "bundle": {"data_dir": "d", "tokenizer_path": "t.model", "strip_docstrings": True,
                                          "reserve_quantum": 1024}}


@pytest.fixture
def root(tmp_path) -> Path:
    return make_export_root(tmp_path)


@pytest.fixture(scope="module")
def bundle():
    return build_bundle(REPO, PARAMS)


# ------------------------------------------------------------------ bundle
@pytest.mark.slow  # > 1 s: kept out of the fast lane
def test_bundle_is_deterministic_and_carries_the_driver_closure(bundle, tmp_path):
    again = build_bundle(REPO, PARAMS)
    assert again.text == bundle.text and again.sha256 == bundle.sha256
    assert "pgolf/submission/driver.py" in bundle.files and "pgolf/train/loop.py" in bundle.files
    assert not any(f.startswith(("stages/", "pgolf/tools/")) for f in bundle.files)  # no stage glue, no plots
    path = tmp_path / "train_gpt.py"
    path.write_text(bundle.text, encoding="utf-8")
    index = read_bundle(path)
    assert index["params"] == PARAMS and [f for f, _ in index["files"]] == bundle.files
    assert index["counted_bytes"] == path.stat().st_size == bundle.counted_bytes == bundle.metrics()["counted_bytes"]
    assert bundle.text.isascii()  # so its UTF-8 length is its character count
    assert bundle.raw_bytes < bundle.source_bytes and bundle.counted_bytes < bundle.raw_bytes / 2


@pytest.mark.slow
def test_stripped_modules_behave_like_the_originals(bundle, tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text(bundle.text, encoding="utf-8")
    sources = unpacked_sources(path)
    original = (REPO / "pgolf/submission/budget.py").read_text(encoding="utf-8")
    assert '"""' not in sources["pgolf/submission/budget.py"] and "#" not in sources["pgolf/submission/budget.py"]
    ns_a, ns_b = {}, {}
    exec(compile(original, "a", "exec"), ns_a)
    exec(compile(sources["pgolf/submission/budget.py"], "b", "exec"), ns_b)
    assert ns_a["TRAIN_BUDGET_SECONDS"] == ns_b["TRAIN_BUDGET_SECONDS"] == 600.0
    assert strip_docstrings(b'"""doc"""\ndef f():\n    """only a docstring"""\n', "x") == b"def f():\n    pass\n"


@pytest.mark.slow  # the module's bundle fixture builds one (seconds)
def test_corrupt_or_foreign_bundle_is_one_error(bundle, tmp_path):
    path = tmp_path / "train_gpt.py"
    path.write_text("print('hello')\n")
    with pytest.raises(DataError, match="not a pgolf bundle"):
        read_bundle(path)
    path.write_text(bundle.text.replace('ARCHIVE = """', 'ARCHIVE = """!!', 1), encoding="utf-8")
    with pytest.raises(DataError, match="corrupt bundle archive"):
        read_bundle(path)


@pytest.mark.slow  # the module's bundle fixture builds one (seconds)
def test_inspect_shows_counted_bytes_and_modules(bundle, tmp_path, capsys):
    path = tmp_path / "renamed.py"
    path.write_text(bundle.text, encoding="utf-8")
    assert cli(["inspect", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "bundle" and data["counted_bytes"] == path.stat().st_size
    assert data["modules"] == bundle.files


def test_size_counts_the_bundle_and_quantize_reads_its_count(tmp_path):
    model = tmp_path / "artifacts/quant/model.ptz"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"m" * 1000)
    with pytest.raises(DataError, match="counted code file not found \\(run the bundle stage\\)"):
        size_report(model, tmp_path)
    with pytest.raises(DataError, match="reserved_bytes.json: cannot read reserved_bytes"):
        bundle_reserved_bytes(tmp_path)
    (tmp_path / BUNDLE).parent.mkdir(parents=True)
    (tmp_path / BUNDLE).write_bytes(b"#" * 777)
    write_json_atomic(tmp_path / BUNDLE_RESERVE, {"reserved_bytes": 777})
    report = size_report(model, tmp_path)
    assert (report.code_bytes, report.total_bytes, report.code_files) == (777, 1777, [BUNDLE.as_posix()])
    assert report.artifact_sha256 == file_sha256(model) and bundle_reserved_bytes(tmp_path) == 777


# ------------------------------------------------------------------ budgets
TRAIN_M = {"train_seconds": 586.0, "choice_seconds": 3.5, "world_size": 8}
SLIDE_M = {"seconds": 80.0, "compile_seconds": 20.0, "nonoverlap_seconds": 6.0, "world_size": 8,
           "artifact_sha256": "ab" * 32}
TTT_M = {"seconds": 400.0, "compile_seconds": 10.0}


def test_budgets_add_the_right_parts_and_project_to_8_gpus():
    r = budget_report(TRAIN_M, {"seconds": 9.0}, SLIDE_M, TTT_M)
    t, e = r["training"], r["eval"]
    assert t["seconds"] == 586.0 + 3.5 + 9.0 and t["fits"] and t["over_by"] == pytest.approx(-1.5)
    assert (e["scoring_seconds"], e["compile_seconds"]) == (486.0, 30.0) and e["projected_8gpu_seconds"] == 516.0
    one_gpu = budget_report(TRAIN_M, {"seconds": 20.0}, {**SLIDE_M, "world_size": 1}, TTT_M)
    assert one_gpu["eval"]["projected_8gpu_seconds"] == 30.0 + 486.0 / 8
    assert not one_gpu["training"]["fits"] and one_gpu["training"]["over_by"] == pytest.approx(9.5)
    assert over_budget_message(one_gpu) == "training takes 609.5 s, over the 600-s budget by 9.5 s"
    assert "OVER by 9.5 s" in budget_lines(one_gpu)[0]
    with pytest.raises(DataError, match="train metrics: key 'choice_seconds' missing"):
        budget_report({"train_seconds": 1.0}, {"seconds": 1.0}, SLIDE_M, None)


@pytest.mark.parametrize("enforce", [True, False])
def test_budget_stage_gate(tmp_path, enforce):
    for rel, data in (("train", TRAIN_M), ("hessians", {"seconds": 20.0}), ("eval_sliding", SLIDE_M),
                      ("eval_ttt", TTT_M)):
        write_json_atomic(tmp_path / f"artifacts/{rel}/metrics.json", data)
    p = {"budget": {"enforce": enforce}}
    if enforce:
        with pytest.raises(PgolfError, match="budget.json: training takes 609.5 s, over the 600-s budget by 9.5 s"):
            stages.budget.run(p, tmp_path)
    else:
        stages.budget.run(p, tmp_path)
    written = json.loads((tmp_path / "artifacts/budget.json").read_text())
    assert written["fits"] is False and written["artifact_sha256"] == "ab" * 32


@pytest.mark.slow
def test_budget_stage_exit_is_one_line(tmp_path):
    for rel, data in (("train", TRAIN_M), ("hessians", {"seconds": 20.0}), ("eval_sliding", SLIDE_M),
                      ("eval_ttt", TTT_M)):
        write_json_atomic(tmp_path / f"artifacts/{rel}/metrics.json", data)
    (tmp_path / "params.yaml").write_text("budget:\n  enforce: true\n")
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from stages.budget import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: artifacts/budget.json: training takes 609.5 s, over the 600-s budget by 9.5 s"]


# ------------------------------------------------------------------ export provenance
def export(capsys, root: Path, out: Path) -> tuple[int, str]:
    code = cli(["export", "--root", str(root), "--out", str(out)])
    return code, capsys.readouterr().err


def requantize(root: Path) -> None:
    """What `dvc repro size_check` after a quantize.damp change leaves: a new artifact, a new size.json."""
    from pgolf.quant.artifact import read_artifact, write_artifact
    artifact = root / "artifacts/quant/model.ptz"
    a = read_artifact(artifact)
    meta = {**a.meta, "quantize": {**(a.meta.get("quantize") or {}), "damp": 0.02}}
    write_artifact(artifact, a.tensors, a.model_config, meta, "zstd", 3)
    write_size(root)


def test_stale_ttt_score_is_refused(root, tmp_path, capsys):  # noqa: F811
    requantize(root)
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and "eval_sliding/metrics.json: computed from model.ptz sha256" in err
    assert "stale, re-run the eval_sliding stage" in err
    write_eval(root, "eval_sliding", SLIDING)  # sliding re-ran, TTT did not
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "eval_ttt/metrics.json: computed from model.ptz" in err
    write_json_atomic(root / "artifacts/eval_ttt/metrics.json", TTT)  # written by an older pgolf: no sha
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "eval_ttt/metrics.json: no 'artifact_sha256'" in err
    write_eval(root, "eval_ttt", TTT)
    assert export(capsys, root, tmp_path / "out")[0] == 0


def test_stale_bundle_or_budget_is_refused(root, tmp_path, capsys):  # noqa: F811
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "budget: {enforce: true}\n")
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "train_gpt.py: embeds other params than" in err
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("budget: {enforce: true}\n", ""))
    metrics = json.loads((root / "artifacts/bundle/metrics.json").read_text())
    write_json_atomic(root / "artifacts/bundle/metrics.json", {**metrics, "sha256": "0" * 64})
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "bundle/metrics.json: computed from train_gpt.py" in err
    write_json_atomic(root / "artifacts/bundle/metrics.json", metrics)
    write_json_atomic(root / "artifacts/budget.json", {"artifact_sha256": "1" * 64})
    code, err = export(capsys, root, tmp_path / "out")
    assert code == 1 and "budget.json: computed from model.ptz" in err


def test_export_writes_challenge_fields_requirements_and_readme(root, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert cli(["export", "--root", str(root), "--out", str(out), "--author", "A. Golfer", "--github-id", "ag"]) == 0
    s = json.loads((out / "pgolf_results.json").read_text())
    head = ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code"]
    assert list(s)[:len(head)] == head and (s["author"], s["github_id"]) == ("A. Golfer", "ag")
    assert s["artifact_sha256"] == file_sha256(root / "artifacts/quant/model.ptz")
    assert s["bundle_sha256"] == file_sha256(out / "train_gpt.py")
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert {r.split()[0] for r in reqs} >= {"torch", "numpy", "sentencepiece", "PyYAML"}
    readme = (out / "README.md").read_text()
    assert "## Results per seed" in readme and "## Params that differ from the record profile" in readme
    assert f"`train_gpt.py` is {s['bytes_code']:,} bytes" in readme
    assert any(d["key"] == "train.seed" for d in s["params_vs_record"]) is False  # both 1337
    assert {"key": "train.max_steps", "value": 40, "record": 20000} in s["params_vs_record"]
