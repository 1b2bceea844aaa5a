"""Per-document LoRA TTT with phased global SGD: legality (docs/FRONTIER.md §5.4) and a float64 reference.

One tiny float64 frontier GPT (recurrence: 8 virtual layers, two lanes, gates, document-local attention)
on a stream of documents; the library's run is spied on through its observer.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pgolf.config import from_params, to_dict
from pgolf.data.bpb import SidecarBytes, stream_bytes
from pgolf.errors import ParamError
from pgolf.eval.doc_ttt import run_doc_ttt
from pgolf.eval.documents import (ascending_index, chunk_size, phase_boundaries, prefix_documents, run_batches,
                                  split_documents)
from pgolf.eval.ttt import EvalTTTConfig
from tests.helpers.doc_ttt_ref import BOS, SEQ_LEN, VOCAB, doc_config, doc_stream, float64_model, reference_doc_ttt
from tests.helpers.eval_lm import make_tables

torch.set_num_threads(1)
# 9 documents (one longer than SEQ_LEN twice over, so its windows slide), batches of 3, short-document
# chunks for the last batch, two phases after 2 and 4 scored documents (pauses after batches 1 and 2).
# The spied tests run twice: eager (unpadded) and on eval_ttt.compile's padded chunk forward, uncompiled
# (pgolf/eval/lora_forward.py; window widths in buckets 8, 16, 24).
LENGTHS = [30, 5, 12, 50, 3, 9, 17, 26, 7]
CFG = doc_config(prefix_docs=4, phases=2, short_doc_chunks=((10, 3),), compile_width_step=8)


def run_spied(tokens: torch.Tensor, cfg: EvalTTTConfig = CFG, source=None, world_size: int = 1, **kw):
    """(result, per-target NLL, events) of one library run on a fresh copy of the model."""
    events, nll = [], np.full(tokens.numel() - 1, np.nan)

    def observer(event, info):
        events.append((event, info))
        if event == "score":
            assert np.all(np.isnan(nll[info["positions"].numpy()])), "a target was scored twice"
            nll[info["positions"].numpy()] = info["nll"].numpy()

    source = source if source is not None else make_tables(VOCAB)
    result = run_doc_ttt(float64_model(0), tokens, source, SEQ_LEN, cfg, observer=observer, **kw)
    return result, nll, events


@pytest.fixture(scope="module", params=[None, pytest.param("padded", marks=pytest.mark.slow)], ids=["eager", "padded"])
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def spied(backend):
    tokens = doc_stream(LENGTHS, seed=1)
    sidecar = SidecarBytes(np.random.default_rng(0).integers(0, 7, tokens.numel()).astype(np.uint16))
    return (tokens, sidecar) + run_spied(tokens, source=sidecar, backend=backend)


def test_documents_batches_and_phase_boundaries():
    tokens = doc_stream(LENGTHS, seed=1).numpy()
    docs = split_documents(tokens, BOS)
    assert docs.targets.tolist() == LENGTHS and int(docs.targets.sum()) == tokens.size - 1
    headless = split_documents(doc_stream([4, 6], seed=2, bos_first=False).numpy(), BOS)
    assert headless.starts.tolist() == [0, 4] and headless.targets.tolist() == [4, 6]
    batches = run_batches(docs, 4)
    assert [docs.targets[b].tolist() for b in batches] == [[50], [30, 26, 17, 12], [9, 7, 5, 3]]
    assert phase_boundaries(2500, 3) == [833, 1666, 2500] and phase_boundaries(0, 3) == []
    assert chunk_size(256, 48, ((2000, 24), (256, 8))) == 8 and chunk_size(257, 48, ((256, 8), (2000, 24))) == 24
    assert chunk_size(2001, 48, ((256, 8), (2000, 24))) == 48
    scored = np.array([3, 0, 7, 6])   # lengths 50, 30, 26, 17: keep the two shortest
    assert prefix_documents(scored, ascending_index(docs), 2).tolist() == [6, 7]


def test_every_target_scored_once_and_every_byte_charged(spied, backend):
    tokens, sidecar, result, nll, events = spied
    targets = tokens.numel() - 1
    chunk_lengths = [len(info["positions"]) for event, info in events if event == "score"]
    assert sum(chunk_lengths) == targets == result.sums.scored_tokens and not np.isnan(nll).any()
    assert result.sums.byte_sum == int(sidecar.per_token[1:targets + 1].sum())
    assert result.sums.nll_sum == pytest.approx(nll.sum(), rel=1e-13)
    assert result.windows == len(chunk_lengths) and result.documents == len(LENGTHS)
    tables = make_tables(VOCAB)
    plain, _, _ = run_spied(tokens, dataclasses.replace(CFG, prefix_docs=0), source=tables, backend=backend)
    assert plain.sums.byte_sum == stream_bytes(tables, tokens.numpy())


def test_spy_each_chunk_scored_before_any_step_that_used_it(spied):
    _, _, result, _, events = spied
    scored_chunks: dict[int, list[int]] = {}
    steps_taken: dict[int, int] = {}
    for event, info in events:
        if event == "score":
            doc, chunk = info["doc"], info["chunk"]
            assert scored_chunks.setdefault(doc, []) == list(range(chunk)), "chunks out of order"
            # the adapters that scored chunk c took exactly c steps: one on each earlier chunk of this document
            assert info["adapter_steps"] == steps_taken.get(doc, 0) == chunk
            scored_chunks[doc].append(chunk)
        elif event == "step":
            for doc in info["docs"]:
                assert scored_chunks[doc][-1] == info["chunk"], "a step used a chunk not yet scored"
                steps_taken[doc] = steps_taken.get(doc, 0) + 1
    docs = split_documents(doc_stream(LENGTHS, seed=1).numpy(), BOS)
    chunks = {}
    for batch in run_batches(docs, CFG.batch_docs):   # the chunk size is the batch's (its longest document)
        size = chunk_size(int(docs.targets[batch[0]]), CFG.chunk_tokens, CFG.short_doc_chunks)
        chunks.update({int(d): -(-int(docs.targets[d]) // size) for d in batch})
    assert {d: len(c) for d, c in scored_chunks.items()} == chunks
    assert steps_taken == {d: n - 1 for d, n in chunks.items() if n > 1}  # never a step after the last chunk
    assert result.lora_steps > 0


def test_global_sgd_sees_only_documents_already_scored(spied):
    tokens, _, result, _, events = spied
    docs = split_documents(tokens.numpy(), BOS)
    scored_positions: set[int] = set()
    pauses = []
    for event, info in events:
        if event == "score":
            scored_positions.update(info["positions"].tolist())
        elif event == "global_sgd":
            for d in info["docs"]:
                start, n = int(docs.starts[d]), int(docs.targets[d])
                assert set(range(start, start + n)) <= scored_positions, f"document {d} not fully scored"
            assert set(info["docs"]) <= set(info["scored"])
            pauses.append(len(info["docs"]))
    assert pauses == [2, 4] and result.phases_done == 2 and len(result.global_sgd_chunks) == 2


def test_changing_a_document_after_position_t_changes_no_earlier_score(spied, backend):
    tokens, sidecar, _, base, events = spied
    docs = split_documents(tokens.numpy(), BOS)
    order = [info["doc"] for event, info in events if event == "score"]
    d = 0                                   # 30 targets: in the second batch, before the second pause
    start = int(docs.starts[d])
    t = start + 13                          # tokens after index t change; targets up to t - 1 read only <= t
    changed = tokens.clone()
    span = slice(t + 1, start + int(docs.targets[d]))
    changed[span] = 2 + (changed[span] - 2 + 1 + torch.arange(changed[span].numel()) % 7) % (VOCAB - 2)
    _, after, _ = run_spied(changed, source=sidecar, backend=backend)
    assert np.array_equal(after[start:t], base[start:t])           # exactly 0 difference on CPU
    assert not np.array_equal(after[t:start + 30], base[t:start + 30])
    first_seen = order.index(d)
    earlier = {doc for doc in order[:first_seen]}
    same_batch = next(b for b in run_batches(docs, CFG.batch_docs) if d in b)
    for other in earlier | set(same_batch.tolist()) - {d}:
        s, n = int(docs.starts[other]), int(docs.targets[other])
        assert np.array_equal(after[s:s + n], base[s:s + n]), f"document {other} changed"


def test_matches_the_one_document_at_a_time_float64_reference(spied, backend):
    tokens, _, result, _, _ = spied
    _, nll, _ = run_spied(tokens, backend=backend)
    reference = reference_doc_ttt(float64_model(0), tokens, SEQ_LEN, CFG).numpy()
    # Same arithmetic up to summation order and padding: float64 rounding only.
    np.testing.assert_allclose(nll, reference, rtol=0, atol=1e-11)


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_adapters_and_phases_change_the_scores():
    tokens = doc_stream(LENGTHS, seed=1)
    _, adapted, _ = run_spied(tokens)
    _, frozen, _ = run_spied(tokens, dataclasses.replace(CFG, lr=0.0, weight_decay=0.0, prefix_docs=0))
    _, no_phase, _ = run_spied(tokens, dataclasses.replace(CFG, prefix_docs=0))
    docs = split_documents(tokens.numpy(), BOS)
    first_chunks = np.concatenate([np.arange(s, s + min(n, 3 if n <= 10 else 8))
                                   for s, n in zip(docs.starts, docs.targets)])
    # lr 0: B stays 0, so every score is the plain model's on the same window
    plain = float64_model(0)
    with torch.no_grad():
        s = int(docs.starts[3])
        ids = tokens[s:s + 8][None]
        logp = torch.log_softmax(plain.forward_logits(ids)[0], -1)
        expect = -logp.gather(-1, tokens[s + 1:s + 9, None])[:, 0]
    np.testing.assert_allclose(frozen[s:s + 8], expect.numpy(), rtol=0, atol=1e-12)
    assert np.array_equal(adapted[first_chunks[:8]], no_phase[first_chunks[:8]])
    assert not np.allclose(adapted, frozen) and not np.allclose(adapted, no_phase)


def test_score_adjust_receives_normalised_rows_and_global_positions(backend):
    tokens = doc_stream([20, 9], seed=3)
    cfg = dataclasses.replace(CFG, prefix_docs=0)
    seen = []

    def adjust(logprobs, targets, positions):
        assert torch.allclose(torch.logsumexp(logprobs, -1), torch.zeros(len(targets), dtype=logprobs.dtype))
        assert torch.equal(targets, tokens[positions + 1])
        seen.append(positions)
        return -logprobs.gather(-1, targets[:, None])[:, 0] + 1.0

    plain, nll, _ = run_spied(tokens, cfg, backend=backend)
    tilted, tilted_nll, _ = run_spied(tokens, cfg, backend=backend, score_adjust=adjust)
    assert sorted(torch.cat(seen).tolist()) == list(range(tokens.numel() - 1))
    np.testing.assert_allclose(tilted_nll, nll + 1.0, rtol=0, atol=1e-12)   # training stays on the plain NLL
    assert tilted.sums.nll_sum == pytest.approx(plain.sums.nll_sum + tokens.numel() - 1, rel=1e-12)


def test_row_adamw_is_torch_adamw_row_by_row():
    from pgolf.eval.lora import RowAdamW
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5, dtype=torch.float64)
    mine = start.clone().requires_grad_(True)
    rows = [start[i].clone().requires_grad_(True) for i in range(3)]
    opt = RowAdamW([mine], 0.02, (0.0, 0.99), 1e-10, 0.5)
    refs = [torch.optim.AdamW([r], lr=0.02, betas=(0.0, 0.99), eps=1e-10, weight_decay=0.5) for r in rows]
    for step in range(5):
        grad = torch.randn(3, 4, 5, dtype=torch.float64)
        count = (3, 2, 2, 1, 0)[step]
        mask = torch.arange(3) < count
        mine.grad = grad.clone()
        opt.step(count)
        for i in range(3):
            if mask[i]:
                rows[i].grad = grad[i].clone()
                refs[i].step()
        for i in range(3):
            torch.testing.assert_close(mine[i], rows[i], rtol=0, atol=1e-15)


def test_zero_b_adapters_leave_the_forward_bit_identical_and_each_target_acts():
    from pgolf.eval.lora import BatchedLoRA, LORA_TARGETS
    model = float64_model(0)
    ids = doc_stream([12, 9], seed=4)[:-1].view(3, 7)
    lora = BatchedLoRA(model, 3, 2, 4.0, LORA_TARGETS, torch.device("cpu"), torch.float64)
    lora.reset_a(torch.Generator().manual_seed(0))
    assert len(lora.a) == 5 * 8 + 1                  # q k v o mlp per virtual layer (8 visits), one head
    with torch.no_grad():
        plain = model.forward_logits(ids)
        assert torch.equal(model.adapted_logits(model.adapted_hidden(ids, lora), lora), plain)
        for target in LORA_TARGETS:
            key = next(k for k in lora.b if k[1] == target)
            lora.b[key].normal_()
            out = model.adapted_logits(model.adapted_hidden(ids, lora), lora)
            assert not torch.allclose(out, plain), target
            if target == "head":   # added to the logits before the soft-cap
                hidden = model.adapted_hidden(ids, lora)
                delta = (hidden @ lora.a[key].transpose(1, 2)) @ lora.b[key].transpose(1, 2) * 2.0
                raw = hidden @ model.tok_emb.weight.T + delta
                torch.testing.assert_close(out, 30.0 * torch.tanh(raw / 30.0), rtol=0, atol=1e-12)
            lora.b[key].zero_()


def test_config_keys_and_their_checks():
    params = {"eval_ttt": to_dict(CFG)}
    assert from_params(EvalTTTConfig, params, "eval_ttt") == CFG
    for key, value, match in (("lora_targets", ["q", "w"], "lora_targets"), ("optimizer", "sgd", "doc_lora"),
                              ("batch_docs", 0, "batch_docs"), ("short_doc_chunks", [[0, 8]], "short_doc_chunks")):
        bad = {"eval_ttt": {**to_dict(CFG), key: value}}
        with pytest.raises(ParamError, match=match):
            from_params(EvalTTTConfig, bad, "eval_ttt")


@pytest.mark.slow  # > 0.7 s: kept out of the fast lane
def test_reference_with_two_ranks_differs_from_one_only_in_order():
    """Two simulated ranks: each keeps its own warm A and pauses come after rounds of two batches."""
    tokens = doc_stream(LENGTHS[:6], seed=1)
    cfg = dataclasses.replace(CFG, prefix_docs=0, batch_docs=2)
    one = reference_doc_ttt(float64_model(0), tokens, SEQ_LEN, cfg, world_size=1)
    two = reference_doc_ttt(float64_model(0), tokens, SEQ_LEN, cfg, world_size=2)
    _, lib_one, _ = run_spied(tokens, cfg)
    np.testing.assert_allclose(lib_one, one.numpy(), rtol=0, atol=1e-11)
    assert not np.allclose(one.numpy(), two.numpy())   # warm A chains differ per rank
