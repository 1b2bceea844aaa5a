"""Phased global SGD: full-parameter SGD on already-scored documents (docs/FRONTIER.md §5.3).

At a phase pause (pgolf.eval.documents: which documents, when) the chosen
documents' tokens, each from its BOS up to (not including) the next
document's BOS, are concatenated in the given order into one stream of T
tokens. It is cut into chunks of ``chunk_tokens`` (32,768); chunk c holds
``⌊chunk_tokens / L⌋`` sequences of L = eval seq_len inputs, sequence j
feeding tokens ``[c·chunk + j·L, c·chunk + (j+1)·L)`` and predicting them
shifted by one (a sequence that would read past the stream is dropped, as
are the chunk's leftover tokens). With N = ⌈T / chunk⌉ chunks, chunks
0..N−2 are trained (the last one would get lr 0), one step each, 1 epoch,
at ``lr_c = lr·½(1 + cos(π·c/(N−1)))``; SGD with momentum, no weight decay,
gradient norm clipped, a fresh optimizer per phase. The loss is the mean
token cross-entropy of the chunk (the model's own forward, so document-local
attention applies when the model has it).

Forward: eager, the document mask is the ``dense`` implementation (an
explicit [B, 1, L, L] mask: eager FlexAttention would materialise every
score anyway). With ``eval_ttt.compile`` (:func:`global_sgd_forward`) the
model's own ``token_nll`` is compiled instead, with the model's own document
mask implementation (``auto``: FlexAttention's block mask on CUDA, as in
training); the mask is the same, so the update is the same up to rounding
(tests/eval/test_doc_ttt_padded.py). :func:`warm_up_global_sgd` builds its
graph before the eval timer on token-0 sequences (no validation data, no
weight change).

Distributed: each rank takes a contiguous share of a chunk's sequences,
divides its summed loss by the chunk's *global* token count, and the
gradients are SUM all-reduced, so every rank applies the single-process
update.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pgolf.distributed import shard_range
from pgolf.eval.documents import Documents
from pgolf.eval.ttt import all_reduce_grads_
from pgolf.precision import autocast, synchronize


TokenNLL = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (ids, targets) -> NLL [B, T]


@dataclass(frozen=True)
class GlobalSGDSettings:
    lr: float
    momentum: float
    grad_clip: float      # 0 = off
    chunk_tokens: int
    seq_len: int


@contextlib.contextmanager
def config_override(model: torch.nn.Module, **changes):
    """Run ``model`` with some ``model.cfg`` fields changed (read at forward time), then restore it.

    Per-document TTT uses it for two exact equivalences: its windows hold one
    document (a BOS at most at column 0, padding after), so the document mask
    *is* the causal mask (``doc_attention=False``: plain causal SDPA instead of
    an uncompiled FlexAttention); global SGD runs eager, so its document mask
    is the ``dense`` implementation (eager FlexAttention materialises every
    score anyway).
    """
    saved = model.cfg
    model.cfg = saved.replace(**changes)
    try:
        yield model
    finally:
        model.cfg = saved


def document_stream(tokens: torch.Tensor, docs: Documents, doc_ids: np.ndarray) -> torch.Tensor:
    """The chosen documents' tokens (each from its BOS to before the next BOS), concatenated."""
    pieces = [np.arange(docs.starts[d], docs.starts[d] + docs.targets[d]) for d in doc_ids]
    index = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return tokens[torch.from_numpy(index).to(tokens.device)]


def chunk_lr(lr: float, chunk: int, chunks: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (chunks - 1)))


def chunk_sequence_starts(total: int, chunk: int, s: GlobalSGDSettings) -> np.ndarray:
    """Starts of chunk ``chunk``'s sequences that fit in a stream of ``total`` tokens."""
    per_chunk = s.chunk_tokens // s.seq_len
    starts = chunk * s.chunk_tokens + s.seq_len * np.arange(per_chunk, dtype=np.int64)
    return starts[starts + s.seq_len + 1 <= total]


def global_sgd_forward(model: torch.nn.Module, backend: str) -> TokenNLL:
    """``model.token_nll`` compiled with ``backend`` (static shapes: one graph for a rank's share of a chunk)."""
    return torch.compile(model.token_nll, backend=backend, fullgraph=True, dynamic=False)


@contextlib.contextmanager
def _training(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:
        yield
    finally:
        model.eval()
        for p, flag in zip(params, saved):
            p.grad = None
            p.requires_grad_(flag)


def warm_up_global_sgd(model: torch.nn.Module, nll: TokenNLL, s: GlobalSGDSettings, *, rank: int = 0,
                       world_size: int = 1) -> float:
    """One forward + backward of ``nll`` on a rank's share of a chunk of token-0 sequences; seconds."""
    device = next(model.parameters()).device
    lo, hi = shard_range(s.chunk_tokens // s.seq_len, rank, world_size)
    synchronize(device)
    began = time.perf_counter()
    if hi > lo:
        params = list(model.parameters())
        with _training(model, params):
            window = torch.zeros(hi - lo, s.seq_len + 1, dtype=torch.long, device=device)
            with autocast(device):
                nll(window[:, :-1], window[:, 1:]).sum().backward()
    synchronize(device)
    return time.perf_counter() - began


def global_sgd(model: torch.nn.Module, stream: torch.Tensor, s: GlobalSGDSettings, *, rank: int = 0,
               world_size: int = 1, nll: TokenNLL | None = None) -> dict:
    """Train every parameter of ``model`` on ``stream`` in place; returns {chunks, steps, seconds}.

    ``nll``: the forward (:func:`global_sgd_forward`); None = eager ``token_nll`` with the dense mask.
    """
    device = stream.device
    synchronize(device)
    began = time.perf_counter()
    total = int(stream.numel())
    chunks = -(-total // s.chunk_tokens)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum)
    cols = torch.arange(s.seq_len + 1, device=device)
    steps = 0
    with _training(model, params):
        for c in range(chunks - 1):
            starts = chunk_sequence_starts(total, c, s)
            if starts.size == 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = chunk_lr(s.lr, c, chunks)
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            lo, hi = shard_range(starts.size, rank, world_size)
            if hi > lo:
                window = stream[torch.from_numpy(starts[lo:hi]).to(device)[:, None] + cols]
                if nll is None:
                    with autocast(device), config_override(model, doc_attention_impl="dense"):
                        loss = model.token_nll(window[:, :-1], window[:, 1:])
                else:
                    with autocast(device):
                        loss = nll(window[:, :-1], window[:, 1:])
                (loss.sum() / (starts.size * s.seq_len)).backward()
            if world_size > 1:
                all_reduce_grads_(params)
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            steps += 1
    synchronize(device)
    return {"chunks": chunks, "steps": steps, "seconds": time.perf_counter() - began}
