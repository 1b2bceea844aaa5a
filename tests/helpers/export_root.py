"""A pipeline root with every output `pgolf export` reads, for the export and submission tests."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from pgolf.io import file_sha256, write_json_atomic
from pgolf.pipeline.paths import BUNDLE
from pgolf.submission.bundle import build_bundle
from pgolf.submission.size import report_dict, size_report
from tests.helpers.models import write_tiny_artifact

REPO = Path(__file__).resolve().parents[2]
PARAMS_YAML = """\
corpus: {seed: 11}
tokenizer: {vocab_size: 64}
hessians: {source: train, seed: 13}
train: {seed: 1337, max_steps: 40}
"""
SLIDING = {"val_loss": 2.5, "val_bpb": 1.25, "scored_tokens": 4096, "bytes": 12000, "seconds": 1.5,
           "windows": 64, "nonoverlap_val_loss": 2.6, "nonoverlap_val_bpb": 1.3, "world_size": 2}
TTT = {"val_loss": 2.4, "val_bpb": 1.2, "scored_tokens": 4096, "bytes": 12000, "chunks": 4, "train_steps": 9,
       "sliding_val_bpb": 1.25, "gain_vs_sliding": 0.05, "seconds": 9.0}
TRAIN = {"steps": 40, "tokens": 20480, "train_seconds": 12.5, "ms_per_step": 312.5, "final_weights": "ema",
         "holdout_loss_live": 4.2, "world_size": 1}


def write_size(root: Path, limit: int = 16_000_000) -> dict:
    size = report_dict(size_report(root / "artifacts/quant/model.ptz", root, limit=limit))
    write_json_atomic(root / "artifacts/size.json", size)
    return size


@functools.lru_cache(maxsize=4)
def _bundle(params_yaml: str):
    return build_bundle(REPO, yaml.safe_load(params_yaml))


def write_bundle(root: Path, params_yaml: str = PARAMS_YAML) -> None:
    """The bundle stage's outputs for ``params_yaml`` (built from this repository's code, once per params)."""
    bundle = _bundle(params_yaml)
    (root / BUNDLE).parent.mkdir(parents=True, exist_ok=True)
    (root / BUNDLE).write_text(bundle.text, encoding="utf-8")
    write_json_atomic(root / "artifacts/bundle/metrics.json", bundle.metrics())


def write_eval(root: Path, stage: str, metrics: dict) -> None:
    """Eval metrics as the stages write them: with the sha256 of the artifact scored."""
    sha = file_sha256(root / "artifacts/quant/model.ptz")
    write_json_atomic(root / f"artifacts/{stage}/metrics.json", {**metrics, "artifact_sha256": sha})


def make_export_root(tmp_path: Path) -> Path:
    """A pipeline root with every output export reads (a real tiny .ptz, the rest small JSON/text)."""
    root = tmp_path / "run"
    (root / "artifacts/quant").mkdir(parents=True)
    write_tiny_artifact(root / "artifacts/quant/model.ptz")
    write_bundle(root)
    write_size(root)
    write_eval(root, "eval_sliding", SLIDING)
    write_eval(root, "eval_ttt", TTT)
    write_json_atomic(root / "artifacts/train/metrics.json", TRAIN)
    write_json_atomic(root / "artifacts/quant/metrics.json", {"model_bytes": 1, "weight_mse_mean": 2.5e-6})
    (root / "artifacts/train/train.log").write_text("step 40/40 loss 4.0\n")
    (root / "artifacts/eval_ttt/ttt.log").write_text("chunk 3\n")
    (root / "params.yaml").write_text(PARAMS_YAML)
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    return root
