"""Two gloo processes train the same model as one process with twice the accumulation.

The same params file runs under ``torchrun --nproc_per_node=2`` (grad accum 1
per rank) and as one process (grad accum 2): the loader gives both the same
tokens per step, and the optimizer averages gradients across ranks before
clipping, so the runs differ only by floating-point summation order (and the
bf16 Newton–Schulz on a rank's bank shard instead of the whole bank). Three
layers make the MLP banks' leading dimension 3, so the sharded Muon path pads
it to 4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers import REPO, link_data, tiny_train_params

from pgolf.model.checkpoint import load_checkpoint
from pgolf.config import from_params
from pgolf.model.gpt import GPT, ModelConfig

# Measured on this CPU: max |Δ| = 0, the runs are bit-identical. With two
# ranks every cross-rank sum has two terms (a + b is exact-commutative) and
# (a + b) / 2 == a/2 + b/2 exactly in binary floating point; NS5 runs per
# matrix, so sharding does not change it. The tolerance leaves room only for
# a different grouping of the float64 clip-norm sum.
WEIGHT_ATOL = 1e-6
LOSS_ATOL = 1e-6

PARAMS = tiny_train_params(
    model={"num_layers": 3, "xsa_layers": [2], "ve_layers": [2]},
    train={"max_steps": 20, "warmdown_steps": 10, "final_weights": "live", "log_every": 5})


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(root: Path, tiny_data: Path, nproc: int) -> dict:
    link_data(root, tiny_data)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + ["-m", "stages.train"]
    out = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((root / "artifacts/train/metrics.json").read_text())


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path, tiny_data):
    two = _run(tmp_path / "two", tiny_data, nproc=2)
    one = _run(tmp_path / "one", tiny_data, nproc=1)
    assert (two["world_size"], two["grad_accum"]) == (2, 1)
    assert (one["world_size"], one["grad_accum"]) == (1, 2)
    assert two["steps"] == one["steps"] == 20 and two["tokens"] == one["tokens"]
    assert two["swa_count"] == one["swa_count"] > 0 and two["qat_from_step"] == one["qat_from_step"]
    for key in ("final_train_loss", "holdout_loss_live", "holdout_loss_ema", "holdout_loss_swa"):
        assert two[key] == pytest.approx(one[key], abs=LOSS_ATOL), key

    a = load_checkpoint(tmp_path / "two/artifacts/train/model.pt").state_dict
    b = load_checkpoint(tmp_path / "one/artifacts/train/model.pt").state_dict
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |weight difference| after 20 steps: {worst:.3g}")
    assert worst <= WEIGHT_ATOL
    # Training moved the weights far more than the tolerance, so equality is not trivial.
    torch.manual_seed(PARAMS["train"]["seed"])  # the Trainer's initialisation
    init = GPT(from_params(ModelConfig, PARAMS, "model")).state_dict()
    assert max((b[k] - init[k]).abs().max().item() for k in b) > 1e4 * WEIGHT_ATOL
