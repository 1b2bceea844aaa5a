"""Document-local causal attention (docs/FRONTIER.md §1.6, §2.4).

Rows are packed from BOS-separated documents. With ``doc_attention`` on, a
query attends to a key only if the key is not later (causal) and both lie in
the same *segment*. Segments: a BOS starts a new one, and the tokens before a
row's first BOS (a document cut at the row edge) form one of their own; that
is the document number, the count of BOS tokens at or before a position.
With a span cap C (``max_span``, the records' segment cap: packed rows of
98,304 tokens with C = 2048, docs/FRONTIER.md §1.6) every such segment is
further cut into pieces of C tokens counted from its start, the last piece
shorter; the pieces get no BOS (tokens are never changed, only the mask).
Without a cap the row length is the cap. Positions stay row-absolute (RoPE
is relative, so this only changes rounding, docs/FRONTIER.md §2.4).

Two implementations of the same mask, picked by ``doc_attention_impl``:

* ``dense``: an explicit boolean mask [B, 1, T, T] through SDPA. Exact and
  portable (the CPU path and the reference), O(T²) memory per row.
* ``flex``: FlexAttention with a block mask built from the same segment
  numbers; fully masked blocks are skipped, so cost falls with document
  length. CUDA only (compiled with the model).

The block mask is built from the segment numbers directly, not by evaluating
the mask on every (query, key) pair as ``create_block_mask`` does (B·T²
evaluations: 367 ms per forward at 48 × 2048 on an H200, docs/LOG.md). Segment
numbers never decrease along a row, so with lo/hi the first/last segment of
a 128-token block, kv block j and query block i (j ≤ i) share a segment iff
j = i or hi_j = lo_i, and every pair of them is allowed iff j < i and
lo_j = hi_i: O(B·(T/128)²) work. It gives the same tensors as
``create_block_mask`` (tested); rows not a multiple of the block size fall
back to ``create_block_mask``.

``auto`` is ``flex`` on CUDA and ``dense`` elsewhere. bench/attention_docmask.py
times both (and unmasked SDPA) at record shape.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from pgolf.model.attention import DOC_ATTENTION_IMPLS


try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None
    create_block_mask = flex_attention = None

DocMask = Union[torch.Tensor, "BlockMask"]


FLEX_BLOCK = 128  # FlexAttention's default block size (query and key)

Span = Union[int, torch.Tensor, None]


def document_ids(ids: torch.Tensor, bos_id: int, max_span: Span = None) -> torch.Tensor:
    """ids [B, T] → segment number of every position [B, T] (int32), non-decreasing along a row.

    ``max_span`` (an int or a 0-d integer tensor, so a compiled graph reads a
    changed cap without recompiling; None or 0 = no cap) cuts every document
    into pieces of at most that many tokens, counted from its BOS (or the row
    start). Without a cap the number is the count of BOS tokens so far.
    """
    is_bos = ids == bos_id
    if max_span is None or (isinstance(max_span, int) and max_span == 0):
        return torch.cumsum(is_bos.to(torch.int32), dim=1, dtype=torch.int32)
    pos = torch.arange(ids.shape[1], device=ids.device)
    start = torch.cummax(torch.where(is_bos, pos, 0), dim=1).values  # the segment's BOS, or 0
    starts = (pos - start) % max_span == 0
    return torch.cumsum(starts.to(torch.int32), dim=1, dtype=torch.int32)


def dense_document_mask(ids: torch.Tensor, bos_id: int, max_span: Span = None) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend to key s (s ≤ t, same segment)."""
    doc = document_ids(ids, bos_id, max_span)
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def _same_segment_causal(doc: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
    return mask_mod


def _need_flex() -> None:
    if create_block_mask is None:
        raise RuntimeError("doc_attention_impl 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")


def flex_document_mask_pairwise(ids: torch.Tensor, bos_id: int, max_span: Span = None) -> "BlockMask":
    """The block mask by ``create_block_mask`` (every pair evaluated): the reference and the fallback."""
    _need_flex()
    doc = document_ids(ids, bos_id, max_span)
    b, t = ids.shape
    return create_block_mask(_same_segment_causal(doc), B=b, H=None, Q_LEN=t, KV_LEN=t, device=ids.device)


def _ordered_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, 1, nq, nk] → (count [B, 1, nq] int32, indices [B, 1, nq, nk] int32: the set blocks first,
    ascending, then the rest ascending), the layout ``create_block_mask`` writes."""
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return blocks.sum(dim=-1, dtype=torch.int32), order.to(torch.int32)


def flex_document_mask(ids: torch.Tensor, bos_id: int, max_span: Span = None) -> "BlockMask":
    """The same mask as a FlexAttention block mask, built from block-level segment ranges (docstring)."""
    _need_flex()
    b, t = ids.shape
    if t % FLEX_BLOCK:
        return flex_document_mask_pairwise(ids, bos_id, max_span)
    doc = document_ids(ids, bos_id, max_span)
    blocks = doc.view(b, t // FLEX_BLOCK, FLEX_BLOCK)
    lo, hi = blocks[..., 0], blocks[..., -1]  # [B, nb]
    n = t // FLEX_BLOCK
    idx = torch.arange(n, device=ids.device)
    below = idx[None, :] < idx[:, None]  # [q, kv]: kv block strictly before q block
    diagonal = idx[None, :] == idx[:, None]
    touching = below & (hi[:, None, :] == lo[:, :, None])  # hi of kv block j == lo of q block i
    full = below & (lo[:, None, :] == hi[:, :, None])
    partial = (diagonal | touching) & ~full
    kv_num, kv_idx = _ordered_blocks(partial[:, None])
    full_num, full_idx = _ordered_blocks(full[:, None])
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=_same_segment_causal(doc), seq_lengths=(t, t))


def document_mask(ids: torch.Tensor, bos_id: int, impl: str, max_span: Span = None) -> DocMask:
    """The mask for ``ids`` in the chosen implementation (module docstring)."""
    if impl not in DOC_ATTENTION_IMPLS:
        raise ValueError(f"doc_attention_impl must be one of {DOC_ATTENTION_IMPLS}, got {impl!r}")
    if impl == "flex" or (impl == "auto" and ids.device.type == "cuda"):
        return flex_document_mask(ids, bos_id, max_span)
    return dense_document_mask(ids, bos_id, max_span)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocMask) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, KV, T, hd] (GQA) under a document mask → [B, H, T, hd]."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
