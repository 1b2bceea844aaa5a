"""eval_ttt.compile's padded chunk forward (pgolf/eval/lora_forward.py) against the eager doc_lora path, float64.

The spy / score-before-update / reference tests of tests/eval/test_doc_ttt.py also run on the padded path
(its ``backend`` fixture); here: the width buckets, padding rows' gradients, identical adapter updates, and
(slow) one real torch.compile on the tiny model, global SGD's compiled forward included.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from pgolf.eval.doc_ttt import _BatchScorer, run_doc_ttt
from pgolf.eval.documents import split_documents
from pgolf.eval.lora import BatchedLoRA, RowAdamW
from pgolf.eval.lora_forward import ChunkForward, all_buckets, row_bucket, width_bucket
from tests.helpers.doc_ttt_ref import BOS, SEQ_LEN, VOCAB, doc_config, doc_stream, float64_model
from tests.helpers.eval_lm import make_tables

torch.set_num_threads(1)
LENGTHS = [30, 5, 12, 50, 3, 9, 17, 26, 7]


def test_width_buckets():
    f1855 = all_buckets(2560, 256)
    assert f1855 == [64, 128, 256] + list(range(512, 2561, 256)) and len(f1855) == 12
    assert all_buckets(24, 8) == [8, 16, 24]
    assert [width_bucket(w, 2560, 0) for w in (1, 16, 17, 2500, 2560)] == [16, 16, 32, 2512, 2560]
    for step in (0, 8, 256):
        for w in range(1, 2561, 7):
            assert w <= width_bucket(w, 2560, step) <= 2560


def test_row_buckets():
    assert [row_bucket(k, 64, 0) for k in (1, 2, 3, 5, 33, 63, 64)] == [2, 2, 4, 8, 64, 64, 64]
    assert [row_bucket(k, 24, 0) for k in (13, 17, 24)] == [16, 24, 24]      # capped at the batch size
    assert {row_bucket(k, 64, 256) for k in range(1, 65)} == {64}            # static shapes: always the batch


def _scorer(model, tokens, docs, backend: bool, cfg):
    lora = BatchedLoRA(model, cfg.batch_docs, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets),
                       torch.device("cpu"), torch.float64)
    lora.reset_a(torch.Generator().manual_seed(0))
    opt = RowAdamW(lora.parameters(), cfg.lr, (cfg.momentum, cfg.beta2), cfg.adam_eps, cfg.weight_decay)
    forward = ChunkForward(model, lora, SEQ_LEN, cfg.compile_width_step, None, opt) if backend else None
    return _BatchScorer(model, tokens, docs, make_tables(VOCAB), SEQ_LEN, lora, opt, None, None, forward)


@pytest.mark.parametrize("width_step, forward_rows", [(8, [4] * 7), (0, [4, 4, 4, 4, 2, 2, 2])])
def test_padded_batch_gives_the_same_scores_and_adapter_updates_and_padding_rows_get_zero_gradient(
        width_step, forward_rows):
    tokens = doc_stream(LENGTHS, seed=1)
    docs = split_documents(tokens.numpy(), BOS)
    model = float64_model(0)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = doc_config(batch_docs=4, compile_width_step=width_step)
    batch = np.array([3, 0, 7])          # 50, 30, 26 targets: 3 documents in 4 rows, windows slide past 24
    out = []
    for padded in (False, True):
        scorer = _scorer(model, tokens, docs, padded, cfg)
        opt, counts = scorer.opt, []
        if padded:   # the rows each chunk forward saw: the batch (static) or the row bucket (dynamic)
            seen, run = [], scorer.forward.fn

            def spy(ids, *rest, seen=seen, run=run):
                seen.append(ids.shape[0])
                return run(ids, *rest)
            scorer.forward.fn = spy

        def check(count, opt=opt, counts=counts):
            for p in opt.params:   # rows past the stepping prefix (finished or padding documents): exactly 0
                assert torch.count_nonzero(p.grad[count:]) == 0
            assert any(torch.count_nonzero(p.grad[:count]) > 0 for p in opt.params)
            counts.append(count)

        if padded:   # the padded path steps by row mask (RowAdamW.step_rows)
            def step_rows(mask, plain=scorer.forward.step):
                count = int(mask.sum())
                assert torch.equal(mask, torch.arange(mask.numel()) < count)
                check(count)
                plain(mask)
            scorer.forward.step = step_rows
        else:
            def step(count, plain=opt.step):
                check(count)
                plain(count)
            opt.step = step
        sums = scorer.run(batch, cfg.chunk_tokens)
        out.append((sums, scorer.lora, opt, counts))
    (s0, l0, o0, c0), (s1, l1, o1, c1) = out
    assert c0 == c1 == [3, 3, 3, 1, 1, 1] and torch.equal(o0.steps, o1.steps)
    assert seen == forward_rows
    torch.testing.assert_close(s1, s0, rtol=1e-13, atol=0)
    for a, b in zip(l0.parameters() + o0.exp_avg + o0.exp_avg_sq, l1.parameters() + o1.exp_avg + o1.exp_avg_sq):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-12)
    assert torch.count_nonzero(l1.b[0, "q"][3]) == 0     # the padding row was never stepped


def test_step_rows_is_step_bit_for_bit_on_stepping_rows_and_keeps_the_others():
    torch.manual_seed(0)
    start = torch.randn(4, 3, 5, dtype=torch.float64)
    a, b = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    by_count = RowAdamW([a], 0.02, (0.0, 0.99), 1e-10, 0.5)
    by_mask = RowAdamW([b], 0.02, (0.0, 0.99), 1e-10, 0.5)
    for count in (4, 3, 3, 1, 0, 2):
        grad = torch.randn(4, 3, 5, dtype=torch.float64)
        grad[count:] = 0.0   # as in a chunk: rows past the prefix get no gradient
        a.grad, b.grad = grad.clone(), grad.clone()
        by_count.step(count)
        by_mask.step_rows(torch.arange(4) < count)
        assert torch.equal(a, b) and torch.equal(by_count.steps, by_mask.steps)
        assert all(torch.equal(x, y) for x, y in zip(by_count.exp_avg + by_count.exp_avg_sq,
                                                     by_mask.exp_avg + by_mask.exp_avg_sq))


def _scores(tokens, cfg, backend, **kw):
    nll = np.full(tokens.numel() - 1, np.nan)

    def observer(event, info):
        if event == "score":
            nll[info["positions"].numpy()] = info["nll"].numpy()

    model = float64_model(0)
    result = run_doc_ttt(model, tokens, make_tables(VOCAB), SEQ_LEN, cfg, observer=observer, backend=backend, **kw)
    return result, nll, model


@pytest.mark.slow  # torch.compile (aot_eager) of the tiny model's chunk forward+backward and global SGD: ~1-2 min
def test_compiled_run_matches_eager_with_one_dynamic_width_graph():
    tokens = doc_stream(LENGTHS, seed=1)
    cfg = doc_config(prefix_docs=4, phases=2, compile_width_step=0, lora_targets=("q", "mlp", "head"))   # 1 chunk size
    eager, base, eager_model = _scores(tokens, cfg, None)
    seen = []

    class Recorder:   # the progress calls: the compile warm-up is reported before the batches start
        def start(self, task, total, unit):
            seen.append(("start", task, total))

        def advance(self, n=1, tokens=0):
            seen.append(("advance", n))
    compiled, nll, compiled_model = _scores(tokens, cfg, "aot_eager", progress=Recorder())
    assert seen[:4] == [("start", "doc ttt compile warm-up", 2), ("advance", 1), ("advance", 1),
                        ("start", "doc ttt batches", compiled.batches)]
    np.testing.assert_allclose(nll, base, rtol=0, atol=1e-12)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):   # after two phases of global SGD
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    assert compiled.graphs == 1 and compiled.compile_seconds > 0 and eager.graphs == 0
    assert compiled.lora_steps == eager.lora_steps and compiled.global_sgd_chunks == eager.global_sgd_chunks
