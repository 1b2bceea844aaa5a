"""The n-gram tilt inside the sliding eval and score-first TTT: every target once, each score the
float64 tilted NLL, no score depends on a later token, TTT trains on the untilted loss."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from tests.helpers.eval_lm import TILT_OFF, TinyBankLM, make_tables
from tests.helpers.models import tiny_model

from pgolf.eval.ngram_tilt import stream_hints, tilted_log_probs
from pgolf.eval.sliding import EvalSlidingConfig, evaluate_sliding, score_metrics, score_sliding_windows
from pgolf.eval.ttt import EvalTTTConfig, run_ttt

torch.set_num_threads(1)
VOCAB = 16
TILT = dict(ngram_tilt=True, ngram_order=3, ngram_threshold=0.6, ngram_beta=2.625)
WINDOWS = EvalSlidingConfig(seq_len=16, stride=4, batch_windows=3, trim_to_seq_len=False, compile=False)
TILTED = dataclasses.replace(WINDOWS, **TILT)
SGD = EvalTTTConfig(chunk_tokens=40, epochs=2, optimizer="sgd", lr=0.1, lr_schedule="cosine", momentum=0.9,
                    beta2=0.999, weight_decay=0.0, freeze_blocks=0, grad_clip=1.0, batch_seqs=2)
SGD_TILTED = dataclasses.replace(SGD, **TILT)


def repetitive(num_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    """A stream made of a few repeated phrases plus noise, so order-3 hints fire often."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, int(rng.integers(3, 8))) for _ in range(4)]
    parts, size = [], 0
    while size < num_tokens:
        part = phrases[int(rng.integers(0, 4))] if rng.random() < 0.8 else rng.integers(0, vocab, 2)
        parts.append(part)
        size += part.size
    return torch.from_numpy(np.concatenate(parts)[:num_tokens].astype(np.int64))


def observed(run) -> tuple[np.ndarray, object]:
    """Per-target scores of one evaluation, asserting every target is scored exactly once."""
    scores, counts = {}, {}

    def observer(positions, context, nll):
        for p, v in zip(positions.tolist(), nll.double().tolist()):
            scores[p] = v
            counts[p] = counts.get(p, 0) + 1

    result = run(observer)
    n = result.sums.scored_tokens
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}
    return np.array([scores[p] for p in range(n)]), result


@pytest.mark.parametrize("num_tokens", [40, 101, 203])
def test_sliding_tilted_scores_equal_a_float64_full_distribution_reference(num_tokens):
    # A model that sees 3 tokens back scores every window like one pass over the whole stream.
    tokens = repetitive(num_tokens, VOCAB, seed=num_tokens)
    model = TinyBankLM(VOCAB, full_context=False, seed=4).double()
    scores, result = observed(lambda obs: score_sliding_windows(model, tokens, make_tables(VOCAB), TILTED,
                                                                observer=obs))
    hint, has_hint = stream_hints(tokens, 3, 0.6)
    with torch.no_grad():
        logits = model.forward_logits(tokens[None, :-1])[0]
    logp = tilted_log_probs(logits, torch.from_numpy(hint), torch.from_numpy(has_hint), 2.625)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(num_tokens - 1, dtype=torch.float64), atol=1e-12)
    ref = -logp.gather(-1, tokens[1:, None]).squeeze(-1).numpy()
    assert np.allclose(scores, ref, rtol=1e-12, atol=0)
    assert has_hint.sum() > num_tokens // 4 and result.tilt.gated == has_hint.sum()
    plain, _ = observed(lambda obs: score_sliding_windows(model, tokens, make_tables(VOCAB), WINDOWS,
                                                          observer=obs))
    assert np.allclose(scores[~has_hint], plain[~has_hint], rtol=1e-12, atol=0)
    assert not np.allclose(scores[has_hint], plain[has_hint])


@pytest.mark.parametrize("seed", [0, 1])
def test_sliding_tilted_score_never_depends_on_a_later_token(seed):
    torch.manual_seed(seed)
    model = tiny_model(seed)                                  # the real GPT, fp32 on CPU
    cfg = dataclasses.replace(TILTED, seq_len=24, stride=8, batch_windows=4)
    tokens = repetitive(160, 64, seed=seed)
    tables = make_tables(64)
    base, result = observed(lambda obs: score_sliding_windows(model, tokens, tables, cfg, observer=obs))
    assert result.tilt.gated > 20
    for p in (5, 30, 77, 120, 150):
        changed = tokens.clone()
        changed[p + 2:] = (changed[p + 2:] + 1 + torch.arange(changed.numel() - p - 2) % 7) % 64
        scores, _ = observed(lambda obs: score_sliding_windows(model, changed, tables, cfg, observer=obs))
        assert np.array_equal(scores[:p + 1], base[:p + 1]), p      # exactly: difference 0
        assert scores[p + 1] != base[p + 1]


