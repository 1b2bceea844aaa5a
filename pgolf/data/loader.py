"""The training token stream: deterministic, sequential, memory-mapped (docs/RECIPE.md §1.5).

The train shards, in sorted order, form one token stream. Its last
``holdout_tokens`` tokens are cut off as a held-out slice of *training* data
(used to choose between live, EMA and SWA weights, never for gradients); the
rest is the training stream, which wraps around when exhausted.

Batching. The stream is consumed in *spans* of ``local_tokens + 1`` tokens; a
span gives one rank one micro-batch (``x = span[:-1]``, ``y = span[1:]``,
reshaped to ``[local_tokens // seq_len, seq_len]``). Each micro-step the
``world_size`` ranks take ``world_size`` consecutive spans, rank r the r-th.
So optimizer step s covers spans ``[s·W·A, (s+1)·W·A)`` for W ranks and A
accumulation steps, whatever W and A are, as long as ``W·A`` and
``local_tokens`` are fixed: N ranks × A micro-steps see exactly the tokens of
1 rank × N·A micro-steps. The extra target token of each span is consumed with
it (as in the records), so spans never overlap.

The loader's whole state is one integer (the next token's offset in the
training stream), which is what the resume state stores.
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import DataError
from pgolf.data.shards import list_shards, read_shard


class TokenStream:
    """The sorted train shards as one read-only token sequence (memory-mapped).

    ``tokens(start, n)`` gathers ``n`` tokens from global offset ``start``
    without wrapping; only the touched parts of the shards are read.
    """

    def __init__(self, paths: list[Path], vocab_size: int):
        if not paths:
            raise DataError("train stream: no train shards given")
        self.paths = [Path(p) for p in paths]
        self.vocab_size = vocab_size
        self._arrays = [read_shard(p) for p in self.paths]
        sizes = [len(a) for a in self._arrays]
        self.shard_sizes = [(p.name, n) for p, n in zip(self.paths, sizes)]
        self._starts = np.cumsum([0] + sizes).tolist()
        self.total = self._starts[-1]

    def tokens(self, start: int, n: int) -> np.ndarray:
        if start < 0 or n < 0 or start + n > self.total:
            raise ValueError(f"range [{start}, {start + n}) outside the stream of {self.total} tokens")
        out = np.empty(n, dtype=np.int64)
        filled = 0
        shard = bisect.bisect_right(self._starts, start) - 1
        while filled < n:
            offset = start + filled - self._starts[shard]
            take = min(n - filled, len(self._arrays[shard]) - offset)
            piece = self._arrays[shard][offset:offset + take]
            # The data stages validate ids; checking each gathered piece is
            # cheap and turns a corrupt shard into a message instead of a
            # device-side index error deep inside the embedding.
            if take and int(piece.max()) >= self.vocab_size:
                bad = int(np.argmax(piece >= self.vocab_size)) + offset
                raise DataError(f"{self.paths[shard]}: token id {int(piece.max())} at position {bad} "
                                f">= vocab size {self.vocab_size}")
            out[filled:filled + take] = piece
            filled += take
            shard += 1
        return out


class TrainLoader:
    """Micro-batches for one rank from the wrapping training stream.

    Args:
        stream: the train shards.
        holdout_tokens: tokens at the end of the stream kept out of training.
        seq_len: sequence length of a micro-batch row.
        local_tokens: tokens per rank per micro-batch (a multiple of seq_len).
        rank, world_size: this rank's slice of each micro-step.
    """

    def __init__(self, stream: TokenStream, holdout_tokens: int, seq_len: int,
                 local_tokens: int, rank: int, world_size: int):
        if local_tokens % seq_len:
            raise ValueError(f"local_tokens {local_tokens} is not a multiple of seq_len {seq_len}")
        self.stream = stream
        self.train_tokens = stream.total - holdout_tokens
        self.seq_len = seq_len
        self.local_tokens = local_tokens
        self.rank = rank
        self.world_size = world_size
        span = local_tokens + 1
        if self.train_tokens < span * world_size:
            raise DataError(f"train shards hold {stream.total} tokens; after the {holdout_tokens}-token "
                            f"holdout that is fewer than one micro-step ({world_size} x {span} tokens)")
        self.position = 0

    def _take(self, start: int, n: int) -> np.ndarray:
        """``n`` tokens of the training stream from ``start``, wrapping around."""
        start %= self.train_tokens
        parts = []
        while n > 0:
            take = min(n, self.train_tokens - start)
            parts.append(self.stream.tokens(start, take))
            n -= take
            start = 0
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_batch(self, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(x, y)``, each int64 ``[local_tokens // seq_len, seq_len]``.

        ``pin_memory`` puts them in page-locked memory: a copy to the GPU from
        pageable memory first waits for all queued GPU work, which would stall
        the host at every micro-step.
        """
        span = self.local_tokens + 1
        tokens = self._take(self.position + self.rank * span, span)
        self.position = (self.position + self.world_size * span) % self.train_tokens
        t = torch.from_numpy(tokens)
        if pin_memory:
            t = t.pin_memory()
        rows = self.local_tokens // self.seq_len
        return t[:-1].view(rows, self.seq_len), t[1:].view(rows, self.seq_len)

    def set_seq_len(self, seq_len: int) -> None:
        """Rows of ``seq_len`` from the next batch on (progressive context); tokens per batch stay."""
        if seq_len < 1 or self.local_tokens % seq_len:
            raise ValueError(f"local_tokens {self.local_tokens} is not a multiple of seq_len {seq_len}")
        self.seq_len = seq_len

    def state_dict(self) -> dict:
        return {"position": self.position, "train_tokens": self.train_tokens}

    def load_state_dict(self, state: dict) -> None:
        if state["train_tokens"] != self.train_tokens:
            raise DataError(f"resume state: loader was over {state['train_tokens']} train tokens, "
                            f"the shards now give {self.train_tokens}")
        self.position = int(state["position"])


def holdout_sequences(stream: TokenStream, holdout_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out tail as ``(x, y)`` int64 ``[n_seq, seq_len]``.

    ``x = tail[:-1]``, ``y = tail[1:]`` trimmed to whole sequences, so
    ``holdout_tokens`` must be at least ``seq_len + 1``.
    """
    n_seq = (holdout_tokens - 1) // seq_len
    if n_seq < 1:
        raise DataError(f"holdout of {holdout_tokens} tokens is shorter than one sequence ({seq_len} + 1)")
    tail = torch.from_numpy(stream.tokens(stream.total - holdout_tokens, n_seq * seq_len + 1))
    return tail[:-1].view(n_seq, seq_len), tail[1:].view(n_seq, seq_len)


def open_train_stream(shard_dir: str | Path, vocab_size: int) -> TokenStream:
    """The sorted ``train_NNNNNN.bin`` shards of ``shard_dir`` as one stream."""
    return TokenStream(list_shards(shard_dir, "train"), vocab_size)
