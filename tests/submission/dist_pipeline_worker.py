"""Every stage after the data ones in ONE torchrun launch (the test of a 2-process bundle run).

    torchrun --standalone --nproc_per_node=N tests/submission/dist_pipeline_worker.py ROOT

Calls the stages' own ``run`` functions as their dvc.yaml commands would, each
with the launch facts: train, hessians, eval_sliding and eval_ttt on every
rank; bundle, quantize and size_check (single-process stages) on rank 0.
One launch instead of six keeps the test's process start-up cost down.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stages.bundle  # noqa: E402
import stages.eval_sliding  # noqa: E402
import stages.eval_ttt  # noqa: E402
import stages.hessians  # noqa: E402
import stages.quantize  # noqa: E402
import stages.size_check  # noqa: E402
import stages.train  # noqa: E402
from pgolf.distributed import barrier, shutdown  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1])
    p = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    launch = dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                  local_rank=int(os.environ["LOCAL_RANK"]))
    try:
        stages.train.run(p, root, curves=False, **launch)
        stages.hessians.run(p, root, **launch)
        if launch["rank"] == 0:
            stages.bundle.run(p, root)
            stages.quantize.run(p, root)
            stages.size_check.run(p, root)
        barrier()
        stages.eval_sliding.run(p, root, **launch)
        stages.eval_ttt.run(p, root, **launch)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
