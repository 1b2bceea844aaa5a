"""bench/pipeline.py runs every stage after the data ones and writes its one-row table, on a CPU too."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_harness_runs_the_real_stages_and_reports_every_figure(tiny_data, tmp_path):
    shutil.copytree(tiny_data / "data", tmp_path / "data")
    for package in ("pgolf", "stages"):  # size_check counts the code under the root
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    overrides = ["model.vocab_size=512", "model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
                 "model.num_kv_heads=1", "model.xsa_layers=[1]", "model.ve_layers=[1]", "model.ve_dim=8",
                 "model.bigram_buckets=64", "model.bigram_dim=16", "model.rope_dims=8",
                 "train.max_steps=4", "train.warmdown_steps=2", "train.seq_len=64", "train.tokens_per_step=512",
                 "train.micro_batch_tokens=256", "train.holdout_tokens=2049", "hessians.seq_len=64",
                 "eval_sliding.seq_len=64", "eval_sliding.stride=32", "eval_ttt.epochs=1",
                 "eval_ttt.chunk_tokens=4096"]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/pipeline.py"), "--root", str(tmp_path),
                           "--profile", "cpu", "--train-seconds", "30", "--out", str(out), "--set", *overrides],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["steps"] == 4 and row["fits"] is True
    assert row["total_bytes"] == row["model_bytes"] + row["code_bytes"]
    assert row["headroom"] == 16_000_000 - row["total_bytes"]
    assert row["quant_gap_bpb"] == pytest.approx(row["quant_bpb"] - row["prequant_bpb"])
    assert row["sliding_8gpu_projected_s"] == pytest.approx(
        row["sliding_compile_s"] + 62_021_632 / (8 * row["sliding_tokens_per_s"]))
    for key in ("train_tokens_per_s", "prequant_bpb", "ttt_bpb", "hessian_seconds", "gptq_seconds",
                "ttt_8gpu_projected_s"):
        assert row[key] > 0, key
    assert "| quant_gap_bpb" in proc.stdout
