"""Documents of the validation stream and how per-document TTT orders them (docs/FRONTIER.md §5.2, §5.3).

Documents: the stream is cut at every BOS. A document runs from its
BOS through the next BOS, so its targets are the stream positions
``[start, end)`` with ``end`` the next BOS (its last target *is* that BOS) or
the stream's last target + 1. Tokens before a first BOS (a stream that does
not begin with one) form a document of their own. The documents' targets
tile ``[0, targets)`` exactly.

Order: documents sorted by target count, ascending (stable: ties keep stream
order), give each one its *ascending index*; that list is cut into batches of
``batch_docs`` and the batches run from the last (longest) to the first.
Inside a batch the rows are longest first, so at any chunk index the
documents still running are a prefix of the batch.

Ranks (a fixed split, so every rank knows the whole schedule without
talking): batch j of the run order goes to rank ``j mod world``; a *round* is
batches ``[r·world, (r+1)·world)``. Phase pauses (docs/FRONTIER.md §5.3) are checked after
each round: boundaries ``⌊P(k+1)/K⌋``; once the documents of finished rounds
reach boundary k, global SGD trains on the ``boundary_k`` scored documents of
smallest ascending index (the shortest of the longest documents scored).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Documents:
    starts: np.ndarray    # int64 [D]: first target position (the BOS, or 0)
    targets: np.ndarray   # int64 [D]: targets of each document (end - start)

    @property
    def count(self) -> int:
        return int(self.starts.shape[0])


def split_documents(tokens: np.ndarray, bos_id: int) -> Documents:
    """The documents of a stream of ``len(tokens) - 1`` targets (module docstring)."""
    tokens = np.asarray(tokens)
    num_targets = tokens.shape[0] - 1
    if num_targets < 1:
        raise ValueError(f"a stream needs >= 2 tokens, got {tokens.shape[0]}")
    starts = np.flatnonzero(tokens[:num_targets] == bos_id).astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)
    ends = np.append(starts[1:], num_targets)
    return Documents(starts, ends - starts)


def ascending_order(docs: Documents) -> np.ndarray:
    """Document ids sorted by target count, ascending, ties in stream order."""
    return np.argsort(docs.targets, kind="stable")


def run_batches(docs: Documents, batch_docs: int) -> list[np.ndarray]:
    """Batches of document ids in run order (longest batch first), each batch longest first."""
    order = ascending_order(docs)
    cuts = [order[a:a + batch_docs] for a in range(0, order.size, batch_docs)]
    return [batch[::-1].copy() for batch in reversed(cuts)]


def ascending_index(docs: Documents) -> np.ndarray:
    """index[d] = position of document d in :func:`ascending_order`."""
    index = np.empty(docs.count, dtype=np.int64)
    index[ascending_order(docs)] = np.arange(docs.count)
    return index


def chunk_size(longest_targets: int, chunk_tokens: int, short_doc_chunks: tuple[tuple[int, int], ...]) -> int:
    """Chunk targets for a batch whose longest document has ``longest_targets``: the first
    ``(max_len, chunk)`` of the ascending thresholds it fits under, else ``chunk_tokens`` (P2014)."""
    for max_len, chunk in sorted(short_doc_chunks):
        if longest_targets <= max_len:
            return chunk
    return chunk_tokens


def doc_chunks(targets: int, chunk: int) -> list[tuple[int, int]]:
    """Target ranges ``[begin, end)`` (document-relative) of a document's chunks."""
    return [(b, min(b + chunk, targets)) for b in range(0, targets, chunk)]


def owner(batch: int, world_size: int) -> int:
    """Rank that scores batch ``batch`` of the run order."""
    return batch % world_size


def phase_boundaries(prefix_docs: int, phases: int) -> list[int]:
    """Scored-document counts at which global SGD runs: ⌊P(k+1)/K⌋ for k < K (none when either is 0)."""
    if prefix_docs <= 0 or phases <= 0:
        return []
    return [prefix_docs * (k + 1) // phases for k in range(phases)]


def prefix_documents(scored: np.ndarray, asc_index: np.ndarray, boundary: int) -> np.ndarray:
    """The ``boundary`` scored documents of smallest ascending index, in that order (docs/FRONTIER.md §5.3)."""
    scored = np.asarray(scored, dtype=np.int64)
    return scored[np.argsort(asc_index[scored], kind="stable")][:boundary]
