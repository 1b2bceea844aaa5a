"""A tiny float64 frontier GPT, document streams, and a slow obvious reference of per-document LoRA TTT.

The reference (``reference_doc_ttt``) follows docs/FRONTIER.md §5.2-§5.3 with
plain loops: one document at a time, its own rank-r adapters as plain [r, in]
/ [out, r] tensors, ``torch.optim.AdamW`` per document, every chunk's window
fed unpadded, global SGD with ``torch.optim.SGD``. Only A's random draws are
taken from ``pgolf.eval.lora`` (the same generator stream), so both start
from the same adapters. tests/eval/test_doc_ttt.py and the gloo worker
compare pgolf.eval.doc_ttt against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pgolf.eval.doc_ttt import lora_generator
from pgolf.eval.lora import BatchedLoRA
from pgolf.eval.ttt import EvalTTTConfig
from pgolf.model.gpt import GPT
from tests.helpers.models import FRONTIER_BOS, FRONTIER_VOCAB, frontier_config, random_float64

BOS, VOCAB = FRONTIER_BOS, FRONTIER_VOCAB
SEQ_LEN = 24   # eval seq_len L: documents longer than this are scored with a sliding window


def float64_model(seed: int = 0, **over) -> GPT:
    return random_float64(frontier_config(**over), seed, std=0.3)


def doc_stream(lengths: list[int], seed: int = 0, bos_first: bool = True) -> torch.Tensor:
    """BOS + (n-1) random non-BOS ids per document, plus one closing BOS (the last target)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(lengths):
        body = torch.randint(2, VOCAB, (n,), generator=gen)
        if bos_first or i > 0:
            body[0] = BOS
        parts.append(body)
    parts.append(torch.tensor([BOS]))
    return torch.cat(parts)


def doc_config(**over) -> EvalTTTConfig:
    values = dict(chunk_tokens=8, epochs=0, optimizer="adamw", lr=0.02, lr_schedule="constant", momentum=0.0,
                  beta2=0.99, weight_decay=0.5, freeze_blocks=0, grad_clip=0.0, batch_seqs=1, mode="doc_lora",
                  adam_eps=1e-10, batch_docs=3, lora_rank=2, lora_alpha=3.6, lora_seed=5, prefix_docs=0, phases=0,
                  global_lr=0.01, global_momentum=0.9, global_grad_clip=1.0, global_chunk_tokens=48)
    values.update(over)
    return EvalTTTConfig(**values)


class OneDocAdapters:
    """One document's adapters: {(slot, target): (A [r, in], B [out, r])} as leaf tensors."""

    def __init__(self, a: dict, shapes: dict, scale: float):
        self.scale = scale
        self.weights = {key: (a_row.clone().requires_grad_(True),
                              torch.zeros(shapes[key[1]][1], a_row.shape[0], dtype=a_row.dtype, requires_grad=True))
                        for key, a_row in a.items()}

    def __call__(self, slot, target, x):
        if (slot, target) not in self.weights:
            return None
        a, b = self.weights[slot, target]
        return (x @ a.T) @ b.T * self.scale

    def params(self):
        return [t for pair in self.weights.values() for t in pair]


def _drawn_a(model, cfg: EvalTTTConfig, phase: int, rank: int) -> list[dict]:
    """A of every batch row as pgolf.eval.lora draws it: a list (row) of {(slot, target): [r, in]}."""
    lora = BatchedLoRA(model, cfg.batch_docs, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets),
                       torch.device("cpu"), torch.float64)
    lora.reset_a(lora_generator(cfg.lora_seed, phase, rank))
    return [{key: a[row].detach().clone() for key, a in lora.a.items()} for row in range(cfg.batch_docs)]


