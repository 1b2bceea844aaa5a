"""`pgolf export`: the challenge's submission.json keys (from a fixture) and where the logs go."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf.errors import DataError
from pgolf.pipeline.paths import LAUNCH_LOG_DIR
from pgolf.submission.export import CHALLENGE_FIELDS, RESULTS, export_submission, exported_logs
from tests.helpers.export_root import make_export_root

# Keys of the challenge's example submission.json (the fixture names its source file in openai/parameter-golf).
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "challenge_submission_keys.json"


pytestmark = pytest.mark.slow  # every test builds an export root with its bundle (seconds)


@pytest.fixture
def root(tmp_path) -> Path:
    return make_export_root(tmp_path)


def test_submission_json_has_exactly_the_challenges_keys(root, tmp_path):
    expected = json.loads(FIXTURE.read_text())["keys"]
    export_submission(root, tmp_path / "out", author="A. Golfer", github_id="ag")
    s = json.loads((tmp_path / "out/submission.json").read_text())
    assert list(s) == expected == list(CHALLENGE_FIELDS)
    everything = json.loads((tmp_path / "out" / RESULTS).read_text())
    assert s == {k: everything[k] for k in expected}  # the same values, from our metrics
    assert (s["author"], s["github_id"], s["val_bpb"], s["val_loss"]) == ("A. Golfer", "ag", 1.2, 2.4)
    assert s["bytes_code"] == (tmp_path / "out/train_gpt.py").stat().st_size
    assert s["bytes_total"] == s["bytes_code"] + (tmp_path / "out/model.ptz").stat().st_size


def test_launcher_logs_sit_beside_their_stage_logs(root, tmp_path):
    (root / LAUNCH_LOG_DIR).mkdir(parents=True)
    (root / LAUNCH_LOG_DIR / "train.log").write_text("torchrun: rank 0 ok\n")
    (root / LAUNCH_LOG_DIR / "eval_sliding.log").write_text("torchrun: 2 ranks\n")
    out = tmp_path / "out"
    export_submission(root, out)
    logs = sorted(p.relative_to(out).as_posix() for p in (out / "logs").rglob("*") if p.is_file())
    assert logs == ["logs/eval_sliding/launcher.log", "logs/eval_ttt/ttt.log", "logs/train/launcher.log",
                    "logs/train/train.log"]
    assert not (out / "logs/logs").exists()
    assert (out / "logs/train/launcher.log").read_text() == "torchrun: rank 0 ok\n"
    assert (out / "logs/train/train.log").read_text() == "step 40/40 loss 4.0\n"


def test_two_logs_for_one_place_are_refused(root, tmp_path):
    (root / LAUNCH_LOG_DIR).mkdir(parents=True)
    (root / LAUNCH_LOG_DIR / "train.log").write_text("launcher\n")
    (root / "artifacts/train/launcher.log").write_text("a stage log of that name\n")
    with pytest.raises(DataError, match="would be exported as logs/train/launcher.log"):
        exported_logs(root, tmp_path / "out")
