"""Autoregressive sampling with a KV cache (the ``hessians.source: autoregressive`` calibration's sequences).

The GPT's forward (``GPT._hidden``) takes an optional :class:`KVCache`: keys
and values of every visit are appended in place and the positions continue
from the cached length, so feeding a prefix and then one token at a time gives
the same logits as one full forward (tested). Loaded only when something
samples, so a bundle whose calibration reads training data leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from pgolf.distributed import shard_range

if TYPE_CHECKING:
    from pgolf.progress import Progress


@dataclass
class KVCache:
    """Keys/values of every layer for autoregressive sampling, filled in place.

    ``keys[i]``/``values[i]`` are [N, KV, max_len, hd] (allocated on first
    write with the activation dtype). ``length`` counts cached positions;
    ``prev_ids``/``prev_embed`` carry the last token and its normalised
    embedding for BigramHash and SmearGate, which look one position back.
    """

    num_layers: int
    max_len: int
    length: int = 0
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    prev_ids: torch.Tensor | None = None
    prev_embed: torch.Tensor | None = None
    prev_raw_embed: torch.Tensor | None = None  # the input SmearGate's look-back (before the RMSNorm)

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [N, KV, C, hd] after ``length``; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def new_kv_cache(model, max_len: int) -> KVCache:
    """An empty cache for ``model`` (a :class:`pgolf.model.gpt.GPT`): one entry per visit."""
    encoder, decoder = model.visits()
    return KVCache(num_layers=len(encoder) + len(decoder), max_len=max_len)


def forward_step(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [N, C, V] of ``ids`` [N, C] continuing the cached prefix; updates ``cache``."""
    return model._logits(model._hidden(ids, cache))


@torch.no_grad()
def sample(model, num_seqs: int, seq_len: int, temperature: float,
           generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Autoregressive samples [num_seqs, seq_len] (int64) of ``model`` with a KV cache.

    First token uniform over the vocabulary, then multinomial from
    softmax(logits / temperature). ``generator`` must live on ``device``.
    Call in eval mode (late QAT acts only in training mode).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = torch.empty(num_seqs, seq_len, dtype=torch.long, device=device)
    out[:, 0] = torch.randint(model.cfg.vocab_size, (num_seqs,), generator=generator, device=device)
    cache = new_kv_cache(model, seq_len)
    for t in range(seq_len - 1):
        logits = forward_step(model, out[:, t:t + 1], cache)[:, -1]
        probs = torch.softmax(logits / temperature, dim=-1)
        out[:, t + 1] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return out


def autoregressive_batches(model, cfg, rank: int, world_size: int,
                           device: torch.device, progress: Progress | None = None) -> Iterator[torch.Tensor]:
    """This rank's share of ``ar_num_seqs`` sampled sequences, int64 [n, seq_len] on ``device`` (``cfg`` a
    :class:`pgolf.quant.hessians.HessiansConfig`)."""
    num_batches = -(-cfg.ar_num_seqs // cfg.ar_batch_seqs)
    lo, hi = shard_range(num_batches, rank, world_size)
    if progress is not None:
        progress.start("sampling", hi - lo, "batches")
    for b in range(lo, hi):
        size = min(cfg.ar_batch_seqs, cfg.ar_num_seqs - b * cfg.ar_batch_seqs)
        generator = torch.Generator(device=device)
        # Distinct, reproducible streams per (seed, batch), whatever the rank count.
        generator.manual_seed(cfg.seed * 1_000_003 + b)
        batch = sample(model, size, cfg.seq_len, cfg.ar_temperature, generator, device)
        if progress is not None:
            progress.advance(1, batch.numel())
        yield batch
