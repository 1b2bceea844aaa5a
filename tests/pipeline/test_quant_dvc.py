"""The hessians → quantize → size_check stages end to end, and their dvc.yaml blocks."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import stages.hessians
import stages.quantize
import stages.size_check
from pgolf.quant.artifact import HEADER_BYTES, read_artifact
from pgolf.quant.restore import load_dequantized_model
from pgolf.quant.hessian_file import load_hessians
from pgolf.quant.hessians import HessiansConfig
from pgolf.quant.policy import QuantizeConfig
from pgolf.submission.size import SizeConfig, counted_code_files
from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
from tests.helpers.models import (QUANT_PARAMS, quant_params, tiny_model, write_placeholder_bundle,
                                  write_quant_root)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

PARAMS, params = QUANT_PARAMS, quant_params


@pytest.fixture
def root(tmp_path) -> Path:
    return write_quant_root(tmp_path)


@pytest.mark.slow
def test_stages_end_to_end(root, capsys):
    h = stages.hessians.run(params(), root)
    assert h["source"] == "train" and h["num_tokens"] == 2 * 4 * 16 and h["num_matrices"] == 12
    m = stages.quantize.run(params(), root)
    assert "trained with late QAT at 5 bits" in capsys.readouterr().err
    assert m["num_quantized"] > 0 and m["fallback_round_to_nearest"] == 0
    artifact = root / "artifacts/quant/model.ptz"
    first = artifact.read_bytes()
    stages.quantize.run(params(), root)
    assert artifact.read_bytes() == first  # deterministic
    report = json.loads((root / "artifacts/quant/report.json").read_text())
    assert {r["method"] for r in report} == {"gptq", "rtn", "passthrough"}
    # Each row's compressed_bytes is that tensor's frame in the file, exactly.
    stored = read_artifact(artifact)
    assert [r["compressed_bytes"] for r in report] == list(stored.frame_bytes)
    assert HEADER_BYTES + stored.index_frame_bytes + sum(stored.frame_bytes) == len(first)

    original, loaded = tiny_model(), load_dequantized_model(artifact, "cpu")
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = original.forward_logits(ids), loaded.forward_logits(ids)
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()
    assert read_artifact(artifact).meta["quantize"]["damp"] == 0.01

    s = stages.size_check.run(params(), root)
    assert s["fits"] and s["model_bytes"] == len(first) and s["code_files"] == [BUNDLE.as_posix()]
    assert s["code_bytes"] == 54_321 and s["total_bytes"] == 54_321 + len(first)


@pytest.mark.slow
def test_autoregressive_calibration_stage(root):
    h = stages.hessians.run(params(hessians={"source": "autoregressive"}), root)
    assert (h["source"], h["num_sequences"], h["num_tokens"]) == ("autoregressive", 4, 64)


@pytest.mark.slow
def test_compressor_and_level_reach_the_file(root):
    stages.hessians.run(params(), root)
    sizes = {}
    for comp, level in (("zstd", 1), ("zstd", 19), ("lzma", 0), ("lzma", 9)):
        key = "zstd_level" if comp == "zstd" else "lzma_preset"
        stages.quantize.run(params(quantize={"compressor": comp, key: level}), root)
        sizes[comp, level] = (root / "artifacts/quant/model.ptz").stat().st_size
    assert len(set(sizes.values())) == 4, sizes


@pytest.mark.slow
def test_pruning_stage_meets_a_decimal_byte_target(root):
    stages.hessians.run(params(), root)
    unpruned = stages.quantize.run(params(), root)["model_bytes"]
    code = stages.size_check.run(params(), root)["code_bytes"]
    margin = 16_000_000 - code - (unpruned - 40)  # target: 40 bytes below the unpruned size
    m = stages.quantize.run(params(quantize={"prune": True, "prune_margin_bytes": margin}), root)
    assert m["prune_fits"] and m["pruned"] > 0 and m["model_bytes"] <= unpruned - 40
    assert m["prune_target_bytes"] == 16_000_000 - code - margin



@pytest.mark.gpu
def test_stages_on_cuda_match_the_cpu_artifact_closely(root):
    stages.hessians.run(params(), root)
    cpu_tensors = read_artifact(stages_artifact(root, params())).tensors
    cuda = params(launch={"device": "cuda"})
    h = stages.hessians.run(cuda, root)  # bf16 autocast forward: Hessians differ slightly
    assert h["device"] == "cuda" and h["num_tokens"] == 2 * 4 * 16
    cuda_tensors = read_artifact(stages_artifact(root, cuda)).tensors
    for a, b in zip(cpu_tensors, cuda_tensors):
        assert a.name == b.name and a.method == b.method
        if a.quantized:  # same grid; a few integers may differ by one step
            assert (a.q.int() - b.q.int()).abs().float().mean() < 0.2, a.name
    model = load_dequantized_model(root / "artifacts/quant/model.ptz", "cuda")
    assert next(model.parameters()).device.type == "cuda"


def stages_artifact(root: Path, p: dict) -> Path:
    stages.quantize.run(p, root)
    return root / "artifacts/quant/model.ptz"


@pytest.mark.slow
def test_torchrun_two_ranks_sum_to_the_single_process_hessians(root):
    single = stages.hessians.run(params(), root)
    one = load_hessians(root / "artifacts/hessians/hessians.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                           "stages.hessians"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = load_hessians(root / "artifacts/hessians/hessians.pt")
    assert (two.num_tokens, two.num_sequences) == (single["num_tokens"], single["num_sequences"])
    for key, h in one.hessians.items():
        torch.testing.assert_close(two.hessians[key], h, rtol=1e-5, atol=1e-5)
    assert json.loads((root / "artifacts/hessians/metrics.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------- dvc.yaml
STAGE_SECTIONS = {"hessians": (HessiansConfig, ["launch.nproc_per_node", "launch.device"]),
                  "quantize": (QuantizeConfig, ["launch.device"]),
                  "size_check": (SizeConfig, [])}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_stage_params_are_exactly_its_config_fields(stage):
    cls, launch = STAGE_SECTIONS[stage]
    section = "size" if stage == "size_check" else stage
    expected = launch + [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    assert dvc_stages()[stage]["params"] == expected
    project = yaml.safe_load((REPO / "params.yaml").read_text())
    assert sorted(project[section]) == sorted(f.name for f in dataclasses.fields(cls))


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_stage_code_deps_are_its_import_closure(stage):
    expected = set(counted_code_files(REPO, [f"stages/{stage}.py"]))
    deps = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py") and d.startswith(("pgolf/", "stages/"))}
    assert deps == expected
    # The counted code is the bundle: quantize's byte target reads its reserve, size_check counts it.
    bundle_dep = {"quantize": BUNDLE_RESERVE.as_posix(), "size_check": BUNDLE.as_posix()}.get(stage)
    if bundle_dep is not None:
        assert bundle_dep in dvc_stages()[stage]["deps"]


def _materialise(scratch: Path, stages_yaml: dict) -> None:
    """Create every dep and out of every stage with placeholder content."""
    for spec in stages_yaml.values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                rel = next(iter(entry)) if isinstance(entry, dict) else entry
                path = scratch / rel
                if path.exists():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                if rel in ("data/shards",) or rel.endswith("/plots/metrics"):
                    path.mkdir()
                    (path / "placeholder").write_text(rel)
                else:
                    path.write_text(f"placeholder {rel}\n")


def _dvc(scratch: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_changing_quantisation_params_never_reruns_train(tmp_path):
    stages_yaml = dvc_stages()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(REPO / "dvc.yaml", scratch)
    shutil.copy(REPO / "params.yaml", scratch)
    _materialise(scratch, stages_yaml)
    _dvc(scratch, "init", "--no-scm", "-q")
    _dvc(scratch, "commit", "-f", "-q")
    assert json.loads(_dvc(scratch, "status", "--json")) == {}
    downstream = {"hessians", "quantize", "size_check", "eval_sliding", "eval_ttt"}
    # Control: a train param does show up as a train change, so the checks below can fail.
    for key, value, stage in (("train.seed", 7, "train"), ("hessians.seq_len", 64, "hessians"),
                              ("quantize.damp", 0.02, "quantize"), ("size.enforce", False, "size_check")):
        project = yaml.safe_load((REPO / "params.yaml").read_text())
        section, leaf = key.split(".")
        project[section][leaf] = value
        (scratch / "params.yaml").write_text(yaml.safe_dump(project))
        # the params stage depends on the whole file (stages/params.py): it checks every edit first;
        # so does the bundle, which embeds every param in train_gpt.py
        assert set(json.loads(_dvc(scratch, "status", "--json"))) == {"params", "bundle", stage}, key
        if stage == "train":
            continue
        dry = _dvc(scratch, "repro", "--dry")
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        assert stage in ran and "train" not in ran and ran <= downstream | {"params", "bundle", "budget"}, (key, ran)
