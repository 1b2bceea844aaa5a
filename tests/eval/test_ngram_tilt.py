"""n-gram tilt: hints against a dict-based sequential table, strict-prefix hints, the tilted
distribution summing to 1 in float64 (docs/FRONTIER.md §5.7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.eval.ngram_params import NgramTiltConfig
from pgolf.eval.ngram_tilt import (_group_by_context, make_score_adjust, stable_order,
                                   stream_hints, tilted_log_probs, tilted_nll)
from pgolf.eval.ttt import EvalTTTConfig


def reference_hints(tokens: list[int], order: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The obvious sequential table: a dict from the context tuple to (total, top, top count, counts)."""
    targets, k = len(tokens) - 1, order - 1
    hint, has_hint = np.zeros(targets, dtype=np.int64), np.zeros(targets, dtype=bool)
    table: dict[tuple, list] = {}
    for p in range(k - 1, targets):
        context, nxt = tuple(tokens[p - k + 1:p + 1]), tokens[p + 1]
        state = table.get(context)
        if state is None:
            state = table[context] = [0, None, 0, {}]
        elif state[2] / state[0] >= threshold:      # looked up before this target is counted
            hint[p], has_hint[p] = state[1], True
        state[0] += 1
        count = state[3][nxt] = state[3].get(nxt, 0) + 1
        if count > state[2]:                        # a newcomer must beat the top strictly
            state[1], state[2] = nxt, count
    return hint, has_hint


