"""Proof that the bundle is the submission: its train_gpt.py, run alone in an empty records folder
with pgolf out of reach, prints exactly the pipeline's scores and writes the pipeline's artifact.

One module-scoped pipeline run (the real stage functions on the tiny data and model of conftest.py),
then the bundle built from it is run under ``python -I`` (no PYTHONPATH, no current-folder import)
in a fresh folder holding the same shards under the challenge's names.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_data_stages, tiny_data_params, tiny_train_params
from pgolf.submission.bundle import read_bundle
from pgolf.submission.limits import reserved_code_bytes
from pgolf.tools.profiles import compose

DATA_DIR = "data/datasets/fineweb10B_sp1024"
TOKENIZER = "data/tokenizers/fineweb_1024_bpe.model"
TINY_REST = {
    "train": {"max_steps": 24, "warmdown_steps": 12, "log_every": 8},
    "hessians": {"seq_len": 32, "train_batches": 2, "train_batch_seqs": 4},
    # The record's encoding path: zstd, fit_to_limit and pruning towards 16,000,000 - bundle - margin.
    "quantize": {"passthrough_numel": 256, "compressor": "zstd", "zstd_level": 10, "prune": True,
                 "fit_to_limit": True, "prune_margin_bytes": 20_000, "clip_candidates": [0.999, 1.0],
                 "block_size": 16},
    "eval_sliding": {"seq_len": 32, "stride": 16, "batch_windows": 8},
    "eval_ttt": {"chunk_tokens": 4096, "epochs": 1, "batch_seqs": 8},
    "bundle": {"data_dir": DATA_DIR, "tokenizer_path": TOKENIZER},
}


def tiny_params(**overrides) -> dict:
    p = compose("cpu")
    for source in (tiny_data_params(corpus={"val_docs": 12}), tiny_train_params(), TINY_REST, overrides):
        for section, values in source.items():
            p[section].update(values)
    return p


def run_pipeline(p: dict, root: Path) -> None:
    """Every stage after the data ones, in dvc.yaml's order, in-process (one process)."""
    import stages.bundle
    import stages.eval_sliding
    import stages.eval_ttt
    import stages.hessians
    import stages.quantize
    import stages.size_check
    import stages.train
    stages.train.run(p, root, curves=False)
    stages.hessians.run(p, root)
    stages.bundle.run(p, root)
    stages.quantize.run(p, root)
    stages.size_check.run(p, root)
    stages.eval_sliding.run(p, root)
    stages.eval_ttt.run(p, root)


def records_folder(root: Path, folder: Path) -> Path:
    """An empty folder with the bundle and the pipeline's shards and tokenizer in the challenge's layout."""
    folder.mkdir(parents=True)
    shutil.copy(root / "artifacts/bundle/train_gpt.py", folder / "train_gpt.py")
    (folder / DATA_DIR).mkdir(parents=True)
    for shard in sorted((root / "data/shards").glob("*_*.bin")):
        shutil.copy(shard, folder / DATA_DIR / f"fineweb_{shard.name}")
    (folder / TOKENIZER).parent.mkdir(parents=True)
    shutil.copy(root / "data/tokenizer/tokenizer.model", folder / TOKENIZER)
    return folder


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}


