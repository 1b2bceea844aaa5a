"""The training loop and the train stage on real text (tiny model, CPU, a few seconds each)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from tests.helpers import link_data, tiny_train_params

import stages.train
from pgolf.model.checkpoint import load_checkpoint
from pgolf.config import from_params
from pgolf.errors import ParamError, PgolfError
from pgolf.train.schedule import warmdown_scale_by_steps
from pgolf.train.loop import Trainer
from pgolf.train.config import TrainConfig
from pgolf.train.log import TrainReporter

OUT = Path("artifacts/train")


pytestmark = pytest.mark.usefixtures("one_thread")


def train_in(root: Path, tiny_data: Path, **overrides: dict) -> dict:
    """Run the train stage under ``root`` on the tiny_data shards; return its metrics."""
    return stages.train.run(tiny_train_params(**overrides), link_data(root, tiny_data))


def curve(root: Path, name: str) -> list[tuple[int, float]]:
    lines = (root / OUT / "live/plots/metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(s), float(v)) for s, v in (line.split("\t") for line in lines)]


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_loss_falls_on_real_text_and_outputs_are_complete(tmp_path, tiny_data):
    m = train_in(tmp_path, tiny_data, train={"max_steps": 60, "warmdown_steps": 30})
    losses = curve(tmp_path, "train_loss")
    assert losses[0][0] == 1 and losses[-1][0] == 60
    assert m["final_train_loss"] < losses[0][1] - 1.0
    assert m["holdout_loss_live"] < math.log(512) - 1.0
    assert m["steps"] == 60 and m["tokens"] == 60 * 512 and m["stopped_by"] == "max_steps"
    ckpt = load_checkpoint(tmp_path / OUT / "model.pt")
    assert ckpt.model_config.vocab_size == 512 and ckpt.meta["weights"] == m["final_weights"]
    config = json.loads((tmp_path / OUT / "config.json").read_text())
    assert config["train"]["max_steps"] == 60 and config["optim"]["muon_lr"] == 0.05
    log = (tmp_path / OUT / "train.log").read_text()
    assert "step 60/60" in log and "final weights:" in log


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_warmdown_qat_and_swa_decisions_follow_the_schedule(tmp_path, tiny_data):
    steps, warmdown, qat_at, swa_at, swa_every = 30, 16, 0.3, 0.5, 3
    m = train_in(tmp_path, tiny_data, train={"max_steps": steps, "warmdown_steps": warmdown,
                                             "qat_lr_scale_threshold": qat_at},
                 optim={"swa_lr_scale_threshold": swa_at, "swa_every": swa_every})
    scales = [warmdown_scale_by_steps(i, steps, warmdown) for i in range(steps)]
    # QAT switches on at the first step trained with scale < threshold.
    assert m["qat_enabled"] and m["qat_from_step"] == next(i for i, s in enumerate(scales) if s < qat_at)
    # A snapshot after step i (0-based) when its scale < threshold and (i + 1) % every == 0.
    assert m["swa_count"] == sum(1 for i, s in enumerate(scales) if s < swa_at and (i + 1) % swa_every == 0) > 0
    lr = curve(tmp_path, "lr_scale")
    assert lr[0][1] == 1.0 and lr[-1][1] == pytest.approx(1 / warmdown)
    losses = [m[f"holdout_loss_{k}"] for k in ("live", "ema", "swa")]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert m["final_weights"] in ("live", "ema", "swa")
    assert m[f"holdout_loss_{m['final_weights']}"] == min(losses)
    ckpt = load_checkpoint(tmp_path / OUT / "model.pt")
    assert ckpt.meta["qat"] == {"enabled": True, "bits": {"attn": 6, "mlp": 6}, "from_step": m["qat_from_step"]}
    averages = torch.load(tmp_path / OUT / "averages.pt", weights_only=True)
    chosen = averages["weights"][m["final_weights"]]
    assert all(torch.equal(chosen[k], v) for k, v in ckpt.state_dict.items())
    assert averages["swa_count"] == m["swa_count"]


def test_qat_and_swa_stay_off_when_disabled(tmp_path, tiny_data):
    m = train_in(tmp_path, tiny_data, train={"max_steps": 12, "warmdown_steps": 12, "qat_lr_scale_threshold": 0.0},
                 optim={"swa_lr_scale_threshold": 0.0})
    assert not m["qat_enabled"] and m["qat_from_step"] is None
    assert m["swa_count"] == 0 and m["holdout_loss_swa"] is None and m["final_weights"] in ("live", "ema")


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_forced_final_weights_are_written(tmp_path, tiny_data):
    m = train_in(tmp_path, tiny_data, train={"max_steps": 12, "warmdown_steps": 12, "final_weights": "ema"})
    assert m["final_weights"] == "ema"
    averages = torch.load(tmp_path / OUT / "averages.pt", weights_only=True)
    ckpt = load_checkpoint(tmp_path / OUT / "model.pt")
    assert all(torch.equal(averages["weights"]["ema"][k], v) for k, v in ckpt.state_dict.items())
    assert not all(torch.equal(averages["weights"]["live"][k], v) for k, v in ckpt.state_dict.items())
    with pytest.raises(PgolfError, match="final_weights: 'swa'"):
        train_in(tmp_path / "noswa", tiny_data, train={"max_steps": 4, "warmdown_steps": 0, "final_weights": "swa"})


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_compile_warmup_restores_the_starting_state_exactly(tmp_path, tiny_data):
    plain = dict(train={"max_steps": 8, "warmdown_steps": 4})
    warmed = dict(train={"max_steps": 8, "warmdown_steps": 4, "compile_warmup_steps": 3})
    m = train_in(tmp_path / "a", tiny_data, **plain)
    w = train_in(tmp_path / "b", tiny_data, **warmed)
    assert w["compile_warmup_seconds"] > 0 and m["compile_warmup_seconds"] == 0
    a = load_checkpoint(tmp_path / "a" / OUT / "model.pt").state_dict
    b = load_checkpoint(tmp_path / "b" / OUT / "model.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_resume_state(tmp_path, tiny_data, monkeypatch):
    real_step = Trainer.train_step

    def poisoned(self, lr_scale, step):
        loss, stats = real_step(self, lr_scale, step)
        return (loss * math.nan if step == 5 else loss), stats

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(PgolfError) as err:
        train_in(tmp_path, tiny_data, train={"max_steps": 20, "warmdown_steps": 0, "resume_every": 4})
    message = str(err.value)
    assert "\n" not in message
    assert "non-finite loss or gradient at step 6" in message and "(step 4)" in message
    payload = torch.load(tmp_path / "artifacts/train_resume/state.pt", weights_only=True)
    assert payload["step"] == 4 and not payload["finished"]  # the last good state, kept
    assert not (tmp_path / OUT / "model.pt").exists()


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_wall_clock_cap_and_time_warmdown(tmp_path, tiny_data):
    m = train_in(tmp_path, tiny_data, train={"max_steps": 100_000, "max_train_seconds": 0.6,
                                             "warmdown": "time", "warmdown_frac": 0.5, "log_every": 1})
    assert m["stopped_by"] == "max_train_seconds" and 0 < m["steps"] < 100_000
    assert m["train_seconds"] >= 0.6
    scales = [v for _, v in curve(tmp_path, "lr_scale")]
    assert scales[0] == 1.0 and min(scales) < 0.5
    assert all(b <= a for a, b in zip(scales, scales[1:]))


def test_bad_settings_fail_with_the_key(tmp_path, tiny_data):
    cfg = from_params(TrainConfig, tiny_train_params(), "train")
    assert cfg.grad_accum(1) == 2 and cfg.grad_accum(2) == 1
    with pytest.raises(ParamError, match="train.tokens_per_step"):
        cfg.grad_accum(3)
    with pytest.raises(ParamError, match="train.warmdown"):
        from_params(TrainConfig, tiny_train_params(train={"warmdown": "time"}), "train")
    with pytest.raises(ParamError, match="train.warmdown_steps"):
        from_params(TrainConfig, tiny_train_params(train={"warmdown_steps": 41}), "train")
    with pytest.raises(ParamError, match="train.micro_batch_tokens"):
        from_params(TrainConfig, tiny_train_params(train={"micro_batch_tokens": 100}), "train")
    with pytest.raises(ParamError, match=r"model.vocab_size: 1024 != the tokenizer's 512"):
        train_in(tmp_path, tiny_data, model={"vocab_size": 1024})


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_cls", [io.StringIO, _Terminal])
def test_reporter_logs_lines_and_curves_and_replays_them(tmp_path, stream_cls):
    stream = stream_cls()
    rep = TrainReporter(tmp_path / "train.log", tmp_path / "live", total_steps=4, enabled=True, stream=stream)
    rep.line("hello")
    rep.curve(2, {"train_loss": 3.5})
    rep.progress(2, 1000.0)
    rep.close()
    assert (tmp_path / "train.log").read_text() == "hello\n"
    assert "hello" in stream.getvalue()
    assert ("2/4" in stream.getvalue()) == (stream_cls is _Terminal)  # the tqdm bar, terminals only
    again = TrainReporter(tmp_path / "train.log", tmp_path / "live", total_steps=4, enabled=True,
                          append=True, stream=io.StringIO())
    again.replay(rep.rows)
    again.curve(4, {"train_loss": 3.0})
    again.line("more")
    again.close()
    assert (tmp_path / "train.log").read_text() == "hello\nmore\n"
    rows = (tmp_path / "live/plots/metrics/train_loss.tsv").read_text().splitlines()
    assert rows == ["step\ttrain_loss", "2\t3.5", "4\t3.0"]
    quiet = TrainReporter(tmp_path / "other.log", tmp_path / "live2", 4, enabled=False)
    quiet.line("x")
    quiet.curve(1, {"a": 1.0})
    assert not (tmp_path / "other.log").exists() and quiet.rows == []


@pytest.mark.gpu
def test_cuda_run_compiles_warms_up_and_trains(tmp_path, tiny_data):
    """The CUDA-only path: bf16 autocast, torch.compile, untimed warm-up, pinned batches."""
    m = train_in(tmp_path, tiny_data, launch={"device": "cuda"},
                 train={"max_steps": 30, "warmdown_steps": 15, "compile": True, "compile_warmup_steps": 2})
    assert m["compiled"] and m["compile_warmup_seconds"] > 0 and m["peak_memory_kind"] == "cuda_max_allocated"
    assert m["qat_enabled"] and m["swa_count"] > 0
    assert m["final_train_loss"] < curve(tmp_path, "train_loss")[0][1] - 1.0
