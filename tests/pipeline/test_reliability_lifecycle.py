"""No lost result, no orphan, one line: the pipeline's life cycle under bad params, failures and kills.

Issue 18, items 1, 2, 5, 8, 9 and 11. The DVC cases run the real dvc.yaml in
a scratch git+DVC project whose stage outputs are placeholders committed as
if a run had made them (as tests/test_quant_dvc.py does), so they take
seconds: only the params stage really runs. The kill and failure cases run
the real train stage on the tiny configuration of tests/helpers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import link_data, tiny_train_params

import stages.params
import stages.train
from pgolf.errors import ParamError, PgolfError
from pgolf.io import pending_path
from pgolf.progress import StageLog
from pgolf.tools.profiles import CONF_DIR, compose
from pgolf.pipeline.paths import RESUME_STATE
from pgolf.train.resume import exclusive_run
from pgolf.pipeline.launch import check_launch, check_nproc_per_node
from pgolf.pipeline.launcher import failure_line

REPO = Path(__file__).resolve().parents[2]
PYTHON_BIN = Path(sys.executable).parent
TORCHRUN_STAGES = ("train", "hessians", "eval_sliding", "eval_ttt")


def project_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO),
            "PATH": f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def sh(args: list[str], cwd: Path, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


# ------------------------------------------------------ items 1, 2: the params stage
def test_params_stage_checks_every_section_and_records_no_values(tmp_path):
    record = stages.params.run(project_params(), tmp_path)
    out = tmp_path / stages.params.OUT
    first = out.read_bytes()
    assert json.loads(first) == record and record["sections"] == sorted(project_params())
    changed = project_params()
    changed["quantize"]["damp"] = 0.05
    changed["train"]["seed"] = 7
    stages.params.run(changed, tmp_path)
    # a valid edit leaves the output's bytes alone, so stages that do not read the key stay cached
    assert out.read_bytes() == first


@pytest.mark.parametrize("key,value,message", [
    ("train.max_steps", "abc", "expected an integer, got 'abc'"),
    ("train.max_step", 100, "unknown key"),
    ("quantize.damp", "x", "expected a number"),
    ("launch.nproc_per_node", 0, "must be an integer >= 1 or 'gpu'"),
    ("launch.devcie", "cpu", "unknown key"),
])
def test_params_stage_refuses_a_bad_key_with_its_name(tmp_path, key, value, message):
    p = project_params()
    section, leaf = key.split(".")
    p[section][leaf] = value
    with pytest.raises(ParamError) as err:
        stages.params.run(p, tmp_path)
    assert str(err.value).startswith(f"params.yaml: {key}: {message}")
    assert not (tmp_path / stages.params.OUT).exists()


def test_params_stage_refuses_an_unknown_section(tmp_path):
    p = {**project_params(), "trian": {"max_steps": 1}}
    with pytest.raises(ParamError, match=r"^params.yaml: trian: unknown section"):
        stages.params.run(p, tmp_path)


@pytest.mark.parametrize("profile", sorted(p.stem for p in (CONF_DIR / "profile").glob("*.yaml")))
def test_every_profile_passes_the_params_stage(tmp_path, profile):
    """Control for the refusals: no shipped profile trips them (record's inputs are under data/challenge/)."""
    assert stages.params.run(compose(profile), tmp_path)["sections"] == sorted(project_params())


def test_every_stage_depends_on_the_params_stage_and_it_on_the_whole_file():
    all_stages = dvc_stages()
    assert all_stages["params"]["params"] == [{"params.yaml": None}]
    assert all_stages["params"]["outs"] == [str(stages.params.OUT)]
    for name, stage in all_stages.items():
        if name != "params":
            assert str(stages.params.OUT) in stage["deps"], name


def _scratch_project(root: Path) -> Path:
    """The project's dvc.yaml, params, conf and code, with every stage output a committed placeholder."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    for name in ("stages", "pgolf", "requirements", "conf", "data/challenge"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages.params.run(project_params(), root)  # the real record: a valid params edit changes nothing
    for spec in dvc_stages().values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
                if path.exists():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.name in ("shards", "metrics") and kind != "metrics":
                    path.mkdir()
                    (path / "placeholder").write_text(str(path))
                else:
                    path.write_text(f"last good {path.name}\n")
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh(["dvc", "init", "-q"], root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    sh(["dvc", "commit", "-f", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "a finished run"], root)
    assert json.loads(sh(["dvc", "status", "--json"], root).stdout) == {}  # control: nothing to re-run
    return root


TRAIN_RESULTS = ("artifacts/train/model.pt", "artifacts/train/train.log", "artifacts/train/metrics.json",
                 "artifacts/train/loss.png", "artifacts/train/live/plots/metrics/placeholder")


@pytest.mark.slow
def test_bad_or_misspelled_params_stop_dvc_before_any_output_is_touched(tmp_path):
    root = _scratch_project(tmp_path / "proj")
    before = {rel: (root / rel).read_bytes() for rel in TRAIN_RESULTS}
    good = (root / "params.yaml").read_text()
    cases = [("train.max_steps", "abc", ["dvc", "repro", "train"]),   # item 1: a wrong type
             ("train.max_step", 100, ["dvc", "repro"])]                # item 2: a misspelled (added) key
    for key, value, command in cases:
        p = yaml.safe_load(good)
        section, leaf = key.split(".")
        p[section][leaf] = value
        (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        proc = sh(command, root, ok=False)
        said = proc.stdout + proc.stderr
        assert proc.returncode != 0, said
        assert len(error_lines(said)) == 1 and error_lines(said)[0].startswith(f"error: params.yaml: {key}: "), said
        assert "Traceback" not in said and "Running stage 'train'" not in said
        assert {rel: (root / rel).read_bytes() for rel in TRAIN_RESULTS} == before, command
    # item 2 under `dvc exp run`: Hydra composes conf/ with the added key into params.yaml
    (root / "params.yaml").write_text(good)
    proc = sh(["dvc", "exp", "run", "-S", "+train.max_step=100"], root, ok=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "max_step: 100" in (root / "params.yaml").read_text()
    assert [ln for ln in error_lines(said) if "train.max_step:" in ln], said
    assert {rel: (root / rel).read_bytes() for rel in TRAIN_RESULTS} == before


@pytest.mark.slow
def test_a_failing_stage_under_dvc_says_one_line_and_dvc_checkout_restores_every_result(tmp_path):
    """Item 8 under `dvc repro`, and item 1's "restorable": what DVC removes before a run is cached."""
    root = _scratch_project(tmp_path / "proj")
    restorable = [*TRAIN_RESULTS, "artifacts/eval_sliding/metrics.json", "artifacts/eval_sliding/eval_sliding.log",
                  "artifacts/eval_ttt/metrics.json", "artifacts/size.json", "artifacts/quant/layer_error.json",
                  "data/metrics/shards.json"]
    before = {rel: (root / rel).read_bytes() for rel in restorable}
    good = (root / "params.yaml").read_text()
    p = yaml.safe_load(good)
    p["eval_sliding"]["stride"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    # --single-item: the edit also re-runs the bundle (it embeds every param) and so quantize; here only
    # the eval stage runs, and the placeholder artifact is refused
    proc = sh(["dvc", "repro", "--single-item", "eval_sliding"], root, ok=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Running stage 'eval_sliding'" in said
    lines = error_lines(said)
    assert len(lines) == 1 and lines[0].startswith("error: artifacts/quant/model.ptz: "), said
    assert lines[0].endswith(" (full log: artifacts/logs/eval_sliding.log)"), said
    assert "ChildFailedError" not in said and "Traceback" not in said
    assert "ChildFailedError" in (root / "artifacts/logs/eval_sliding.log").read_text()
    assert not (root / "artifacts/eval_sliding/metrics.json").exists()  # DVC removed it before the run
    (root / "params.yaml").write_text(good)
    for rel in restorable:
        path = root / rel
        if path.name == "placeholder":
            shutil.rmtree(path.parent)
        elif path.exists():
            path.unlink()
    sh(["dvc", "checkout", "-q"], root)
    assert {rel: (root / rel).read_bytes() for rel in restorable if (root / rel).exists()} == before


# ------------------------------------------------------------ item 5: external data
@pytest.mark.slow
def test_an_added_shard_or_tokenizer_changes_the_data_stages(tmp_path):
    root = _scratch_project(tmp_path / "proj")
    shard = root / "data/challenge/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\0" * 1024)
    status = json.loads(sh(["dvc", "status", "--json"], root).stdout)
    assert {"tokenizer", "shards"} <= set(status), status
    assert "train" not in status  # downstream only through the data stages' outputs
    sh(["dvc", "commit", "-f", "-q"], root)
    assert json.loads(sh(["dvc", "status", "--json"], root).stdout) == {}
    model = root / "data/challenge/tokenizers/fineweb_1024_bpe.model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"model")
    assert {"tokenizer", "shards"} <= set(json.loads(sh(["dvc", "status", "--json"], root).stdout))
    # git never stages the data, only the README and the .dvc files that track it
    ignored = sh(["git", "check-ignore", "--no-index", str(shard), str(model)], root).stdout.split()
    assert len(ignored) == 2
    kept = sh(["git", "check-ignore", "--no-index", "data/challenge/README.md", "data/challenge/datasets.dvc"],
              root, ok=False)
    assert kept.returncode == 1 and kept.stdout == ""


@pytest.mark.parametrize("section,key,value", [
    ("shards", "challenge_dir", "/big/disk/fineweb10B_sp1024"),
    ("shards", "challenge_dir", "data/challenge/../shards"),
    ("tokenizer", "model_path", "data/tokenizers/fineweb_1024_bpe.model"),
])
def test_external_inputs_outside_the_tracked_folder_are_refused(tmp_path, section, key, value):
    p = project_params()
    p[section].update({"source": "challenge" if section == "shards" else "file", key: value})
    with pytest.raises(ParamError, match=rf"^params.yaml: {section}.{key}: .* is not under data/challenge/"):
        stages.params.run(p, tmp_path)
    p[section][key] = "data/challenge/inputs/x"  # control: inside the folder passes
    stages.params.run(p, tmp_path)


# --------------------------------------------------------- item 8: one line, not 34
@pytest.mark.parametrize("value", [0, -1, "0", "abc", True, 1.5, "auto"])
def test_nproc_per_node_must_be_a_positive_count_or_gpu(value):
    with pytest.raises(ParamError, match=r"^params.yaml: launch.nproc_per_node: must be an integer >= 1"):
        check_nproc_per_node(value)


def test_nproc_per_node_accepts_counts_and_gpu():
    assert [check_nproc_per_node(v) for v in (1, "8", "gpu")] == [1, 8, "gpu"]
    assert check_launch({"launch": {"nproc_per_node": 2, "device": "cpu"}}) == (2, "cpu")


def test_every_multi_process_stage_goes_through_the_launcher():
    for name, stage in dvc_stages().items():
        assert "torchrun" not in stage["cmd"], name
    for name in TORCHRUN_STAGES:
        assert dvc_stages()[name]["cmd"] == f"python -m pgolf.pipeline.launcher ${{launch.nproc_per_node}} stages.{name}"


def test_failure_line_prefers_the_stage_error_then_the_worker_exception():
    torchrun_noise = ["Traceback (most recent call last):", '  File "x", line 1',
                      "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "====="]
    assert failure_line(["error: data/x.bin: broken", *torchrun_noise], "stages.train", 1) \
        == "error: data/x.bin: broken"
    assert failure_line(["ValueError: a bug", *torchrun_noise], "stages.train", 1) \
        == "error: stages.train: ValueError: a bug"
    assert failure_line(torchrun_noise, "stages.train", 1) == "error: stages.train: failed with exit status 1"


@pytest.mark.slow
def test_launcher_refuses_zero_processes_in_one_line(tmp_path):
    proc = sh([sys.executable, "-m", "pgolf.pipeline.launcher", "0", "stages.eval_sliding"], tmp_path, ok=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: params.yaml: launch.nproc_per_node: must be an integer >= 1 or 'gpu' "
        "(one process per visible GPU), got 0"]


# ------------------------------------------- items 9, 11: kills, refusals, failures
def _tiny_train_root(tmp_path: Path, tiny_data: Path, **train: object) -> Path:
    root = link_data(tmp_path / "run", tiny_data)
    p = tiny_train_params(train=train)
    full = project_params()
    full.update(p)
    (root / "params.yaml").write_text(yaml.safe_dump(full))
    return root


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_parent_takes_torchrun_and_the_worker_along(tmp_path, tiny_data):
    root = _tiny_train_root(tmp_path, tiny_data, max_steps=100_000, warmdown_steps=10, log_every=1)
    last_good = {"artifacts/train/train.log": "the last good run\n",
                 "artifacts/train/live/plots/metrics/train_loss.tsv": "step\ttrain_loss\n10\t3.5\n"}
    for rel, text in last_good.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    # a stand-in for dvc: starts the stage's command and waits, until it is killed
    stand_in = "import subprocess, sys; subprocess.run([sys.executable, '-m', 'pgolf.pipeline.launcher', '1', 'stages.train'])"
    parent = subprocess.Popen([sys.executable, "-c", stand_in], cwd=root, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = pending_path(root / "artifacts/train/train.log")
    deadline = time.monotonic() + 240
    while "step 3" not in (partial.read_text() if partial.exists() else ""):  # the worker is training
        assert parent.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    tree = _descendants(parent.pid)
    assert len(tree) >= 3, tree  # launcher, torchrun, worker
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in tree if _alive(pid)]
    for pid in survivors:  # don't leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "orphans kept running"
    # item 11: the killed run did not overwrite the last good run's log and curves
    for rel, text in last_good.items():
        assert (root / rel).read_text() == text, rel


def test_a_refused_run_leaves_the_running_ones_logs_alone(tmp_path, tiny_data):
    root = _tiny_train_root(tmp_path, tiny_data)
    log = root / "artifacts/train/train.log"
    log.parent.mkdir(parents=True)
    log.write_text("the last good run\n")
    pending_path(log).write_text("the run in progress\n")
    with exclusive_run(root / RESUME_STATE):  # another training run holds the state
        with pytest.raises(PgolfError, match="another training run .* is using this resume state"):
            stages.train.run(tiny_train_params(), root)
    assert log.read_text() == "the last good run\n"
    assert pending_path(log).read_text() == "the run in progress\n"


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_a_train_run_failing_midway_keeps_the_last_good_log_and_curves(tmp_path, tiny_data, monkeypatch,
                                                                       one_thread):
    root = link_data(tmp_path, tiny_data)
    p = tiny_train_params(train={"max_steps": 20, "warmdown_steps": 10, "log_every": 5})
    stages.train.run(p, root)
    out = root / "artifacts/train"
    kept = {path: path.read_bytes() for path in [out / "train.log", *sorted((out / "live").rglob("*.tsv"))]}
    assert len(kept) >= 2 and b"step 20" in kept[out / "train.log"]

    import pgolf.train.log

    def fail_at_step_10(self, step, values, original=pgolf.train.log.TrainReporter.curve):
        if step >= 10:
            raise RuntimeError("disk full")
        original(self, step, values)
    monkeypatch.setattr(pgolf.train.log.TrainReporter, "curve", fail_at_step_10)
    with pytest.raises(RuntimeError, match="disk full"):
        stages.train.run(tiny_train_params(train={"max_steps": 20, "warmdown_steps": 10, "log_every": 5,
                                                  "seed": 7}), root)
    assert {path: path.read_bytes() for path in kept} == kept
    assert "step 5" in pending_path(out / "train.log").read_text()  # the failed run's own log, beside it


def test_a_failed_stage_log_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "eval_sliding.log"
    with StageLog(path, stream=open(os.devnull, "w")) as log:
        log.line("val_bpb 1.6175")
    with pytest.raises(RuntimeError):
        with StageLog(path, stream=open(os.devnull, "w")) as log:
            log.line("half way")
            raise RuntimeError("killed")
    assert path.read_text() == "val_bpb 1.6175\n"
    assert pending_path(path).read_text() == "half way\nfailed: RuntimeError: killed\n"
    with StageLog(path, stream=open(os.devnull, "w")) as log:  # the next good run replaces both
        log.line("val_bpb 1.6166")
    assert path.read_text() == "val_bpb 1.6166\n" and not pending_path(path).exists()
