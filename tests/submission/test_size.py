"""Size gate: which code counts, byte-exact totals, the 16,000,000 boundary, the stage's exit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.errors import DataError, PgolfError
from pgolf.submission.size import EVAL_ENTRY_POINTS, LIMIT_BYTES, _imported_modules, code_bytes, counted_code_files, file_sha256, size_report, warn_if_over
from pgolf.pipeline.paths import BUNDLE
import stages.size_check

REPO = Path(__file__).resolve().parents[2]

TREE = {
    "stages/__init__.py": "",
    "stages/common.py": "from pgolf.config import load\n",
    "stages/eval_sliding.py": "import pgolf.bpb as b\nfrom pgolf.artifact import load\nfrom stages.common import x\n",
    "stages/eval_ttt.py": "import os, torch\nfrom pgolf import ttt, CONSTANT\n\ndef f():\n    import pgolf.lazy\n",
    "stages/train.py": "import pgolf.train\n",
    "pgolf/__init__.py": "CONSTANT = 1\n",
    "pgolf/artifact.py": "from . import quant_grid\nfrom .model import GPT\n",
    "pgolf/model.py": "import numpy\n",
    "pgolf/quant_grid.py": "",
    "pgolf/bpb.py": "",
    "pgolf/ttt.py": "from pgolf.sub.deep import thing\n",
    "pgolf/sub/__init__.py": "",
    "pgolf/sub/deep.py": "",
    "pgolf/lazy.py": "",
    "pgolf/config.py": "",
    "pgolf/train.py": "import pgolf.unused\n",
    "pgolf/unused.py": "",
}
EXPECTED = sorted(set(TREE) - {"stages/train.py", "pgolf/train.py", "pgolf/unused.py"})


def make_tree(root: Path) -> Path:
    for rel, text in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_counted_files_follow_imports_transitively(tmp_path):
    assert counted_code_files(make_tree(tmp_path)) == EXPECTED


def test_missing_entry_point_is_a_data_error(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "stages/eval_ttt.py").unlink()
    with pytest.raises(DataError, match="stages/eval_ttt.py: evaluation entry point not found"):
        counted_code_files(tmp_path)


def test_project_code_list_is_closed_under_imports():
    files = counted_code_files(REPO)
    assert set(EVAL_ENTRY_POINTS) <= set(files) and "pgolf/quant/artifact.py" in files
    for rel in files:
        for dotted in _imported_modules(REPO.resolve(), REPO.resolve() / rel):
            module = REPO.joinpath(*dotted.split("."))
            for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                if candidate.is_file():
                    assert candidate.relative_to(REPO).as_posix() in files, (rel, dotted)


def test_code_bytes_are_raw_file_bytes(tmp_path):
    data = "x = 'héllo €'\r\n# comment\r\n".encode("utf-8")
    (tmp_path / "a.py").write_bytes(data)
    (tmp_path / "b.py").write_bytes(b"")
    assert code_bytes(tmp_path, ["a.py", "b.py"]) == len(data) == 29  # 25 characters


@pytest.mark.parametrize("total,fits", [(15_999_999, True), (16_000_000, True), (16_000_001, False)])
def test_gate_at_the_decimal_limit(tmp_path, total, fits):
    (tmp_path / "code.py").write_bytes(b"a" * 1234)
    model = tmp_path / "model.ptz"
    with open(model, "wb") as f:
        f.truncate(total - 1234)
    report = size_report(model, tmp_path, files=["code.py"])
    assert (report.code_bytes, report.model_bytes, report.total_bytes) == (1234, total - 1234, total)
    assert report.limit == LIMIT_BYTES == 16_000_000
    assert report.fits is fits and report.headroom == 16_000_000 - total


def _stage_root(tmp_path: Path, model_bytes: int) -> Path:
    root = make_tree(tmp_path)
    (root / BUNDLE).parent.mkdir(parents=True)
    (root / BUNDLE).write_bytes(b"# bundle\n" * 1000)  # 9,000 bytes of counted code
    model = root / "artifacts/quant/model.ptz"
    model.parent.mkdir(parents=True)
    with open(model, "wb") as f:
        f.truncate(model_bytes)
    return root


def _code(root: Path) -> int:
    return (root / BUNDLE).stat().st_size


@pytest.mark.parametrize("enforce", [True, False])
def test_stage_over_the_limit(tmp_path, enforce):
    root = _stage_root(tmp_path, 0)
    over = LIMIT_BYTES - _code(root) + 1
    with open(root / "artifacts/quant/model.ptz", "wb") as f:
        f.truncate(over)
    p = {"size": {"enforce": enforce}}
    if enforce:
        with pytest.raises(PgolfError, match="over the 16,000,000-byte limit by 1"):
            stages.size_check.run(p, root)
    else:
        stages.size_check.run(p, root)
    written = json.loads((root / "artifacts/size.json").read_text())
    assert written["fits"] is False and written["total_bytes"] == 16_000_001
    assert written["code_files"] == [BUNDLE.as_posix()] and written["code_bytes"] == 9000
    assert written["artifact_sha256"] == file_sha256(root / "artifacts/quant/model.ptz")


@pytest.mark.slow
def test_stage_exit_code_and_single_line_message(tmp_path):
    root = _stage_root(tmp_path, 0)
    with open(root / "artifacts/quant/model.ptz", "wb") as f:
        f.truncate(LIMIT_BYTES - _code(root) + 5)
    (root / "params.yaml").write_text("size:\n  enforce: true\n")
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from stages.size_check import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: artifacts/size.json: submission is 16,000,005 bytes")


def test_stage_under_the_limit_passes(tmp_path):
    root = _stage_root(tmp_path, 1000)
    report = stages.size_check.run({"size": {"enforce": True}}, root)
    assert report["fits"] and report["total_bytes"] == _code(root) + 1000


def test_warn_if_over(tmp_path, capsys):
    path = tmp_path / "size.json"
    path.write_text(json.dumps({"fits": False, "total_bytes": 16_000_100, "limit": 16_000_000}))
    assert warn_if_over(path) is True
    assert "over the 16,000,000-byte limit by 100" in capsys.readouterr().err
    path.write_text(json.dumps({"fits": True, "total_bytes": 15_000_000, "limit": 16_000_000}))
    assert warn_if_over(path) is False and capsys.readouterr().err == ""
    assert warn_if_over(tmp_path / "missing.json") is True
    assert "size unknown" in capsys.readouterr().err
