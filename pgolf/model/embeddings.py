"""Input-side extras of the GPT: BigramHash, SmearGate and the shared value embedding.

Each module only declares its shapes; :meth:`pgolf.model.gpt.GPT.reset_parameters`
initialises everything in one place (docs/RECIPE.md §2.9). The ``prev_*`` arguments
let the KV-cache sampler feed one token at a time: both BigramHash and
SmearGate look exactly one position back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Multipliers of the bigram hash (docs/RECIPE.md §2.7); products are taken in int32 with
# wrap-around, exactly as the records compute them.
BIGRAM_MUL_CURRENT = 36313
BIGRAM_MUL_PREVIOUS = 27191


def bigram_bucket_ids(ids: torch.Tensor, num_buckets: int,
                      prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket of each position of ``ids`` [B, T] as int64 [B, T].

    ``((36313·id_t) XOR (27191·id_{t-1})) mod (B-1)`` in int32 (``mod`` is
    non-negative). Position 0 uses ``prev_ids`` [B] when given (a continuation),
    else the reserved bucket ``B-1`` (start of the sequence).
    """
    current = ids.to(torch.int32)
    if prev_ids is None:
        current, previous = current[:, 1:], current[:, :-1]
    else:
        previous = torch.cat((prev_ids.to(torch.int32)[:, None], current[:, :-1]), dim=1)
    hashed = torch.bitwise_xor(current * BIGRAM_MUL_CURRENT,
                               previous * BIGRAM_MUL_PREVIOUS) % (num_buckets - 1)
    if prev_ids is None:
        start = torch.full_like(ids[:, :1], num_buckets - 1, dtype=torch.int32)
        hashed = torch.cat((start, hashed), dim=1)
    return hashed.long()


class BigramHash(nn.Module):
    """Hashed (previous, current) token-pair embedding projected to the model width."""

    def __init__(self, num_buckets: int, bigram_dim: int, model_dim: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.embed = nn.Embedding(num_buckets, bigram_dim)
        self.proj = nn.Linear(bigram_dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.empty(()))

    def forward(self, ids: torch.Tensor, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
        buckets = bigram_bucket_ids(ids, self.num_buckets, prev_ids)
        return self.proj(self.embed(buckets)) * self.scale


class SmearGate(nn.Module):
    """``h_t ← (1-g)·h_t + g·h_{t-1}`` with a per-channel ``g = σ(gate)``, ``h_{-1} = 0``."""

    def __init__(self, model_dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(model_dim))

    def forward(self, h: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D]; ``prev`` [B, D] is the (unsmeared) input before position 0."""
        first = torch.zeros_like(h[:, :1]) if prev is None else prev[:, None].to(h.dtype)
        shifted = torch.cat((first, h[:, :-1]), dim=1)
        g = torch.sigmoid(self.gate).to(h.dtype)
        return (1 - g) * h + g * shifted


class ValueEmbedding(nn.Module):
    """One token table shared by the chosen layers, projected to the value width.

    ``forward`` returns ``proj(E[ids])·scale`` once per pass; layer k of the
    chosen list adds it times ``layer_scales[k]`` to its value (docs/RECIPE.md §2.5).
    """

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, ve_dim)
        self.proj = nn.Linear(ve_dim, kv_dim, bias=False)
        self.scale = nn.Parameter(torch.empty(()))
        self.layer_scales = nn.Parameter(torch.empty(num_layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids)) * self.scale


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm over the last dim (used for the embedding and final norms)."""
    return F.rms_norm(x, (x.shape[-1],))
