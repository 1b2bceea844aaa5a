"""The flex block mask built from segment ranges equals create_block_mask's; span caps in the model.

``flex_document_mask`` derives the block mask from per-block segment ranges (pgolf.model.doc_attention)
instead of evaluating the mask on every (query, key) pair; it must give the same tensors, and the
attention through it the same numbers as the dense mask, with and without a span cap.
"""
from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_model_config

from pgolf.model.doc_attention import (dense_document_mask, flex_document_mask, flex_document_mask_pairwise,
                                       masked_attention)
from pgolf.model.gpt import GPT

BOS = 1
BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def layouts(t: int) -> torch.Tensor:
    """Rows: random documents, one long document, BOS everywhere, documents at block edges, a leading BOS."""
    gen = torch.Generator().manual_seed(t)
    rows = torch.randint(2, 50, (5, t), generator=gen)
    rows[0, torch.rand(t, generator=gen) < 0.02] = BOS
    rows[2, :] = BOS
    rows[3, ::128] = BOS
    rows[4, [0, 130, 131, 199]] = BOS
    return rows


@pytest.mark.slow  # FlexAttention's first call costs seconds on CPU: kept out of the fast lane
@pytest.mark.parametrize("t", [256, 384])
@pytest.mark.parametrize("span", [None, 0, 7, 100, 128, 300, "tensor"])
def test_block_mask_from_segment_ranges_equals_create_block_mask(t, span):
    span = torch.tensor(64) if span == "tensor" else span
    ids = layouts(t)
    built, reference = flex_document_mask(ids, BOS, span), flex_document_mask_pairwise(ids, BOS, span)
    for name in BLOCK_FIELDS:
        assert torch.equal(getattr(built, name), getattr(reference, name)), name
    assert built.BLOCK_SIZE == reference.BLOCK_SIZE and built.seq_lengths == reference.seq_lengths


@pytest.mark.slow  # FlexAttention's first call costs seconds on CPU: kept out of the fast lane
@pytest.mark.parametrize("span", [None, 48])
def test_flex_through_the_built_mask_equals_the_dense_mask(span):
    ids = layouts(256)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 256, 8, generator=gen)
    k, v = torch.randn(2, 5, 2, 256, 8, generator=gen)
    dense = masked_attention(q, k, v, dense_document_mask(ids, BOS, span))
    flex = masked_attention(q, k, v, flex_document_mask(ids, BOS, span))
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


@pytest.mark.slow  # FlexAttention's first call costs seconds on CPU: kept out of the fast lane
def test_rows_off_the_block_size_fall_back_to_create_block_mask():
    ids = layouts(200)
    built, reference = flex_document_mask(ids, BOS, 50), flex_document_mask_pairwise(ids, BOS, 50)
    for name in BLOCK_FIELDS:
        assert torch.equal(getattr(built, name), getattr(reference, name)), name


def test_with_a_span_cap_perturbing_one_segment_leaves_every_other_segment_exactly_unchanged():
    cfg = tiny_model_config(doc_attention=True, doc_attention_impl="dense", ve_layers=[], ve_dim=0,
                            bigram_buckets=0, bigram_dim=0, smear_gate=False, vrl=False)
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for name in ("qo_bank", "mlp_down_bank"):  # zero-initialised outputs: make every layer act
            getattr(model, name).normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model.set_doc_span(10)
    ids = torch.randint(2, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    ids[0, 0] = BOS  # one document of 40 tokens → segments [0,10) [10,20) [20,30) [30,40)
    perturbed = ids.clone()
    perturbed[0, 12:18] = (ids[0, 12:18] + 7) % 498 + 2
    with torch.no_grad():
        a, b = model.forward_logits(ids), model.forward_logits(perturbed)
    moved = (a - b).abs().amax(dim=-1)[0]
    assert torch.all(moved[:10] == 0) and torch.all(moved[20:] == 0) and moved[12:20].max() > 0
    model.set_doc_span(0)  # uncut: the later tokens of the same document now see the change
    with torch.no_grad():
        assert (model.forward_logits(ids) - model.forward_logits(perturbed))[0, 20:].abs().max() > 0
