"""Pictures and logs of the model stages after one tiny run: train → hessians → quantize → evals.

The PNGs must be real PNG files; layer_error.json must hold one entry per
quantised block matrix with the report's numbers; each long stage's log must
hold its progress lines (the totals come from the run's own metrics).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers import link_data, tiny_train_params
from tests.helpers.eval_lm import TILT_OFF

import stages.eval_sliding
import stages.eval_ttt
import stages.hessians
import stages.quantize
import stages.train
from pgolf.config import to_dict
from pgolf.eval.ttt import EvalTTTConfig
from pgolf.quant.quant_config import QuantizeConfig
from pgolf.model.checkpoint import load_checkpoint
from pgolf.model.gpt import unbank_state_dict

pytestmark = pytest.mark.slow   # trains and runs every model stage once (module fixture)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOCK_MATRIX = re.compile(r"^blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")

PARAMS = tiny_train_params(train={"max_steps": 12, "warmdown_steps": 6, "log_every": 4})
PARAMS.update({
    "hessians": {"source": "train", "seq_len": 32, "train_batches": 3, "train_batch_seqs": 4,
                 "ar_num_seqs": 4, "ar_batch_seqs": 2, "ar_temperature": 0.8, "seed": 0,
                 "head": False, "activation_rms": False, "forward_seqs": 0},
    "quantize": to_dict(QuantizeConfig(**{"method": "gptq", "damp": 0.01, "block_size": 16, "act_order": True,
                 "clip_candidates": (0.999, 1.0), "clip_metric": "weight_mse", "attn_bits": 6,
                 "mlp_bits": 6, "embed_bits": 8, "embed_clip_quantile": 0.9999,
                 "passthrough_numel": 256, "compressor": "zstd", "zstd_level": 3, "lzma_preset": 6,
                 "prune": False, "prune_margin_bytes": 0, "fit_to_limit": False,
                 "fit_min_bits": 5, "lqer_top_k": 0, "lqer_rank": 4, "lqer_group": 64,
                 "compression": "plain"})),  # every frontier key at its default (off)
    "eval_sliding": {"seq_len": 32, "stride": 16, "batch_windows": 32, "trim_to_seq_len": True,
                     "compile": False, **TILT_OFF},
    "eval_ttt": to_dict(EvalTTTConfig(**{"chunk_tokens": 8192, "epochs": 1, "optimizer": "sgd", "lr": 0.002,
                 "lr_schedule": "cosine", "momentum": 0.9, "beta2": 0.999, "weight_decay": 0.0,
                 "freeze_blocks": 0, "grad_clip": 1.0, "batch_seqs": 32, **TILT_OFF})),
})


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """One tiny pass through the model stages; (root, each stage's metrics)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = link_data(tmp_path_factory.mktemp("stage_plots"), tiny_data)
        metrics = {}
        for stage in (stages.train, stages.hessians, stages.quantize, stages.eval_sliding, stages.eval_ttt):
            metrics[stage.__name__.split(".")[1]] = stage.run(PARAMS, root)
        return root, metrics
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("picture", ["train/loss.png", "eval_ttt/running_bpb.png", "quant/layer_error.png"])
def test_each_picture_is_a_png(run, picture):
    root, _ = run
    data = (root / "artifacts" / picture).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_layer_error_has_one_entry_per_quantised_block_matrix(run):
    root, _ = run
    rows = json.loads((root / "artifacts/quant/layer_error.json").read_text())
    ckpt = load_checkpoint(root / "artifacts/train/model.pt")
    state = unbank_state_dict(ckpt.state_dict, ckpt.model_config)
    blocks = sorted(name for name, t in state.items()
                    if BLOCK_MATRIX.match(name) and t.numel() > PARAMS["quantize"]["passthrough_numel"])
    assert len(blocks) == 2 * 6  # 2 layers x (Q, K, V, O, up, down), every one above the passthrough size
    assert [row["tensor"] for row in rows] == blocks
    report = {r["name"]: r for r in json.loads((root / "artifacts/quant/report.json").read_text())}
    for row in rows:
        assert set(row) == {"tensor", "weight_mse", "hessian_error"}
        assert row["weight_mse"] == report[row["tensor"]]["weight_mse"] > 0
        assert row["hessian_error"] == report[row["tensor"]]["hessian_error"] > 0


def test_dvc_yaml_declares_the_pictures_and_the_logs():
    declared = {}
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "plots"):
            for entry in stage.get(kind, []):
                declared[next(iter(entry)) if isinstance(entry, dict) else entry] = kind
    for picture in ("train/loss.png", "eval_ttt/running_bpb.png", "quant/layer_error.png",
                    "quant/layer_error.json"):
        assert declared[f"artifacts/{picture}"] == "plots"
    for log in ("hessians/hessians.log", "quant/quantize.log", "eval_sliding/eval_sliding.log",
                "eval_ttt/eval_ttt.log"):
        assert declared[f"artifacts/{log}"] == "outs"


