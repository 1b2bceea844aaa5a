"""Multi-process runs on CPU: the tests' torchrun call, and the gloo setup of the workers it starts."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch

from tests.helpers import REPO


def run_torchrun(worker: Path, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    """``python -m torch.distributed.run --standalone`` of ``worker`` with ``nproc`` processes, one thread
    each, from the repository root; fails the test with the workers' stderr if it does not exit 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(worker), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@contextlib.contextmanager
def gloo_rank() -> Iterator[tuple[int, int]]:
    """In a worker: (rank, world size) of this torchrun process, its gloo group up (CPU, one thread)
    until the block ends."""
    from pgolf.distributed import init_distributed, shutdown
    from pgolf.pipeline.launch import launch_facts

    torch.set_num_threads(1)
    rank, world_size, local_rank = launch_facts()
    init_distributed(rank, world_size, local_rank, "cpu")
    try:
        yield rank, world_size
    finally:
        shutdown()
