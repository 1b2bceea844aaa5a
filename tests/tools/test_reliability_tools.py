"""The `pgolf` command line under hostile input and for a new user (issue 18, items 3, 8, 12).

Fixture tests/fixtures/dvc_exp_show_sweep.json is REAL `dvc exp show --json`
output (DVC 3.67.1) of a real queued sweep: the tiny project of
tests/test_sweep.py, `dvc repro`, then
`dvc exp run --queue -S quantize.damp=0.01,0.02,0.05,0.1` and
`dvc exp run --run-all -j 1`. Regenerate it with
`PYTHONPATH=$PWD DVC_NO_ANALYTICS=1 python tests/helpers/make_exp_show_fixture.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.errors import DataError, ParamError
from pgolf.tools.cli import main

REPO = Path(__file__).resolve().parents[2]
EXP_SHOW = REPO / "tests" / "fixtures" / "dvc_exp_show_sweep.json"


def exp_show() -> list:
    return json.loads(EXP_SHOW.read_text())


def fixture_experiments() -> list[tuple[str, str, float]]:
    """(name, full sha, damp) of each experiment in the fixture, read without pgolf's walker."""
    out = []
    for commit in exp_show():
        for wrapper in commit.get("experiments") or []:
            for rev in wrapper["revs"]:
                damp = rev["data"]["params"]["params.yaml"]["data"]["quantize"]["damp"]
                out.append((wrapper["name"], rev["rev"], damp))
    return out


# --- item 3: significance reads DVC 3.67 experiments --------------------------------

def test_fixture_is_a_real_four_run_sweep():
    exps = fixture_experiments()
    assert sorted(d for _, _, d in exps) == [0.01, 0.02, 0.05, 0.1]
    assert all(len(sha) == 40 for _, sha, _ in exps)


def test_every_experiment_of_a_real_sweep_is_found_by_name_and_sha():
    from pgolf.tools.run_metrics import dvc_experiment_metrics
    show = exp_show()
    for name, sha, _ in fixture_experiments():
        by_name = dvc_experiment_metrics(name, show)
        assert by_name == dvc_experiment_metrics(sha, show) == dvc_experiment_metrics(sha[:7], show)
        rev = next(r for c in show for w in c.get("experiments") or [] for r in w["revs"] if r["rev"] == sha)
        # The headline is the TTT metrics file of that very experiment.
        assert by_name == rev["data"]["metrics"]["artifacts/eval_ttt/metrics.json"]["data"]
    with pytest.raises(DataError, match="experiment no-such-exp: not found"):
        dvc_experiment_metrics("no-such-exp", show)


def _fake_dvc(monkeypatch):
    """`dvc exp show --json` answers with the fixture (patched where run_metrics calls it)."""
    import pgolf.tools.run_metrics as run_metrics
    text = EXP_SHOW.read_text()

    def fake_run(cmd, **kwargs):
        assert cmd[:4] == ["dvc", "exp", "show", "--json"], cmd
        return subprocess.CompletedProcess(cmd, 0, stdout=text, stderr="")
    monkeypatch.setattr(run_metrics.subprocess, "run", fake_run)