def log_lines(root: Path, rel: str) -> list[str]:
    return (root / "artifacts" / rel).read_text().splitlines()


def test_hessians_log_counts_the_calibration_batches(run):
    root, m = run
    lines = log_lines(root, "hessians/hessians.log")
    assert "calibration: 3 batches" in lines
    assert any(re.fullmatch(r"calibration: 3/3 batches \(100%\), [\d,]+ tok/s, elapsed \d+s", ln)
               for ln in lines)
    assert m["hessians"]["num_tokens"] == 3 * 4 * 32
    assert lines[-1].startswith("hessians (train): 8 matrices from 12 sequences")  # 2 x (qkv, O, up, down)


def test_quantize_log_counts_the_block_matrices(run):
    root, m = run
    lines = log_lines(root, "quant/quantize.log")
    assert any(re.fullmatch(r"quantize \(gptq\): 12/12 matrices \(100%\), [\d.,]+ matrices/s, elapsed \d+s", ln)
               for ln in lines)
    assert lines[-1].startswith(f"quantize: {m['quantize']['num_quantized']}/")


def test_eval_logs_count_windows_and_chunks_with_rates(run):
    root, m = run
    lines = log_lines(root, "eval_sliding/eval_sliding.log")
    windows = m["eval_sliding"]["windows"]
    progress = [ln for ln in lines if ln.startswith("sliding windows: ") and "/" in ln]
    assert len(progress) == 10
    assert progress[-1].startswith(f"sliding windows: {windows:,}/{windows:,} windows (100%)")
    assert all(re.search(r"[\d,]+ tok/s, elapsed \d+s", ln) for ln in progress)
    assert any("ETA" in ln for ln in progress[:-1])
    assert any(ln.startswith("non-overlapping windows: ") and "(100%)" in ln for ln in lines)
    assert lines[-1].startswith(f"eval_sliding: val_bpb {m['eval_sliding']['val_bpb']:.6f}")

    lines = log_lines(root, "eval_ttt/eval_ttt.log")
    chunks = m["eval_ttt"]["chunks"]
    assert chunks >= 3 and f"ttt chunks: {chunks} chunks" in lines
    assert any(ln.startswith(f"ttt chunks: {chunks}/{chunks} chunks (100%)") for ln in lines)
    assert lines[-1].startswith(f"eval_ttt: val_bpb {m['eval_ttt']['val_bpb']:.6f}")


def test_dvc_plots_show_resolves_every_declared_plot(run, tmp_path):
    root, _ = run
    declared = [next(iter(entry)) if isinstance(entry, dict) else entry
                for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
                for entry in stage.get("plots", [])]
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path)
    shutil.copytree(root / "artifacts", tmp_path / "artifacts")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).parent / "dvc"
    for args in (["init", "--no-scm", "-q"], ["plots", "show", "--json"]):
        proc = subprocess.run([str(dvc), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert "errors" not in shown
    resolved = {path for path, items in shown["data"].items()
                if items and all(item["type"] == "image" or item["content"]["data"]["values"] for item in items)}
    for plot in declared:  # a folder of curves resolves to one plot per file in it
        assert plot in resolved or any(path.startswith(plot + "/") for path in resolved), plot
    layer = shown["data"]["artifacts/quant/layer_error.json"][0]["content"]
    assert len(layer["data"]["values"]) == 12 and layer["encoding"]["y"]["field"] == "tensor"
