"""Eval sequence lengths 2048 / 2560 / 3072 with the val trimmed (F1855, P1953, P2135) or its tail kept
(P2014): the trimmed counts of docs/FRONTIER.md §1.1 and §5.6, every target scored exactly once."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.helpers.eval_lm import ProbeLM, TinyBankLM, make_tables

from pgolf.eval.sliding import EvalSlidingConfig, prepare_tokens, score_sliding_windows
from pgolf.eval.ttt import EvalTTTConfig, run_ttt
from pgolf.eval.windows import chunk_window_bounds, eval_target_count, plan_sliding

CASEOPS_VAL_TOKENS = 47_853_344          # docs/FRONTIER.md §1.1
LENGTHS = (2048, 2560, 3072)


@pytest.mark.parametrize("seq_len,trimmed", [(2048, 47_851_520), (2560, 47_851_520), (3072, 47_852_544)])
def test_trimmed_target_counts_follow_the_frontier_arithmetic(seq_len, trimmed):
    # ((N - 1) // L) · L targets: 47,851,520 at 2048 and 2560 (1,823 dropped); 3072 keeps 47,852,544.
    assert trimmed == (CASEOPS_VAL_TOKENS - 1) // seq_len * seq_len
    assert eval_target_count(CASEOPS_VAL_TOKENS, seq_len, True, "val") == trimmed
    assert eval_target_count(CASEOPS_VAL_TOKENS, seq_len, False, "val") == 47_853_343   # P2014's tail kept
    stream = np.zeros(5 * seq_len + 7, dtype=np.uint16)
    assert prepare_tokens(stream, seq_len, True, torch.device("cpu"), "val").numel() == 5 * seq_len + 1
    assert prepare_tokens(stream, seq_len, False, torch.device("cpu"), "val").numel() == stream.size


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("keep_tail", [False, True])
def test_challenge_size_plans_score_every_target_once(seq_len, keep_tail):
    targets = eval_target_count(CASEOPS_VAL_TOKENS, seq_len, not keep_tail, "val")
    plan = plan_sliding(targets, seq_len, 64)
    first, end = plan.score_from, plan.score_to
    # The scored ranges tile [0, targets): non-empty, each starting where the previous one ended.
    assert first[0] == 0 and end[-1] == targets and np.all(first[1:] == end[:-1]) and np.all(end > first)
    assert int((end - first).sum()) == targets
    assert plan.starts.min() >= 0 and np.all(plan.lengths == seq_len)
    assert np.all(first[1:] - plan.starts[1:] >= seq_len - 64)          # full context after window 0
    bounds = chunk_window_bounds(plan, 32768)
    assert bounds[0] == 0 and bounds[-1] == plan.num_windows and np.all(np.diff(bounds) >= 0)


def scored_positions(run) -> np.ndarray:
    counts = {}

    def observer(positions, context, nll):
        for p in positions.tolist():
            counts[p] = counts.get(p, 0) + 1

    run(observer)
    assert set(counts.values()) <= {1}
    return np.array(sorted(counts))


@pytest.mark.parametrize("seq_len", [20, 25, 30])          # 2048 / 2560 / 3072 scaled by ~1/100
@pytest.mark.parametrize("keep_tail", [False, True])
def test_sliding_and_ttt_score_the_trimmed_or_the_whole_stream_once(seq_len, keep_tail):
    stream = np.random.default_rng(seq_len).integers(0, 16, 7 * seq_len + 13).astype(np.uint16)
    tokens = prepare_tokens(stream, seq_len, not keep_tail, torch.device("cpu"), "val")
    expected = stream.size - 1 if keep_tail else 7 * seq_len
    windows = EvalSlidingConfig(seq_len=seq_len, stride=8, batch_windows=3, trim_to_seq_len=not keep_tail,
                                compile=False)
    ttt = EvalTTTConfig(chunk_tokens=45, epochs=1, optimizer="sgd", lr=0.0, lr_schedule="constant",
                        momentum=0.0, beta2=0.999, weight_decay=0.0, freeze_blocks=0, grad_clip=0.0,
                        batch_seqs=2)
    tables = make_tables(16)
    tilt = dict(ngram_tilt=True, ngram_order=3, ngram_threshold=0.5)
    for model, w, t in ((ProbeLM(16, seq_len), windows, ttt),
                        (TinyBankLM(16), dataclasses.replace(windows, **tilt), dataclasses.replace(ttt, **tilt))):
        sliding = scored_positions(lambda obs: score_sliding_windows(model, tokens, tables, w, observer=obs))
        chunked = scored_positions(lambda obs: run_ttt(model, tokens, tables, w, t, observer=obs))
        assert np.array_equal(sliding, np.arange(expected)) and np.array_equal(chunked, np.arange(expected))
