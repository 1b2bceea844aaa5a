"""Packed rows with documents cut into segments of <= seq_len (docs/FRONTIER.md §1.6, §2.4).

A synthetic stream of BOS-led documents, many longer than the cap and some longer than a row, read by the
training loader in packed rows (``train.packed_rows``): the rows are the stream, every token once per
epoch, unchanged (the cut pieces get no BOS), and the document mask puts every token in a segment of at
most ``cap`` tokens that starts at the row start, at a BOS, or ``cap`` tokens after a segment start inside
the same document; no attention crosses a cut.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.loader import TrainLoader, open_train_stream
from pgolf.data.shards import write_shard
from pgolf.model.doc_attention import dense_document_mask, document_ids

BOS = 1
ROW = 96        # micro_batch_tokens: one packed row per micro-step
CAP = 16        # seq_len: the segment cap


def synthetic_stream(n_tokens: int, seed: int) -> np.ndarray:
    """Token at offset i is i + 2 (readable offsets), except document starts, which are BOS."""
    rng = np.random.default_rng(seed)
    stream = np.arange(n_tokens, dtype=np.int64) + 2
    pos = int(rng.integers(1, 40))  # the stream starts mid-document
    while pos < n_tokens:
        stream[pos] = BOS
        pos += int(rng.choice([1, 2, 5, CAP - 1, CAP, CAP + 1, 3 * CAP + 7, ROW + 13, 2 * ROW]))
    return stream


def reference_segments(row: np.ndarray, cap: int) -> np.ndarray:
    """The obvious walk: a new segment at the row start, at every BOS, and when the current one is full."""
    seg, length, out = -1, cap, []
    for token in row:
        if token == BOS or length == cap:
            seg, length = seg + 1, 0
        length += 1
        out.append(seg)
    return np.array(out)


@pytest.fixture
def packed_loader(tmp_path):
    stream = synthetic_stream(4000, seed=3)
    write_shard(tmp_path / "train_000000.bin", stream.astype(np.uint16))
    holdout = 1 + (4000 - 1) % (ROW + 1)  # whole spans: one epoch ends exactly at the holdout
    loader = TrainLoader(open_train_stream(tmp_path, 5000), holdout, seq_len=ROW, local_tokens=ROW,
                         rank=0, world_size=1)
    return stream, loader


def test_one_epoch_of_packed_rows_is_the_stream_exactly_once_and_unchanged(packed_loader):
    stream, loader = packed_loader
    spans = loader.train_tokens // (ROW + 1)
    seen = []
    for _ in range(spans):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (1, ROW)
        np.testing.assert_array_equal(x[0, 1:].numpy(), y[0, :-1].numpy())
        seen.append(np.concatenate([x[0].numpy(), y[0, -1:].numpy()]))
    assert loader.position == 0  # the epoch wrapped exactly
    np.testing.assert_array_equal(np.concatenate(seen), stream[:loader.train_tokens])
    offsets = np.concatenate(seen)
    offsets = offsets[offsets != BOS] - 2
    assert len(offsets) == len(set(offsets.tolist()))  # no token twice


def test_every_segment_is_at_most_the_cap_and_starts_where_the_spec_says(packed_loader):
    _, loader = packed_loader
    long_docs = 0
    for _ in range(loader.train_tokens // (ROW + 1)):
        x, _ = loader.next_batch()
        seg = document_ids(x, BOS, CAP)[0].numpy()
        np.testing.assert_array_equal(seg - seg[0], reference_segments(x[0].numpy(), CAP))
        lengths = np.bincount(seg - seg[0])
        assert lengths.max() <= CAP and lengths.min() >= 1
        # A segment starting at a non-BOS token inside the row is a cut piece of a long document.
        starts = np.flatnonzero(np.diff(seg)) + 1
        long_docs += int(sum(x[0, s] != BOS for s in starts))
    assert long_docs > 10  # the stream does exercise the cut (a test that could not fail otherwise)


@pytest.mark.parametrize("cap", [CAP, torch.tensor(CAP)])
def test_the_mask_never_crosses_a_cut(packed_loader, cap):
    _, loader = packed_loader
    for _ in range(6):
        x, _ = loader.next_batch()
        ref = reference_segments(x[0].numpy(), CAP)
        allowed = np.tril(ref[:, None] == ref[None, :])
        np.testing.assert_array_equal(dense_document_mask(x, BOS, cap)[0, 0].numpy(), allowed)
        q, k = np.nonzero(allowed)
        assert (q - k).max() < CAP  # no query reaches CAP or more tokens back


def test_without_a_cap_documents_are_cut_only_at_row_edges():
    row = torch.tensor([[5, 6, BOS] + [7] * 40 + [BOS, 8]])
    seg = document_ids(row, BOS)[0]
    assert seg.tolist() == [0, 0] + [1] * 41 + [2, 2]
    assert torch.equal(document_ids(row, BOS, 0)[0], seg)
