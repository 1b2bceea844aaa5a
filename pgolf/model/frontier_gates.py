"""The frontier's two small input-dependent gates (docs/FRONTIER.md §2.4, §2.7).

SparseAttnGate (per layer): each head's attention output (after XSA, before
the output projection) is scaled by ``σ(scale · W_g[h] · n[:window])``, where
``n`` is the layer's normalised attention input and ``W_g`` [heads, window]
is zero-initialised (every gate starts at 0.5). Only the first ``window``
channels of ``n`` feed the gate, which keeps it at a few dozen parameters.

Input SmearGate (once, on the raw token embedding ``e``, before the embedding
RMSNorm): for t ≥ 1, ``e_t ← e_t + λ·σ(w·e_t[:window])·e_{t−1}·[id_t ≠ BOS]``,
``e_0`` unchanged; ``w`` [1, window] and ``λ`` are zero-initialised, so it
starts as the identity. The BOS mask keeps the last token of one document
out of the next document's BOS in packed rows (the F1855 fix; switchable
because P2135 ran without it). ``e_{t−1}`` is the unsmeared embedding.
"""
from __future__ import annotations

import torch
from torch import nn


def sparse_attn_gate(y: torch.Tensor, n: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """y [B, H, T, hd] head outputs, n [B, T, D] attention input, weight [H, window] → gated y."""
    window = weight.shape[1]
    logits = n[..., :window] @ weight.to(n.dtype).t()             # [B, T, H]
    gate = torch.sigmoid(scale * logits).transpose(1, 2)[..., None]  # [B, H, T, 1]
    return y * gate.to(y.dtype)


class InputSmearGate(nn.Module):
    """The input-dependent SmearGate of the module docstring."""

    def __init__(self, window: int, bos_id: int, bos_mask: bool):
        super().__init__()
        self.bos_id = bos_id
        self.bos_mask = bos_mask
        self.gate = nn.Parameter(torch.empty(1, window))
        self.smear_lambda = nn.Parameter(torch.empty(()))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate.zero_()
            self.smear_lambda.zero_()

    def forward(self, e: torch.Tensor, ids: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """e [B, T, D] raw embeddings of ids [B, T]; ``prev`` [B, D]: the raw embedding before position 0."""
        window = self.gate.shape[1]
        first = torch.zeros_like(e[:, :1]) if prev is None else prev[:, None].to(e.dtype)
        shifted = torch.cat((first, e[:, :-1]), dim=1)
        g = torch.sigmoid(e[..., :window] @ self.gate.to(e.dtype).t())  # [B, T, 1]
        update = self.smear_lambda.to(e.dtype) * g * shifted
        if self.bos_mask:
            update = update * (ids != self.bos_id)[..., None].to(e.dtype)
        return e + update