def repetitive_stream(num_tokens: int, vocab: int, seed: int) -> np.ndarray:
    """Random tokens with copied spans, so long contexts recur and hints fire."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, vocab, num_tokens)
    for _ in range(num_tokens // 20):
        length = int(rng.integers(4, 30))
        src, dst = (int(x) for x in rng.integers(0, max(1, num_tokens - length), 2))
        out[dst:dst + length] = out[src:src + length].copy()
    return out


@pytest.mark.parametrize("vocab,order,threshold", [
    (2, 2, 0.5), (3, 3, 0.8), (4, 4, 0.3), (5, 5, 1.0), (64, 16, 0.8), (8192, 16, 0.8), (3, 6, 0.8)])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 17, 400, 3000])
def test_hints_equal_a_dict_based_sequential_table(vocab, order, threshold, num_tokens):
    tokens = repetitive_stream(num_tokens, vocab, seed=num_tokens + vocab + order)
    hint, has_hint = stream_hints(tokens, order, threshold)
    ref_hint, ref_has = reference_hints(tokens.tolist(), order, threshold)
    assert np.array_equal(has_hint, ref_has) and np.array_equal(hint, ref_hint)
    if num_tokens == 3000 and vocab <= 64:
        assert has_hint.sum() > 10      # the test sees hints fire, not only their absence


def test_hints_take_a_torch_stream_and_a_uint16_array_alike():
    tokens = repetitive_stream(2000, 7, seed=1)
    expected = stream_hints(tokens, 5, 0.8)
    for other in (torch.from_numpy(tokens), tokens.astype(np.uint16)):
        got = stream_hints(other, 5, 0.8)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_hand_stream_gate_and_ties():
    # order 2: the context is the previous token; target p predicts tokens[p+1] from tokens[p].
    # Context "1" (p = 0, 2, 4, 6, 8) is followed by 2, 2, 3, 3, 9: before p = 2, 4, 6, 8 its top is 2
    # with confidence 1/1, 2/2, 2/3, 2/4 (at p = 8 a tie 2:2 with 3, and the incumbent 2 stays).
    # Context "2" (p = 1, 3) and "3" (p = 5, 7) are each followed by 1: confidence 1/1 at p = 3, 7.
    tokens = np.array([1, 2, 1, 2, 1, 3, 1, 3, 1, 9])
    hint, has_hint = stream_hints(tokens, 2, 0.5)
    assert has_hint.tolist() == [False, False, True, True, True, False, True, True, True]
    assert hint.tolist() == [0, 0, 2, 1, 2, 0, 2, 1, 2]
    assert stream_hints(tokens, 2, 0.6)[1].tolist() == [False, False, True, True, True, False, True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_a_hint_never_depends_on_its_target_or_later_tokens(seed):
    tokens = repetitive_stream(3000, 4, seed=seed)
    hint, has_hint = stream_hints(tokens, 4, 0.6)
    rng = np.random.default_rng(seed)
    for t in rng.integers(0, tokens.size - 1, 12):
        changed = tokens.copy()
        changed[t + 1:] = (changed[t + 1:] + 1 + rng.integers(0, 3, changed.size - t - 1)) % 4
        other_hint, other_has = stream_hints(changed, 4, 0.6)
        assert np.array_equal(other_hint[:t + 1], hint[:t + 1])
        assert np.array_equal(other_has[:t + 1], has_hint[:t + 1])
    assert has_hint.sum() > 50


def test_stable_order_packed_and_argsort_paths_agree():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 5000)
    packed = stable_order(keys, 6)          # 6 + 13 index bits: the packed value sort
    fallback = stable_order(keys, 60)       # claims 60 key bits: too wide to pack, a stable argsort
    assert np.array_equal(packed, fallback)
    assert np.array_equal(packed, np.argsort(keys, kind="stable"))


def test_contexts_whose_hashes_share_the_high_bits_stay_apart_in_stream_order():
    # 13 hashes, index bits 4: high bits = h >> 4. Values 0x30 and 0x31 share them but are different
    # contexts; 0x50 repeats; 0x70 is alone.
    h = np.array([0x30, 0x31, 0x50, 0x30, 0x31, 0x31, 0x50, 0x70, 0x30, 0x200, 0x31, 0x201, 0x200],
                 dtype=np.uint64)
    index, group = _group_by_context(h)
    assert np.all(np.diff(group) >= 0)          # each group is one contiguous run
    groups = {}
    for i, g in zip(index.tolist(), group.tolist()):
        groups.setdefault(g, []).append(i)
    # 0x201 shares its high bits with 0x200 and may stay as a group of one (it never gives a hint).
    assert sorted(v for v in groups.values() if len(v) > 1) == [[0, 3, 8], [1, 4, 5, 10], [2, 6], [9, 12]]
    assert 7 not in index


# ------------------------------------------------------------- the tilt itself
def random_case(seed: int, shape=(3, 7), vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=gen)
    hint = torch.randint(0, vocab, shape, generator=gen)
    hint[0, :3] = targets[0, :3]                              # some hits for sure
    has_hint = torch.rand(shape, generator=gen) < 0.7
    return logits, targets, hint, has_hint


@pytest.mark.parametrize("beta", [2.625, 0.5, -1.0, 8.0])
@pytest.mark.parametrize("seed", range(3))
def test_tilted_distribution_is_normalised_and_scores_its_target(beta, seed):
    logits, targets, hint, has_hint = random_case(seed)
    # Reference: p'(a) = p(a)·e^{β[a=h]} / Σ_b p(b)·e^{β[b=h]}, summed explicitly in float64.
    p = torch.softmax(logits, dim=-1)
    boost = torch.full(logits.shape, math.exp(beta), dtype=torch.float64)
    hit = (torch.arange(logits.shape[-1]) == hint[..., None]) & has_hint[..., None]
    weight = torch.where(hit, boost, torch.ones_like(boost))
    ref = p * weight / (p * weight).sum(-1, keepdim=True)
    got = tilted_log_probs(logits, hint, has_hint, beta).exp()
    assert torch.allclose(got.sum(-1), torch.ones(targets.shape, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
    nll = tilted_nll(logits, targets, hint, has_hint, beta)
    assert torch.allclose(nll, -ref.gather(-1, targets[..., None]).squeeze(-1).log(), rtol=1e-12, atol=1e-12)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    assert torch.allclose(nll[~has_hint], plain.view(targets.shape)[~has_hint], rtol=1e-14, atol=0)


def test_a_hit_lowers_and_a_miss_raises_the_nll():
    logits, targets, hint, _ = random_case(5)
    gate = torch.ones_like(targets, dtype=torch.bool)
    plain = tilted_nll(logits, targets, hint, ~gate, 2.625)
    tilted = tilted_nll(logits, targets, hint, gate, 2.625)
    hit = targets == hint
    assert torch.all(tilted[hit] < plain[hit]) and torch.all(tilted[~hit] > plain[~hit])


def test_score_adjust_tilts_by_stream_position_and_never_outside_the_stream():
    logits, targets, _, _ = random_case(6, shape=(2, 5))
    hint = np.array([3, 4, 5, 6, 7, 8])
    has_hint = np.array([True, False, True, True, False, True])
    adjust = make_score_adjust(hint, has_hint, 2.625)
    positions = torch.tensor([[0, 1, 2, 3, 4], [5, 6, -1, 2, 100]])
    got = adjust(logits, targets, positions)
    h = torch.tensor([[3, 4, 5, 6, 7], [8, 0, 0, 5, 0]])
    g = torch.tensor([[True, False, True, True, False], [True, False, False, True, False]])
    assert torch.equal(got, tilted_nll(logits, targets, h, g, 2.625))


@pytest.mark.parametrize("key,value", [("ngram_order", 1), ("ngram_threshold", 0.0),
                                       ("ngram_threshold", 1.5), ("ngram_beta", float("inf"))])
def test_config_errors_name_the_key(key, value):
    from tests.helpers.eval_lm import TTT_SGD
    from pgolf.config import to_dict
    section = {**to_dict(TTT_SGD), key: value}
    with pytest.raises(ParamError, match=f"eval_ttt.{key}"):
        from_params(EvalTTTConfig, {"eval_ttt": section}, "eval_ttt")
    assert NgramTiltConfig().ngram_tilt is False     # off unless asked
