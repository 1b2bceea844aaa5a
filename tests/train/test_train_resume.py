"""Resumable training: a crashed or kill -9'd run continues bit-identically on CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers import REPO, link_data, tiny_train_params

import stages.train
from pgolf.model.checkpoint import load_checkpoint
from pgolf.errors import DataError, PgolfError
from pgolf.train.loop import Trainer
from pgolf.train.resume import exclusive_run, load_resume_state

MODEL = Path("artifacts/train/model.pt")
AVERAGES = Path("artifacts/train/averages.pt")
STATE = Path("artifacts/train_resume/state.pt")


class SimulatedCrash(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_averages(a: Path, b: Path) -> None:
    pa, pb = (torch.load(p, weights_only=True) for p in (a, b))
    assert pa["holdout_loss"] == pb["holdout_loss"] and pa["swa_count"] == pb["swa_count"]
    for name, weights in pa["weights"].items():
        if weights is None:
            assert pb["weights"][name] is None
            continue
        assert all(torch.equal(weights[k], pb["weights"][name][k]) for k in weights), name


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_crash_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_data, monkeypatch):
    settings = dict(train={"max_steps": 24, "warmdown_steps": 12, "resume_every": 5})
    whole = stages.train.run(tiny_train_params(**settings), link_data(tmp_path / "whole", tiny_data))

    real_step = Trainer.train_step

    def crash_at_13(self, lr_scale, step):
        if step == 13:
            raise SimulatedCrash
        return real_step(self, lr_scale, step)

    crashed = link_data(tmp_path / "crashed", tiny_data)
    monkeypatch.setattr(Trainer, "train_step", crash_at_13)
    with pytest.raises(SimulatedCrash):
        stages.train.run(tiny_train_params(**settings), crashed)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert torch.load(crashed / STATE, weights_only=True)["step"] == 10
    resumed = stages.train.run(tiny_train_params(**settings), crashed)

    assert resumed["resumed_from_step"] == 10 and whole["resumed_from_step"] is None
    for key in ("steps", "final_train_loss", "holdout_loss_live", "holdout_loss_ema", "holdout_loss_swa",
                "swa_count", "qat_from_step", "final_weights"):
        assert resumed[key] == whole[key], key
    assert_same_weights(tmp_path / "whole" / MODEL, crashed / MODEL)
    assert_same_averages(tmp_path / "whole" / AVERAGES, crashed / AVERAGES)
    # The replayed curve has every point of the uninterrupted one.
    curve = "artifacts/train/live/plots/metrics/train_loss.tsv"
    assert (crashed / curve).read_text() == (tmp_path / "whole" / curve).read_text()
    # After success the state is a finished marker: the next run starts fresh.
    state, why = load_resume_state(crashed / STATE, torch.load(crashed / STATE, weights_only=True)["config_hash"])
    assert state is None and "already finished at step 24" in why


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_resume_state_of_another_config_is_ignored(tmp_path, tiny_data, monkeypatch):
    root = link_data(tmp_path, tiny_data)
    real_step = Trainer.train_step

    def crash_at_7(self, lr_scale, step):
        if step == 7:
            raise SimulatedCrash
        return real_step(self, lr_scale, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_7)
    with pytest.raises(SimulatedCrash):
        stages.train.run(tiny_train_params(train={"max_steps": 12, "warmdown_steps": 6, "resume_every": 3}), root)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    # Another seed is another run: it must start at step 0, not resume step 6.
    m = stages.train.run(tiny_train_params(train={"max_steps": 12, "warmdown_steps": 6, "resume_every": 3,
                                                  "seed": 7}), root)
    assert m["resumed_from_step"] is None
    assert "resume state belongs to another config" in (root / "artifacts/train/train.log").read_text()


def test_foreign_resume_file_is_a_clear_data_error(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="state.pt: not a readable resume state.*delete it"):
        load_resume_state(path, "hash")
    torch.save({"format": "something-else"}, path)
    with pytest.raises(DataError, match="not a pgolf resume state"):
        load_resume_state(path, "hash")
    assert load_resume_state(tmp_path / "absent.pt", "hash") == (None, "no resume state")


def _stage_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _prepare(root: Path, tiny_data: Path, params: dict) -> Path:
    link_data(root, tiny_data)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_is_bit_identical(tmp_path, tiny_data):
    params = tiny_train_params(train={"max_steps": 160, "warmdown_steps": 80, "resume_every": 10,
                                      "log_every": 25})
    cmd = [sys.executable, "-m", "stages.train"]
    whole = _prepare(tmp_path / "whole", tiny_data, params)
    subprocess.run(cmd, cwd=whole, env=_stage_env(), check=True, capture_output=True, timeout=300)

    killed = _prepare(tmp_path / "killed", tiny_data, params)
    proc = subprocess.Popen(cmd, cwd=killed, env=_stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / STATE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / MODEL).exists()
    first = torch.load(killed / STATE, weights_only=True)
    assert not first["finished"] and 0 < first["step"] < 160

    out = subprocess.run(cmd, cwd=killed, env=_stage_env(), check=True, capture_output=True, text=True,
                         timeout=300)
    assert f"resuming from step {first['step']}" in (killed / "artifacts/train/train.log").read_text(), out.stdout
    assert_same_weights(whole / MODEL, killed / MODEL)
    assert_same_averages(whole / AVERAGES, killed / AVERAGES)


def test_a_second_run_on_the_same_resume_state_is_refused(tmp_path):
    path = tmp_path / "train_resume/state.pt"
    with exclusive_run(path):
        with pytest.raises(PgolfError, match=rf"another training run \(pid {os.getpid()}\)"):
            with exclusive_run(path):
                pass
    with exclusive_run(path):  # released with its holder
        pass
