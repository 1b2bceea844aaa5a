"""Window plans: every target scored exactly once, with enough context (docs/RECIPE.md §6.1)."""
from __future__ import annotations

import numpy as np
import pytest

from pgolf.errors import DataError
from pgolf.eval.windows import (WindowPlan, check_exact_cover, chunk_sequences, chunk_targets,
                           chunk_window_bounds, eval_target_count, num_chunks, plan_nonoverlapping,
                           plan_sliding)

# Lengths shorter than one window, equal to it, multiples of the stride and not.
TARGET_COUNTS = [1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 129, 257]
SHAPES = [(16, 1), (16, 4), (16, 5), (16, 16), (8, 3)]


def coverage(plan: WindowPlan) -> np.ndarray:
    """Per-target count of scoring windows, by a plain loop over the windows."""
    counts = np.zeros(plan.num_targets, dtype=np.int64)
    for start, length, first in zip(plan.starts, plan.lengths, plan.score_from):
        assert 0 <= start <= first < start + length <= plan.num_targets
        counts[first:start + length] += 1
    return counts


@pytest.mark.parametrize("targets", TARGET_COUNTS)
@pytest.mark.parametrize("seq_len,stride", SHAPES)
def test_sliding_scores_every_target_once_with_context(targets, seq_len, stride):
    plan = plan_sliding(targets, seq_len, stride)
    assert np.array_equal(coverage(plan), np.ones(targets, dtype=np.int64))
    assert plan.lengths.max() <= seq_len
    for start, length, first in zip(plan.starts, plan.lengths, plan.score_from):
        for p in range(first, start + length):
            assert p - start >= min(seq_len - stride, p)


@pytest.mark.parametrize("targets", TARGET_COUNTS)
def test_nonoverlapping_scores_every_target_once(targets):
    plan = plan_nonoverlapping(targets, 16)
    assert np.array_equal(coverage(plan), np.ones(targets, dtype=np.int64))
    assert np.array_equal(plan.score_from, plan.starts)


def test_sliding_full_windows_only_except_when_stream_is_short():
    assert set(plan_sliding(100, 16, 5).lengths.tolist()) == {16}
    short = plan_sliding(10, 16, 5)
    assert short.starts.tolist() == [0] and short.lengths.tolist() == [10]


def test_tail_window_is_aligned_to_the_end_and_scores_only_the_rest():
    plan = plan_sliding(45, 16, 8)           # full windows start at 0, 8, 16, 24 -> cover 40
    assert plan.starts.tolist() == [0, 8, 16, 24, 29]
    assert plan.score_from.tolist() == [0, 16, 24, 32, 40]


def test_record_profile_window_count_drops_the_31_duplicate_tail_windows():
    # The records used 969,088 windows at T=62,021,632, L=2048, S=64 (docs/RECIPE.md §5.2),
    # 31 of which re-scored the last 64 targets; T is a multiple of 64 here, so no tail window.
    plan = plan_sliding(62_021_632, 2048, 64)
    assert plan.num_windows == 969_088 - 31
    assert int((plan.score_to - plan.score_from).sum()) == 62_021_632


def test_trim_matches_the_records_and_untrimmed_keeps_every_target():
    assert eval_target_count(62_021_632 + 1 + 1500, 2048, True, "val") == 62_021_632
    assert eval_target_count(62_021_632 + 1 + 1500, 2048, False, "val") == 62_021_632 + 1500
    assert eval_target_count(2, 2048, False, "val") == 1


@pytest.mark.parametrize("tokens,trim", [(1, False), (0, True), (2048, True)])
def test_too_short_streams_raise_data_error_naming_the_source(tokens, trim):
    with pytest.raises(DataError, match="data/shards"):
        eval_target_count(tokens, 2048, trim, "data/shards")


def test_check_exact_cover_rejects_gaps_and_overlaps():
    starts = np.array([0, 8]); lengths = np.array([16, 16])
    with pytest.raises(ValueError, match="overlap or leave gaps"):
        check_exact_cover(WindowPlan(starts, lengths, np.array([0, 20]), 24))
    with pytest.raises(ValueError, match="overlap or leave gaps"):
        check_exact_cover(WindowPlan(starts, lengths, np.array([0, 12]), 24))
    with pytest.raises(ValueError, match="end at num_targets"):
        check_exact_cover(WindowPlan(starts, lengths, np.array([0, 16]), 25))


@pytest.mark.parametrize("targets", [5, 40, 95, 96, 97, 257])
@pytest.mark.parametrize("chunk", [7, 16, 24, 50])
def test_chunks_group_windows_by_first_scored_target(targets, chunk):
    plan = plan_sliding(targets, 16, 4)
    bounds = chunk_window_bounds(plan, chunk)
    assert bounds[0] == 0 and bounds[-1] == plan.num_windows and np.all(np.diff(bounds) >= 0)
    assert bounds.size - 1 == num_chunks(targets, chunk) == -(-targets // chunk)
    for c in range(bounds.size - 1):
        for w in range(bounds[c], bounds[c + 1]):
            assert plan.score_from[w] // chunk == c


@pytest.mark.parametrize("targets", [5, 95, 96, 97])
@pytest.mark.parametrize("chunk,seq_len", [(32, 16), (24, 16), (7, 16), (40, 8)])
def test_chunk_sequences_tile_each_chunk_exactly(targets, chunk, seq_len):
    trained = np.zeros(targets, dtype=np.int64)
    for c in range(num_chunks(targets, chunk)):
        begin, end = chunk_targets(c, chunk, targets)
        starts, lengths = chunk_sequences(c, chunk, targets, seq_len)
        assert lengths.max() <= seq_len and starts[0] == begin and starts[-1] + lengths[-1] == end
        for s, n in zip(starts, lengths):
            trained[s:s + n] += 1
    assert np.array_equal(trained, np.ones(targets, dtype=np.int64))


@pytest.mark.parametrize("args", [(0, 16, 4), (10, 16, 0), (10, 16, 17), (10, 0, 1)])
def test_bad_sizes_raise(args):
    with pytest.raises(ValueError):
        plan_sliding(*args)
