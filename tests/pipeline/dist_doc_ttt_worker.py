"""torchrun worker for tests/pipeline/test_doc_ttt_distributed.py.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node=N
tests/pipeline/dist_doc_ttt_worker.py OUT_PREFIX``: every rank runs per-document
LoRA TTT with phases on the tiny float64 model (gloo, CPU) and writes the
NLL of the targets it scored, plus the all-reduced sums, to OUT_PREFIX.<rank>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:   # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from pgolf.eval.doc_ttt import run_doc_ttt  # noqa: E402
from tests.helpers.doc_ttt_ref import DIST_CFG, DIST_LENGTHS, SEQ_LEN, VOCAB, doc_stream, float64_model  # noqa: E402
from tests.helpers.eval_lm import make_tables  # noqa: E402
from tests.helpers.gloo import gloo_rank  # noqa: E402


def main() -> None:
    scored: dict[int, float] = {}

    def observer(event, info):
        if event == "score":
            scored.update(zip(info["positions"].tolist(), info["nll"].tolist()))

    with gloo_rank() as (rank, world_size):
        result = run_doc_ttt(float64_model(0), doc_stream(DIST_LENGTHS, seed=1), make_tables(VOCAB), SEQ_LEN,
                             DIST_CFG, rank=rank, world_size=world_size, observer=observer)
    out = {"nll": scored, "sums": [result.sums.nll_sum, result.sums.scored_tokens, result.sums.byte_sum],
           "phases_done": result.phases_done, "windows": result.windows}
    Path(f"{sys.argv[1]}.{rank}.json").write_text(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
