"""Document-local causal attention (docs/FRONTIER.md §1.6, §2.4).

Rows are packed from BOS-separated documents. With ``doc_attention`` on, a
query attends to a key only if the key is not later (causal) and both lie in
the same document, where a token's document number is the count of BOS
tokens at or before it in the row: a BOS starts a new document, and the
tokens before a row's first BOS (a document cut at the row edge) form one
document of their own. Positions stay row-absolute (RoPE is relative, so
this only changes rounding, docs/FRONTIER.md §2.4).

Two implementations of the same mask, picked by ``doc_attention_impl``:

* ``dense``: an explicit boolean mask [B, 1, T, T] through SDPA. Exact and
  portable (the CPU path and the reference), O(T²) memory per row.
* ``flex``: FlexAttention with a block mask built from the same document
  numbers; fully masked blocks are skipped, so cost falls with document
  length. CUDA only (compiled with the model).

``auto`` is ``flex`` on CUDA and ``dense`` elsewhere. bench/attention_docmask.py
times both (and unmasked SDPA) at record shape.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

DOC_ATTENTION_IMPLS = ("auto", "dense", "flex")

try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None
    create_block_mask = flex_attention = None

DocMask = Union[torch.Tensor, "BlockMask"]


def document_ids(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """ids [B, T] → document number of every position [B, T] (int32)."""
    return torch.cumsum((ids == bos_id).to(torch.int32), dim=1, dtype=torch.int32)


def dense_document_mask(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend to key s (s ≤ t, same document)."""
    doc = document_ids(ids, bos_id)
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def flex_document_mask(ids: torch.Tensor, bos_id: int) -> "BlockMask":
    """The same mask as a FlexAttention block mask (for :func:`masked_attention`)."""
    if create_block_mask is None:
        raise RuntimeError("doc_attention_impl 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    doc = document_ids(ids, bos_id)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    b, t = ids.shape
    return create_block_mask(same_document_causal, B=b, H=None, Q_LEN=t, KV_LEN=t, device=ids.device)


def document_mask(ids: torch.Tensor, bos_id: int, impl: str) -> DocMask:
    """The mask for ``ids`` in the chosen implementation (module docstring)."""
    if impl not in DOC_ATTENTION_IMPLS:
        raise ValueError(f"doc_attention_impl must be one of {DOC_ATTENTION_IMPLS}, got {impl!r}")
    if impl == "flex" or (impl == "auto" and ids.device.type == "cuda"):
        return flex_document_mask(ids, bos_id)
    return dense_document_mask(ids, bos_id)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, KV, T, hd] (GQA) under a document mask → [B, H, T, hd]."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