def test_significance_cli_on_experiment_names(monkeypatch, capsys):
    _fake_dvc(monkeypatch)
    names = [name for name, _, _ in sorted(fixture_experiments(), key=lambda e: e[2])]
    assert main(["significance", "--candidate", *names[:2], "--baseline", *names[2:], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    show = exp_show()
    from pgolf.tools.run_metrics import dvc_experiment_metrics
    assert report["candidate"] == [dvc_experiment_metrics(n, show)["val_loss"] for n in names[:2]]
    assert report["improvement_bpb"] is not None


# --- item 8: one line, never a traceback --------------------------------------------

def _metrics_files(tmp_path: Path, values: dict[str, list]) -> dict[str, list[str]]:
    out = {}
    for side, vals in values.items():
        out[side] = []
        for i, v in enumerate(vals):
            path = tmp_path / f"{side}{i}.json"
            path.write_text(f'{{"val_loss": {v}, "val_bpb": 1.0}}')
            out[side].append(str(path))
    return out


@pytest.mark.parametrize("case,candidate,baseline,message", [
    ("one_run", [2.0], [2.1, 2.2], "error: significance: need at least 2 runs on each side for a t-test "
                                   "(candidate 1, baseline 2)"),
    ("nan", ["NaN", 2.0], [2.1, 2.2], "error: {c0}: metric 'val_loss' is nan, not a finite number"),
    ("inf", [2.0, 2.01], ["Infinity", 2.2], "error: {b0}: metric 'val_loss' is inf, not a finite number"),
])
def test_significance_bad_input_is_one_line(tmp_path, capsys, case, candidate, baseline, message):
    files = _metrics_files(tmp_path, {"c": candidate, "b": baseline})
    assert main(["significance", "--candidate", *files["c"], "--baseline", *files["b"]]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [message.format(c0=files["c"][0], b0=files["b"][0])]


def test_welch_refuses_non_finite_values_with_a_value_error():
    from pgolf.tools.significance import welch_improvement_test
    with pytest.raises(ValueError, match="finite"):
        welch_improvement_test([1.0, float("nan")], [2.0, 2.1])


@pytest.mark.slow
def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    for i in range(400):
        (tmp_path / f"m{i}.json").write_text(f'{{"val_bpb": 1.{i}, "val_loss": 2.0, "nonoverlap_val_bpb": 1.0}}')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pgolf", "inspect", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().decode().startswith(str(tmp_path))
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""


# --- item 12: newcomer paths ----------------------------------------------------------

def test_params_help_lists_every_profile(capsys):
    with pytest.raises(SystemExit):
        main(["params", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for profile in sorted(p.stem for p in (REPO / "conf" / "profile").glob("*.yaml")):
        assert profile in out
    assert "gpu_gap" in out


def test_params_set_is_validated_before_writing(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert main(["params", "--set", "train.seed=abc", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: params.yaml: train.seed: expected an integer, got 'abc'"]
    assert not out.exists()
    assert main(["params", "--set", "quantize.damp=-1", "--out", str(out)]) == 1
    assert "quantize.damp" in capsys.readouterr().err and not out.exists()
    assert main(["params", "--set", "train.seed=7", "--out", str(out)]) == 0
    assert "seed: 7" in out.read_text()


def test_yaml_and_json_error_messages_read_once(tmp_path):
    from pgolf.config import load_params
    from pgolf.data.corpus import _parse_jsonl_line
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  seed: [1\n")
    with pytest.raises(ParamError) as info:
        load_params(bad)
    assert str(info.value) == f"{bad}: invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"
    with pytest.raises(DataError) as info:
        _parse_jsonl_line(b'{"text": "unterminated', Path("c.jsonl"), 3)
    assert str(info.value) == "c.jsonl: line 3: invalid JSON (Unterminated string starting at column 10)"


def _png(width: int, height: int) -> bytes:
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


STAGE_LOGS = {
    "hessians.log": "hessians: source train, world 1, device cpu\ncalibration: 2 batches\n"
                    "calibration: 1/2 batches (50%), 307 tok/s, elapsed 0s, ETA 0s\n"
                    "hessians (train): 8 matrices from 8 sequences / 256 tokens in 6.3 s\n",
    "quantize.log": "quantize (gptq): 12 matrices\nquantize (gptq): 12/12 matrices (100%), 22.89 matrices/s, "
                    "elapsed 1s\nwarning: the model was trained with late QAT at 6 bits\n"
                    "quantize: 16/31 tensors quantised, artifact 37,643 bytes in 4.0 s\n",
    "eval_sliding.log": "eval_sliding: 47,424 targets, world 1, device cpu\nsliding windows: 2,963 windows\n"
                        "eval_sliding: val_bpb 2.878909 over 47,424 targets\n",
    "eval_ttt.log": "eval_ttt: 47,424 targets, sgd lr 0.002 x 1 epochs, world 1, device cpu\n"
                    "eval_ttt: val_bpb 2.859228 (sliding 2.878909, gain +0.019681)\n",
}


def test_inspect_recognises_every_file_the_pipeline_writes(tmp_path):
    from pgolf.tools.inspect import InspectOptions, summarise_directory, summarise_file
    for name, text in STAGE_LOGS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "layer_error.json").write_text(json.dumps([
        {"tensor": "blocks.0.attn.c_q.weight", "weight_mse": 1e-4, "hessian_error": 0.01},
        {"tensor": "blocks.0.mlp.fc.weight", "weight_mse": 2e-4, "hessian_error": 0.03}]))
    live = tmp_path / "live"
    (live / "plots" / "metrics").mkdir(parents=True)
    (live / "metrics.json").write_text(json.dumps({"train_loss": 4.4, "lr_scale": 0.05, "grad_norm": 0.46,
                                                   "tokens_per_s": 400.1, "train_seconds": 51.2, "step": 40}))
    (live / "plots" / "metrics" / "train_loss.tsv").write_text("step\ttrain_loss\n1\t6.2\n10\t5.1\n40\t4.4\n")
    (tmp_path / "loss.png").write_bytes(_png(770, 440))
    directory, summaries, errors = summarise_directory(tmp_path, InspectOptions())
    assert errors == [] and directory.facts["skipped"] == []
    kinds = {Path(s.path).name: s.kind for s in summaries}
    assert kinds == {**{name: "stage_log" for name in STAGE_LOGS}, "layer_error.json": "layer_error",
                     "metrics.json": "live_metrics", "train_loss.tsv": "live_curve", "loss.png": "plot_image"}
    quant = summarise_file(tmp_path / "quantize.log", InspectOptions())
    assert quant.facts["stage"] == "quantize" and quant.facts["warnings"] == [
        "warning: the model was trained with late QAT at 6 bits"]
    assert quant.facts["last_line"].startswith("quantize: 16/31 tensors quantised")
    layer = summarise_file(tmp_path / "layer_error.json", InspectOptions())
    assert layer.facts["worst"][0]["tensor"] == "blocks.0.mlp.fc.weight"
    curve = summarise_file(live / "plots" / "metrics" / "train_loss.tsv", InspectOptions())
    assert (curve.facts["metric"], curve.facts["points"], curve.facts["last"]) == ("train_loss", 3, 4.4)
    assert summarise_file(tmp_path / "loss.png", InspectOptions()).facts["width"] == 770


def test_results_view_puts_scores_and_changed_params_first(capsys):
    assert main(["results", "--exp-show", str(EXP_SHOW)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "sliding", "bpb", "TTT", "bpb", "total", "bytes", "fits",
                                "quantize.damp"]
    show = exp_show()
    from pgolf.tools.run_metrics import dvc_experiment_metrics
    for name, _, damp in fixture_experiments():
        row = next(line for line in lines if line.startswith(name + " "))
        ttt = dvc_experiment_metrics(name, show)["val_bpb"]
        assert f"{ttt:.6f}" in row.split() and str(damp) == row.split()[-1]
    assert main(["results", "--exp-show", str(EXP_SHOW), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {name for name, _, _ in fixture_experiments()}
    assert all(set(r["changed_params"]) == {"quantize.damp"} for r in rows)


def test_results_from_the_workspace_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "artifacts" / "eval_sliding").mkdir(parents=True)
    (tmp_path / "artifacts" / "eval_sliding" / "metrics.json").write_text('{"val_bpb": 1.61754185}')
    (tmp_path / "artifacts" / "size.json").write_text('{"total_bytes": 15999999, "fits": true}')
    monkeypatch.chdir(tmp_path)
    assert main(["results"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["workspace", "1.617542", "-", "15,999,999", "yes"]
    monkeypatch.chdir(tmp_path / "artifacts")
    assert main(["results"]) == 1
    assert "no metrics yet" in capsys.readouterr().err


@pytest.mark.slow
def test_ttt_says_when_val_fits_in_one_chunk(tmp_path, tiny_data, capfd):
    """Only chunks before the last are trained on: with one chunk TTT is the sliding score."""
    import stages.eval_ttt
    from tests.helpers import TINY_TRAIN_PARAMS
    from tests.helpers.models import write_eval_root
    from pgolf.tools.profiles import compose
    write_eval_root(tmp_path, tiny_data, TINY_TRAIN_PARAMS["model"])
    (tmp_path / "artifacts" / "eval_sliding").mkdir(parents=True)
    (tmp_path / "artifacts" / "eval_sliding" / "metrics.json").write_text('{"val_bpb": 3.0}')
    params = compose("cpu")
    params["launch"]["device"] = "cpu"
    params["eval_sliding"].update(seq_len=32, stride=32, batch_windows=64, compile=False)
    params["eval_ttt"].update(chunk_tokens=10_000_000, epochs=1, batch_seqs=8)
    metrics = stages.eval_ttt.run(params, tmp_path)
    assert metrics["chunks"] == 1 and metrics["train_steps"] == 0 and metrics["ttt_trained"] is False
    warning = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: val has")]
    assert warning == [f"warning: val has {metrics['scored_tokens']:,} targets, within one chunk of "
                       "eval_ttt.chunk_tokens 10,000,000: nothing was trained on (lower it for TTT to act)"]
    saved = json.loads((tmp_path / "artifacts" / "eval_ttt" / "metrics.json").read_text())
    assert saved["ttt_trained"] is False
    assert warning[0].removeprefix("warning: ") in (tmp_path / "artifacts" / "eval_ttt" / "eval_ttt.log").read_text()
