"""Two gloo processes run per-document LoRA TTT with phases as the two-rank float64 reference says (torchrun)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.doc_ttt_ref import DIST_CFG, DIST_LENGTHS, SEQ_LEN, doc_stream, float64_model, reference_doc_ttt
from tests.helpers.gloo import run_torchrun

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_ranks_match_the_two_rank_reference(tmp_path):
    prefix = tmp_path / "doc_ttt"
    run_torchrun(HERE / "dist_doc_ttt_worker.py", str(prefix))
    ranks = [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(2)]
    tokens = doc_stream(DIST_LENGTHS, seed=1)
    per_rank = [{int(p): v for p, v in r["nll"].items()} for r in ranks]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])     # each rank scored its own documents
    nll = np.full(tokens.numel() - 1, np.nan)
    for scored in per_rank:
        nll[list(scored)] = list(scored.values())
    torch.set_num_threads(1)
    reference = reference_doc_ttt(float64_model(0), tokens, SEQ_LEN, DIST_CFG, world_size=2).numpy()
    # Global SGD sums the two ranks' float64 gradients in another order: rounding-level differences.
    np.testing.assert_allclose(nll, reference, rtol=0, atol=1e-9)
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["sums"][1] == tokens.numel() - 1
    assert ranks[0]["sums"][0] == pytest.approx(float(reference.sum()), rel=1e-12)
    assert ranks[0]["phases_done"] == ranks[1]["phases_done"] == 2
