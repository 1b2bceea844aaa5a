"""The training token stream: order, coverage, wrap-around, rank slicing, holdout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.errors import DataError
from pgolf.data.loader import TrainLoader, holdout_sequences, open_train_stream
from pgolf.data.shards import write_shard

VOCAB = 1000


def make_shards(directory, sizes: list[int]) -> np.ndarray:
    """Shards whose tokens are their stream offset mod VOCAB, so positions are readable."""
    stream = (np.arange(sum(sizes)) % VOCAB).astype(np.uint16)
    start = 0
    for i, n in enumerate(sizes):
        write_shard(directory / f"train_{i:06d}.bin", stream[start:start + n])
        start += n
    return stream.astype(np.int64)


def reference_spans(stream: np.ndarray, train_tokens: int, span: int, count: int) -> list[np.ndarray]:
    """The obvious definition: consecutive spans of the training part, wrapping."""
    train = stream[:train_tokens]
    out, pos = [], 0
    for _ in range(count):
        idx = (pos + np.arange(span)) % train_tokens
        out.append(train[idx])
        pos = (pos + span) % train_tokens
    return out


def test_single_rank_reads_consecutive_spans_across_shards_and_wraps(tmp_path):
    stream = make_shards(tmp_path, [50, 0, 37, 61])
    holdout = 20
    loader = TrainLoader(open_train_stream(tmp_path, VOCAB), holdout, seq_len=4, local_tokens=8,
                         rank=0, world_size=1)
    count = 30  # 30 spans of 9 tokens = 270 > 128 training tokens: wraps twice
    expected = reference_spans(stream, 148 - holdout, 9, count)
    for want in expected:
        x, y = loader.next_batch()
        assert x.shape == y.shape == (2, 4) and x.dtype == torch.int64
        np.testing.assert_array_equal(x.reshape(-1).numpy(), want[:-1])
        np.testing.assert_array_equal(y.reshape(-1).numpy(), want[1:])


def test_holdout_tokens_never_reach_training_batches(tmp_path):
    stream = make_shards(tmp_path, [64, 64])
    holdout = 30
    loader = TrainLoader(open_train_stream(tmp_path, VOCAB), holdout, seq_len=5, local_tokens=10,
                         rank=0, world_size=1)
    seen = np.zeros(len(stream), dtype=int)
    for _ in range(40):
        x, y = loader.next_batch()
        # Offsets are recoverable because token value == offset (< VOCAB).
        seen[np.concatenate([x.reshape(-1).numpy(), y.reshape(-1).numpy()])] += 1
    assert seen[-holdout:].sum() == 0
    assert (seen[:-holdout] > 0).all()


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 3), (3, 2)])
def test_world_ranks_times_accum_equals_one_rank_with_world_times_accum(tmp_path, world, accum):
    make_shards(tmp_path, [97, 88])
    stream = open_train_stream(tmp_path, VOCAB)
    steps = 7
    single = TrainLoader(stream, 11, seq_len=3, local_tokens=6, rank=0, world_size=1)
    multi = [TrainLoader(stream, 11, seq_len=3, local_tokens=6, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(steps):
        want = [single.next_batch() for _ in range(world * accum)]
        got = []
        for _ in range(accum):  # micro-step m: rank r holds the (m*world + r)-th span
            got.extend(m.next_batch() for m in multi)
        for (wx, wy), (gx, gy) in zip(want, got):
            assert torch.equal(wx, gx) and torch.equal(wy, gy)


def test_state_dict_resumes_the_exact_stream(tmp_path):
    make_shards(tmp_path, [120])
    stream = open_train_stream(tmp_path, VOCAB)
    a = TrainLoader(stream, 10, seq_len=4, local_tokens=8, rank=0, world_size=1)
    for _ in range(17):
        a.next_batch()
    b = TrainLoader(stream, 10, seq_len=4, local_tokens=8, rank=0, world_size=1)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))
    other = TrainLoader(stream, 12, seq_len=4, local_tokens=8, rank=0, world_size=1)
    with pytest.raises(DataError, match="train tokens"):
        other.load_state_dict(a.state_dict())


def test_holdout_sequences_are_the_stream_tail(tmp_path):
    stream = make_shards(tmp_path, [40, 45])
    x, y = holdout_sequences(open_train_stream(tmp_path, VOCAB), 23, seq_len=5)
    tail = stream[-23:]
    assert x.shape == (4, 5)
    np.testing.assert_array_equal(x.reshape(-1).numpy(), tail[:20])
    np.testing.assert_array_equal(y.reshape(-1).numpy(), tail[1:21])
    with pytest.raises(DataError, match="shorter than one sequence"):
        holdout_sequences(open_train_stream(tmp_path, VOCAB), 5, seq_len=5)


def test_token_ids_beyond_vocab_are_reported_with_the_file(tmp_path):
    make_shards(tmp_path, [30, 30])
    bad = np.full(30, 7, dtype=np.uint16)
    bad[12] = 4000
    write_shard(tmp_path / "train_000001.bin", bad)
    loader = TrainLoader(open_train_stream(tmp_path, VOCAB), 0, seq_len=4, local_tokens=16,
                         rank=0, world_size=1)
    loader.next_batch()  # tokens 0..16 lie in the good shard
    with pytest.raises(DataError, match=r"train_000001\.bin: token id 4000 at position 12"):
        for _ in range(3):
            loader.next_batch()


def test_too_little_training_data_is_a_data_error(tmp_path):
    make_shards(tmp_path, [30])
    with pytest.raises(DataError, match="fewer than one micro-step"):
        TrainLoader(open_train_stream(tmp_path, VOCAB), 10, seq_len=4, local_tokens=8, rank=0, world_size=3)
