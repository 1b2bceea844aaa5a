"""torchrun worker for tests/pipeline/test_eval_distributed.py.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=N
tests/pipeline/dist_eval_worker.py OUT.json``: every rank runs
``tests.helpers.eval_lm.run_all`` (gloo, CPU), and rank 0 writes the sums.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from tests.helpers.eval_lm import run_all  # noqa: E402
from tests.helpers.gloo import gloo_rank  # noqa: E402


def main() -> None:
    with gloo_rank() as (rank, world_size):
        out = run_all(rank, world_size)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