def run_bundle(folder: Path, nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-I", "train_gpt.py", *extra]
    else:  # torchrun's own python, isolated as well
        cmd = [sys.executable, "-I", "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "train_gpt.py", *extra]
    return subprocess.run(cmd, cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=300)


def printed(stdout: str, name: str) -> tuple[str, str]:
    match = re.search(rf"^{name} val_loss:(\S+) val_bpb:(\S+)$", stdout, re.MULTILINE)
    assert match, f"no {name} line in:\n{stdout[-2000:]}"
    return match.group(1), match.group(2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("pgolf", "stages"):
        (root / name).symlink_to(REPO / name)
    p = tiny_params()
    run_data_stages(p, root)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pipeline(p, root)
    finally:
        torch.set_num_threads(threads)
    return root, p


@pytest.mark.slow
def test_bundle_reproduces_the_pipeline_exactly(pipeline, tmp_path):
    root, p = pipeline
    folder = records_folder(root, tmp_path / "records")
    proc = run_bundle(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sliding = json.loads((root / "artifacts/eval_sliding/metrics.json").read_text())
    ttt = json.loads((root / "artifacts/eval_ttt/metrics.json").read_text())
    size = json.loads((root / "artifacts/size.json").read_text())
    assert printed(proc.stdout, "final_int6_sliding_window_exact") == (
        f"{sliding['val_loss']:.8f}", f"{sliding['val_bpb']:.8f}")
    assert printed(proc.stdout, "legal_ttt_exact") == (f"{ttt['val_loss']:.8f}", f"{ttt['val_bpb']:.8f}")
    results = json.loads((folder / "results.json").read_text())
    # Unrounded: the same floats, the same artifact bytes, the same byte target.
    assert results["eval_sliding"]["val_bpb"] == sliding["val_bpb"]
    assert results["eval_ttt"]["val_bpb"] == ttt["val_bpb"]
    assert (folder / "final_model.ptz").read_bytes() == (root / "artifacts/quant/model.ptz").read_bytes()
    assert results["size"]["total_bytes"] == size["total_bytes"]
    quant = json.loads((root / "artifacts/quant/metrics.json").read_text())
    # Both set aside the bundle's bytes rounded up to bundle.reserve_quantum (size_check adds the exact ones).
    reserved = reserved_code_bytes(size["code_bytes"], p["bundle"]["reserve_quantum"])
    assert size["code_bytes"] <= reserved < size["code_bytes"] + p["bundle"]["reserve_quantum"]
    assert results["quantize"]["target_bytes"] == quant["prune_target_bytes"] == quant["fit_target_bytes"] == (
        16_000_000 - reserved - 20_000)
    assert f"Total submission size: {size['total_bytes']} bytes" in proc.stdout
    assert re.search(r"^step 8/24 loss ", proc.stdout, re.MULTILINE)  # per-step train lines
    assert "budget training:" in proc.stdout and "budget eval:" in proc.stdout
    # The weight choice is timed (it reads training data after the clock), in the stage and in the run.
    train = json.loads((root / "artifacts/train/metrics.json").read_text())
    assert train["choice_seconds"] > 0 and results["train"]["choice_seconds"] > 0
    assert results["budget"]["training"]["choice_seconds"] == results["train"]["choice_seconds"]
    assert sliding["artifact_sha256"] == ttt["artifact_sha256"] == results["artifact_sha256"]
    # Nothing left behind but the run's own outputs.
    assert sorted(p.name for p in folder.iterdir()) == ["data", "final_model.ptz", "logs", "results.json",
                                                        "train_gpt.py"]


@pytest.mark.slow
def test_counted_bytes_are_the_file_size_and_pgolf_is_not_imported(pipeline, tmp_path):
    root, p = pipeline
    bundle = root / "artifacts/bundle/train_gpt.py"
    size = json.loads((root / "artifacts/size.json").read_text())
    metrics = json.loads((root / "artifacts/bundle/metrics.json").read_text())
    assert size["code_bytes"] == metrics["counted_bytes"] == bundle.stat().st_size == len(
        bundle.read_text(encoding="utf-8").encode("utf-8"))
    index = read_bundle(bundle)
    assert index["params"] == p and "pgolf/submission/driver.py" in [f for f, _ in index["files"]]
    unpacked = tmp_path / "src"
    subprocess.run([sys.executable, "-I", str(bundle), "--unpack", str(unpacked)], check=True, env=clean_env())
    assert sorted(str(f.relative_to(unpacked)) for f in unpacked.rglob("*.py")) == sorted(f for f, _ in index["files"])

    # An "installed" pgolf that fails loudly when imported, on sys.path before the bundle runs.
    folder = tmp_path / "run"
    (folder / "site/pgolf").mkdir(parents=True)
    (folder / "site/pgolf/__init__.py").write_text("raise SystemExit('error: the installed pgolf was imported')\n")
    shutil.copy(bundle, folder / "train_gpt.py")

    def probe(preload: bool) -> subprocess.CompletedProcess:
        code = ("import sys, runpy; sys.path.insert(0, 'site'); "
                + ("sys.modules['pgolf'] = type(sys)('pgolf'); sys.modules['pgolf'].__file__ = 'site/x.py'; "
                   if preload else "")
                + "sys.argv = ['train_gpt.py', '--set', 'nope.key=1']; runpy.run_path('train_gpt.py', run_name='__main__')")
        return subprocess.run([sys.executable, "-I", "-c", code], cwd=folder, env=clean_env(),
                              capture_output=True, text=True, timeout=120)
    # The bundle's own pgolf is found first: the driver runs and refuses the bad override in one line.
    proc = probe(False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == ["error: params.yaml: nope.key: unknown key"]
    # A pgolf already imported from elsewhere is refused, never used.
    proc = probe(True)
    assert proc.returncode == 1 and "not from this bundle" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_bundle_over_two_processes_matches_the_pipeline_over_two(pipeline, tmp_path):
    """2 processes over gloo: the bundle against the same stages run by 2 torchrun workers."""
    root, p = pipeline
    two = tmp_path / "two"
    shutil.copytree(root, two, symlinks=True, ignore=shutil.ignore_patterns("artifacts"))
    (two / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name("dist_pipeline_worker.py")), str(two)],
                          cwd=two, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = records_folder(two, tmp_path / "records")
    proc = run_bundle(folder, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    for stage in ("eval_sliding", "eval_ttt"):
        expected = json.loads((two / f"artifacts/{stage}/metrics.json").read_text())
        assert expected["world_size"] == results[stage]["world_size"] == 2
        assert results[stage]["val_bpb"] == expected["val_bpb"], stage
        assert results[stage]["val_loss"] == expected["val_loss"], stage
    assert (folder / "final_model.ptz").read_bytes() == (two / "artifacts/quant/model.ptz").read_bytes()


@pytest.mark.slow
def test_a_feature_on_is_packed_and_reproduces_the_pipeline_off_is_left_out(pipeline, tmp_path):
    """pgolf/submission/optional.py: the tilt off (the fixture's bundle) leaves its module out and still
    runs (the tests above); turned on at run time it is refused at once; on in the params it is packed and
    the bundle prints the pipeline's tilted scores exactly, both under ``python -I`` with pgolf out of reach."""
    root, p = pipeline
    tilt = "pgolf/eval/ngram_tilt.py"
    assert tilt not in [f for f, _ in read_bundle(root / "artifacts/bundle/train_gpt.py")["files"]]
    off = records_folder(root, tmp_path / "off")
    proc = run_bundle(off, 1, "--set", "eval_sliding.ngram_tilt=true")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: eval_sliding.ngram_tilt or eval_ttt.ngram_tilt needs pgolf.eval.ngram_tilt, which this bundle "
        "does not carry (build it with these params)"]
    assert not (off / "logs").exists()  # refused before any work

    on = copy.deepcopy(p)
    on["eval_sliding"]["ngram_tilt"] = on["eval_ttt"]["ngram_tilt"] = True
    on["eval_sliding"]["ngram_order"] = on["eval_ttt"]["ngram_order"] = 3  # gates fire on the tiny stream
    tilted = tmp_path / "tilted"
    shutil.copytree(root, tilted, symlinks=True)
    import stages.bundle
    import stages.eval_sliding
    import stages.eval_ttt
    import stages.quantize
    import stages.size_check
    for stage in (stages.bundle, stages.quantize, stages.size_check, stages.eval_sliding, stages.eval_ttt):
        stage.run(on, tilted)
    assert tilt in [f for f, _ in read_bundle(tilted / "artifacts/bundle/train_gpt.py")["files"]]
    folder = records_folder(tilted, tmp_path / "records")
    proc = run_bundle(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    for stage in ("eval_sliding", "eval_ttt"):
        expected = json.loads((tilted / f"artifacts/{stage}/metrics.json").read_text())
        assert expected["ngram_gated"] > 0, stage  # the tilt did change scores
        assert results[stage]["val_bpb"] == expected["val_bpb"], stage
        assert results[stage]["ngram_gated"] == expected["ngram_gated"], stage