def test_evaluate_sliding_reports_the_tilt_and_counts_its_hint_pass_once(monkeypatch):
    import time

    import pgolf.eval.ngram_tilt as ngram_tilt

    def slow_hints(*args):           # a hint pass of >= 0.5 s, so its place in the timings shows
        time.sleep(0.5)
        return stream_hints(*args)

    monkeypatch.setattr(ngram_tilt, "stream_hints", slow_hints)
    tokens = repetitive(203, VOCAB, seed=3)
    model = TinyBankLM(VOCAB, seed=5)
    metrics = evaluate_sliding(model, tokens, make_tables(VOCAB), TILTED)
    hint, has_hint = stream_hints(tokens, 3, 0.6)
    assert metrics["ngram_gated"] == has_hint.sum() and metrics["scored_tokens"] == 202
    assert metrics["ngram_gated_fraction"] == pytest.approx(has_hint.mean())
    assert 0.5 <= metrics["ngram_seconds"] <= metrics["seconds"] and metrics["nonoverlap_seconds"] < 0.5
    off = evaluate_sliding(model, tokens, make_tables(VOCAB), WINDOWS)
    assert "ngram_gated" not in off and off["val_bpb"] != metrics["val_bpb"]
    assert score_sliding_windows(model, tokens, make_tables(VOCAB), WINDOWS).sums.val_bpb == off["val_bpb"]


def ttt_scores(model, tokens, cfg, windows=WINDOWS):
    return observed(lambda obs: run_ttt(model, tokens, make_tables(VOCAB), windows, cfg, observer=obs))


def test_ttt_tilt_changes_scores_only_never_the_training():
    tokens = repetitive(161, VOCAB, seed=7)
    plain_model, tilted_model = TinyBankLM(VOCAB, seed=8), TinyBankLM(VOCAB, seed=8)
    plain, plain_result = ttt_scores(plain_model, tokens, SGD)
    tilted, result = ttt_scores(tilted_model, tokens, SGD_TILTED)
    assert result.train_steps == plain_result.train_steps > 0
    for a, b in zip(plain_model.parameters(), tilted_model.parameters()):
        assert torch.equal(a, b)                          # the training loss is untilted
    _, has_hint = stream_hints(tokens, 3, 0.6)
    assert np.allclose(tilted[~has_hint], plain[~has_hint], rtol=1e-5, atol=0)
    assert not np.allclose(tilted[has_hint], plain[has_hint])
    assert score_metrics(result)["ngram_gated"] == has_hint.sum()


def test_ttt_with_lr_zero_and_the_tilt_equals_the_tilted_sliding_eval():
    tokens = repetitive(150, VOCAB, seed=9)
    model = TinyBankLM(VOCAB, seed=10)
    sliding, _ = observed(lambda obs: score_sliding_windows(model, tokens, make_tables(VOCAB), TILTED,
                                                            observer=obs))
    scores, result = ttt_scores(model, tokens, dataclasses.replace(SGD_TILTED, lr=0.0))
    assert result.train_steps > 0 and np.array_equal(scores, sliding)


def test_ttt_tilted_score_never_depends_on_a_later_token():
    tokens = repetitive(161, VOCAB, seed=11)
    base, _ = ttt_scores(TinyBankLM(VOCAB, seed=12), tokens, SGD_TILTED)
    for p in (10, 45, 57, 99, 130):
        changed = tokens.clone()
        changed[p + 2:] = (changed[p + 2:] + 1 + torch.arange(changed.numel() - p - 2) % 5) % VOCAB
        scores, _ = ttt_scores(TinyBankLM(VOCAB, seed=12), changed, SGD_TILTED)
        assert np.array_equal(scores[:p + 1], base[:p + 1]), p
        assert scores[p + 1] != base[p + 1]


@pytest.mark.slow
def test_stage_with_the_tilt_scores_the_same_targets_and_records_it(tiny_data, tmp_path):
    import json

    import stages.eval_sliding as stage
    from tests.helpers import TINY_TRAIN_PARAMS
    from tests.helpers.models import write_eval_root

    write_eval_root(tmp_path, tiny_data, TINY_TRAIN_PARAMS["model"])
    section = {"seq_len": 32, "stride": 16, "batch_windows": 16, "trim_to_seq_len": True, "compile": False}
    params = {"launch": {"nproc_per_node": 1, "device": "cpu"}, "eval_sliding": {**section, **TILT_OFF}}
    off = stage.run(params, tmp_path)
    params["eval_sliding"].update(ngram_tilt=True, ngram_order=4)
    on = stage.run(params, tmp_path)
    assert json.loads((tmp_path / "artifacts/eval_sliding/metrics.json").read_text()) == on
    assert on["scored_tokens"] == off["scored_tokens"] and on["bytes"] == off["bytes"]
    assert on["ngram_gated"] > 0 and on["val_bpb"] != off["val_bpb"] and "ngram_gated" not in off


@pytest.mark.gpu
def test_cuda_compiled_tilted_scoring_is_close_to_cpu_fp32():
    tokens = repetitive(301, VOCAB, seed=13)
    tables = make_tables(VOCAB)
    cfg = dataclasses.replace(TILTED, seq_len=32, stride=8, batch_windows=4)
    cpu = score_sliding_windows(TinyBankLM(VOCAB, seed=14), tokens, tables, cfg)
    gpu = score_sliding_windows(TinyBankLM(VOCAB, seed=14).cuda(), tokens.cuda(), tables,
                                dataclasses.replace(cfg, compile=True), warmup=True)
    assert (gpu.sums.scored_tokens, gpu.sums.byte_sum) == (cpu.sums.scored_tokens, cpu.sums.byte_sum)
    assert gpu.tilt.gated == cpu.tilt.gated > 0
    assert gpu.sums.nll_sum == pytest.approx(cpu.sums.nll_sum, rel=2e-2)
