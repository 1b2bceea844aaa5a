"""bench/quant_gap.py on a CPU: two tiny run directories, every variant, JSON and table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pgolf.model.checkpoint import save_checkpoint
from pgolf.model.gpt import GPT
from tests.helpers import link_data, tiny_model_config
from tests.helpers.models import QUANT_PARAMS, TINY_GPT

pytestmark = pytest.mark.slow   # runs the benchmark as a subprocess

REPO = Path(__file__).resolve().parents[2]


def make_run(root: Path, data_root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = tiny_model_config(**{**TINY_GPT, "vocab_size": 512, "model_dim": 64, "ve_layers": [], "bigram_buckets": 0,
                               "bigram_dim": 0})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(root / "artifacts/train/model.pt", cfg, model.state_dict(), {})
    link_data(root, data_root)
    params = {**QUANT_PARAMS, "eval_sliding": {"seq_len": 64, "stride": 64, "batch_windows": 4,
                                               "trim_to_seq_len": True, "compile": False}}
    params["hessians"] = {**params["hessians"], "seq_len": 32}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_every_variant_on_two_runs(tmp_path, tiny_data):
    runs = [make_run(tmp_path / f"run{s}", tiny_data, s) for s in (0, 1)]
    out = tmp_path / "gap.json"
    proc = subprocess.run([sys.executable, "bench/quant_gap.py", str(out), *map(str, runs), "--device", "cpu",
                           "--val-tokens", "640"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["variants"] == ["search", "sdclip", "sdclip_embed7", "sdclip_embed7_lqer", "sdclip_embed7_lqer_awq"]
    for run in r["runs"]:
        assert run["hessians"] == "collected" and run["float"]["scored_tokens"] == 640
        for name, v in run["variants"].items():
            assert v["scored_tokens"] == 640
            assert abs(v["gap_bpb"] - (v["val_bpb"] - run["float"]["val_bpb"])) < 1e-12
        assert run["variants"]["sdclip_embed7"]["model_bytes"] < run["variants"]["sdclip"]["model_bytes"]
        assert len(run["variants"]["sdclip_embed7_lqer_awq"]["awq"]) == 1 and not run["variants"]["sdclip"]["awq"]
    assert "sdclip_embed7_lqer_awq" in proc.stdout.splitlines()[-1]
