"""A tiny git+DVC project for the sweep tests and the `dvc exp show` fixture generator.

The committed conf/ with tiny overrides, so DVC's Hydra composition on
`dvc exp run` produces the same tiny params.yaml as `pgolf params`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pgolf.tools.profiles import compose, write_params
from tests.helpers import TINY_DATA_PARAMS, TINY_TRAIN_PARAMS

REPO = Path(__file__).resolve().parents[2]
# quantize.* reaches only these; hessians read no quantize param, so they are reused too.
RERUN = ["quantize", "size_check", "eval_sliding", "eval_ttt"]
TINY_REST = {
    "hessians": {"seq_len": 32, "train_batches": 2, "train_batch_seqs": 4, "ar_num_seqs": 4, "ar_batch_seqs": 2},
    "quantize": {"passthrough_numel": 256, "compressor": "zstd", "zstd_level": 3, "prune": False,
                 "clip_candidates": [0.999, 1.0], "block_size": 16},
    "eval_sliding": {"seq_len": 32, "stride": 16, "batch_windows": 8},
    "eval_ttt": {"chunk_tokens": 2048, "epochs": 1, "batch_seqs": 8},
}


def tiny_conf(root: Path) -> None:
    params = compose("cpu")
    for source in (TINY_DATA_PARAMS, TINY_TRAIN_PARAMS, TINY_REST):
        for section, values in source.items():
            params[section].update(values)
    shutil.copytree(REPO / "conf", root / "conf")
    text = "defaults:\n  - _self_\n  - profile: cpu\n\n" + yaml.safe_dump(params, sort_keys=False)
    (root / "conf" / "config.yaml").write_text(text)
    write_params(root / "params.yaml", params, "cpu")


def run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def make_project(root: Path) -> Path:
    """A git + DVC project at ``root`` with the repository's code, dvc.yaml and the tiny conf, committed."""
    root.mkdir(parents=True)
    for name in ("pgolf", "stages", "requirements", "data/challenge"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    tiny_conf(root)
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "t@example.com"], root)
    run(["git", "config", "user.name", "t"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)  # dvclive needs a non-empty git repo
    return root
