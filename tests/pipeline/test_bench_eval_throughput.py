"""bench/eval_throughput.py on a CPU with the tiny profile: flags reach the measurement."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # runs the benchmark as a subprocess

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "bench/eval_throughput.py", str(out), "--profile", "tiny",
                           "--device", "cpu", *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_sliding_only_with_a_chosen_batch_and_backend(tmp_path):
    r = run(tmp_path, "--skip-ttt", "--batch-windows", "3", "--attention-backend", "math")
    assert (r["batch_windows"], r["attention_backend"]) == (3, "math")
    assert "ttt" not in r and r["warmup_seconds_ttt"] == 0.0
    s = r["sliding"]
    assert s["rank0_targets"] > 0 and s["per_gpu_tokens_per_s"] > 0
    # With compile time 0-ish on CPU the two projections agree up to the warm-up seconds.
    assert r["sliding_projected_with_compile_s"] >= s["projected_seconds_fineweb"]


def test_default_run_measures_ttt_too(tmp_path):
    r = run(tmp_path)
    assert r["batch_windows"] == 8 and r["ttt"]["train_steps"] > 0
