"""Toy causal LMs, token streams and byte tables for the evaluation and TTT tests.

The models follow the contract of ``pgolf.eval.sliding``:
``token_nll(ids, targets) -> [B, T]`` nats, causal. ``run_all(rank, world)``
runs the sliding, the non-overlapping and two TTT evaluations on one tiny model
and stream; tests/pipeline/dist_eval_worker.py runs it under torchrun and
tests/pipeline/test_eval_distributed.py compares it with ``run_all(0, 1)``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.data.bpb import ByteTables
from pgolf.config import to_dict
from pgolf.eval.ngram_params import NgramTiltConfig
from pgolf.eval.sliding import EvalSlidingConfig, score_nonoverlapping, score_sliding_windows
from pgolf.eval.ttt import EvalTTTConfig, run_ttt


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))


class TinyBankLM(nn.Module):
    """A small trainable causal LM with the GPT's parameter layout.

    Block i mixes in the previous position through ``pair_bank[i]`` and (with
    ``full_context``) the causal mean of all earlier positions through
    ``pair_bank[L+i]``, then applies ``mlp_bank[i]``; ``blocks.{i}.gain``
    scales the mix. Without ``full_context`` a score depends only on the
    ``num_layers + 1`` most recent tokens, so any window with that much
    context gives the same score as one pass over the whole stream.
    """

    def __init__(self, vocab_size: int = 16, dim: int = 8, num_layers: int = 2,
                 full_context: bool = True, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.full_context = full_context
        self.tok_emb = nn.Embedding(vocab_size, dim)
        with torch.no_grad():
            self.tok_emb.weight.copy_(torch.randn(vocab_size, dim, generator=gen))
        self.pair_bank = nn.Parameter(0.4 * torch.randn(2 * num_layers, dim, dim, generator=gen))
        self.mlp_bank = nn.Parameter(0.4 * torch.randn(num_layers, dim, dim, generator=gen))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(num_layers))

    def token_nll(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        L = len(self.blocks)
        h = self.tok_emb(ids)
        counts = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=h.dtype)[:, None]
        for i, block in enumerate(self.blocks):
            prev = F.pad(h, (0, 0, 1, 0))[:, :-1]
            mix = prev @ self.pair_bank[i].T
            if self.full_context:
                mix = mix + (h.cumsum(1) / counts) @ self.pair_bank[L + i].T
            h = h + block.gain * torch.tanh(mix)
            h = h + torch.tanh(h @ self.mlp_bank[i].T)
        return h @ self.tok_emb.weight.T


class ProbeLM(nn.Module):
    """Returns, as its "NLL", an exact code of (input id, target id, column in window).

    ``decode_probe`` reads back what the evaluator fed for each scored target.
    The zero-weight parameter lets TTT build an optimizer and take steps.
    """

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.vocab_size, self.width = vocab_size, width
        self.unused = nn.Parameter(torch.zeros(()))

    def token_nll(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        col = torch.arange(ids.shape[1], device=ids.device)
        code = (ids * self.vocab_size + targets) * self.width + col
        return code.float() + 0.0 * self.unused


def decode_probe(nll: torch.Tensor, vocab_size: int, width: int) -> tuple[torch.Tensor, ...]:
    """(input ids, target ids, columns) from a ProbeLM score."""
    code = nll.round().long()
    col = code % width
    pair = code // width
    return pair // vocab_size, pair % vocab_size, col


def make_stream(num_tokens: int, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=gen)


def make_tables(vocab_size: int, seed: int = 0) -> ByteTables:
    """Byte tables with ids 0 and 1 as boundary tokens (pad, BOS) worth 0 bytes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 5, vocab_size).astype(np.int16)
    space = rng.random(vocab_size) < 0.4
    boundary = np.zeros(vocab_size, dtype=bool)
    base[:2], space[:2], boundary[:2] = 0, False, True
    return ByteTables(base, space, boundary)


WINDOWS = EvalSlidingConfig(seq_len=32, stride=8, batch_windows=3, trim_to_seq_len=False, compile=False)
TTT_SGD = EvalTTTConfig(chunk_tokens=96, epochs=2, optimizer="sgd", lr=0.05, lr_schedule="cosine",
                    momentum=0.9, beta2=0.999, weight_decay=0.0, freeze_blocks=1, grad_clip=0.5,
                    batch_seqs=2)
TTT_ADAMW = EvalTTTConfig(chunk_tokens=80, epochs=1, optimizer="adamw", lr=0.01, lr_schedule="constant",
                      momentum=0.9, beta2=0.99, weight_decay=0.01, freeze_blocks=0, grad_clip=0.0,
                      batch_seqs=3)
VOCAB = 16
# The n-gram tilt keys of an eval section, tilt off (for tests that write eval sections by hand).
TILT_OFF = to_dict(NgramTiltConfig())


def run_all(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    tokens = make_stream(701, VOCAB, seed=1)
    tables = make_tables(VOCAB)
    model = TinyBankLM(VOCAB, seed=2)
    out = {}
    for name, fn in (("sliding", score_sliding_windows), ("nonoverlapping", score_nonoverlapping)):
        result = fn(model, tokens, tables, WINDOWS, rank=rank, world_size=world_size)
        out[name] = [result.sums.nll_sum, result.sums.scored_tokens, result.sums.byte_sum]
    for name, cfg in (("ttt_sgd", TTT_SGD), ("ttt_adamw", TTT_ADAMW)):
        trained = copy.deepcopy(model)
        result = run_ttt(trained, tokens, tables, WINDOWS, cfg, rank=rank, world_size=world_size)
        out[name] = [result.sums.nll_sum, result.sums.scored_tokens, result.sums.byte_sum]
        out[name + "_weights"] = float(sum(p.detach().double().square().sum() for p in trained.parameters()))
        out[name + "_chunks"] = result.chunks
    return out