def _global_sgd(model, tokens, docs, kept, cfg: EvalTTTConfig, seq_len: int) -> None:
    stream = torch.cat([tokens[docs[d][0]:docs[d][0] + docs[d][1]] for d in kept])
    chunks = math.ceil(stream.numel() / cfg.global_chunk_tokens)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.global_lr, momentum=cfg.global_momentum)
    for c in range(chunks - 1):
        rows = []
        for j in range(cfg.global_chunk_tokens // seq_len):
            s = c * cfg.global_chunk_tokens + j * seq_len
            if s + seq_len + 1 <= stream.numel():
                rows.append(stream[s:s + seq_len + 1])
        if not rows:
            continue
        for group in opt.param_groups:
            group["lr"] = cfg.global_lr * 0.5 * (1 + math.cos(math.pi * c / (chunks - 1)))
        opt.zero_grad()
        window = torch.stack(rows)
        model.token_nll(window[:, :-1], window[:, 1:]).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.global_grad_clip)
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None


def reference_doc_ttt(model, tokens: torch.Tensor, seq_len: int, cfg: EvalTTTConfig, world_size: int = 1
                      ) -> torch.Tensor:
    """NLL of every target position (float64 [targets]), one document at a time; ``model`` is changed."""
    n_targets = tokens.numel() - 1
    starts = [p for p in range(n_targets) if tokens[p] == BOS or p == 0]
    docs = [(s, e - s) for s, e in zip(starts, starts[1:] + [n_targets])]
    ascending = sorted(range(len(docs)), key=lambda d: (docs[d][1], d))
    batches = [ascending[i:i + cfg.batch_docs][::-1] for i in range(0, len(docs), cfg.batch_docs)][::-1]
    boundaries = [cfg.prefix_docs * (k + 1) // cfg.phases for k in range(cfg.phases)] if cfg.prefix_docs else []
    shapes = {"q": (16, 16), "k": (16, 8), "v": (16, 8), "o": (16, 16), "mlp": (16, 16), "head": (16, VOCAB)}
    warm = [_drawn_a(model, cfg, 0, r) for r in range(world_size)]
    nll = torch.full((n_targets,), float("nan"), dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    scored, phase = [], 0
    for first in range(0, len(batches), world_size):
        for j in range(first, min(first + world_size, len(batches))):
            rank, batch = j % world_size, batches[j]
            chunk = cfg.chunk_tokens
            for max_len, size in sorted(cfg.short_doc_chunks):
                if docs[batch[0]][1] <= max_len:
                    chunk = size
                    break
            for row, d in enumerate(batch):
                start, n = docs[d]
                ad = OneDocAdapters(warm[rank][row], shapes, cfg.lora_alpha / cfg.lora_rank)
                opt = torch.optim.AdamW(ad.params(), lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.adam_eps,
                                        weight_decay=cfg.weight_decay)
                last = math.ceil(n / chunk) - 1
                for c in range(last + 1):
                    begin, end = c * chunk, min((c + 1) * chunk, n)
                    lo = max(0, end - seq_len)
                    ids = tokens[start + lo:start + end][None]
                    logits = model.adapted_logits(model.adapted_hidden(ids, ad), ad)[0]
                    losses = []
                    for t in range(begin, end):
                        loss = -F.log_softmax(logits[t - lo], dim=-1)[tokens[start + t + 1]]
                        nll[start + t] = loss.detach()
                        losses.append(loss)
                    if c < last:
                        opt.zero_grad()
                        torch.stack(losses).mean().backward()
                        opt.step()
                warm[rank][row] = {key: a.detach().clone() for key, (a, _) in ad.weights.items()}
            scored.extend(batch)
        more = first + world_size < len(batches)
        while more and phase < len(boundaries) and len(scored) >= boundaries[phase]:
            kept = sorted(scored, key=lambda d: ascending.index(d))[:boundaries[phase]]
            _global_sgd(model, tokens, docs, kept, cfg, seq_len)
            phase += 1
            warm = [_drawn_a(model, cfg, phase, r) for r in range(world_size)]
    return nll


# The two-rank gloo run (tests/pipeline/test_doc_ttt_distributed.py): batches of 2 go to ranks 0, 1, 0, ...;
# pauses after rounds of two batches, global SGD on both ranks' documents.
DIST_LENGTHS = [30, 5, 12, 50, 3, 9, 17, 26, 7, 21]
DIST_CFG = doc_config(batch_docs=2, prefix_docs=6, phases=2, short_doc_chunks=((10, 3),))
