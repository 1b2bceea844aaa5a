"""Score-first TTT: coverage, no leakage, lr 0 == sliding, freezing, and a float64 SGD reference."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.helpers.eval_lm import TILT_OFF, ProbeLM, TinyBankLM, decode_probe, make_stream, make_tables

from pgolf.config import from_params, to_dict
from pgolf.errors import ParamError
from pgolf.eval.sliding import EvalSlidingConfig, score_sliding_windows
from pgolf.eval.frozen_blocks import block_count
from pgolf.eval.ttt import EvalTTTConfig, chunk_lr, run_ttt
from pgolf.eval.windows import chunk_sequences, num_chunks

torch.set_num_threads(1)
VOCAB = 16
WINDOWS = EvalSlidingConfig(seq_len=16, stride=4, batch_windows=3, trim_to_seq_len=False, compile=False)
SGD = EvalTTTConfig(chunk_tokens=40, epochs=2, optimizer="sgd", lr=0.1, lr_schedule="cosine", momentum=0.9,
                beta2=0.999, weight_decay=0.0, freeze_blocks=0, grad_clip=1.0, batch_seqs=2)
ADAMW = dataclasses.replace(SGD, optimizer="adamw", lr=0.02, weight_decay=0.1, lr_schedule="constant")


def per_position_scores(model, tokens, cfg, windows=WINDOWS) -> tuple[np.ndarray, object]:
    scores = np.full(tokens.numel() - 1, np.nan)
    counts = np.zeros(tokens.numel() - 1, dtype=np.int64)

    def observer(positions, context, nll):
        scores[positions.numpy()] = nll.double().numpy()
        np.add.at(counts, positions.numpy(), 1)

    result = run_ttt(model, tokens, make_tables(VOCAB), windows, cfg, observer=observer)
    assert np.array_equal(counts, np.ones_like(counts))
    return scores, result


@pytest.mark.parametrize("num_tokens", [2, 12, 17, 40, 41, 42, 97, 150])
@pytest.mark.parametrize("chunk,stride", [(40, 4), (7, 4), (16, 16), (50, 3)])
def test_every_target_scored_once_with_right_ids_and_context(num_tokens, chunk, stride):
    tokens = make_stream(num_tokens, VOCAB, seed=num_tokens)
    windows = dataclasses.replace(WINDOWS, stride=stride)
    counts = np.zeros(num_tokens - 1, dtype=np.int64)
    checks = []

    def observer(positions, context, nll):
        np.add.at(counts, positions.numpy(), 1)
        checks.append((positions, context, nll))

    cfg = dataclasses.replace(SGD, chunk_tokens=chunk)
    result = run_ttt(ProbeLM(VOCAB, 16), tokens, make_tables(VOCAB), windows, cfg, observer=observer)
    assert np.array_equal(counts, np.ones_like(counts)) and result.sums.scored_tokens == num_tokens - 1
    for positions, context, nll in checks:
        inputs, targets, columns = decode_probe(nll, VOCAB, 16)
        assert torch.equal(inputs, tokens[positions]) and torch.equal(targets, tokens[positions + 1])
        assert torch.equal(columns, context)
        assert torch.all(context >= torch.clamp(positions, max=16 - stride))


def changed_after(tokens: torch.Tensor, first: int) -> torch.Tensor:
    """``tokens`` with every id from index ``first`` on replaced by a different one."""
    changed = tokens.clone()
    changed[first:] = (changed[first:] + 1 + torch.arange(changed.numel() - first) % 5) % VOCAB
    return changed


@pytest.mark.parametrize("cfg", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_changing_tokens_after_a_chunk_leaves_its_scores_bit_identical(cfg):
    tokens = make_stream(161, VOCAB, seed=1)        # 160 targets: chunks of 40
    base, _ = per_position_scores(TinyBankLM(VOCAB, seed=2), tokens, cfg)
    for chunk in range(3):
        end = (chunk + 1) * cfg.chunk_tokens        # targets of chunks <= c are tokens[1 : end + 1]
        scores, _ = per_position_scores(TinyBankLM(VOCAB, seed=2), changed_after(tokens, end + 1), cfg)
        assert np.array_equal(scores[:end], base[:end])
        assert not np.array_equal(scores[end:], base[end:])     # the change was seen later on


@pytest.mark.parametrize("cfg", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_each_score_depends_only_on_tokens_up_to_its_target(cfg):
    # Stronger than per chunk: also inside a chunk, so training on a chunk
    # before scoring it (which the chunk-level check cannot see) is caught.
    tokens = make_stream(161, VOCAB, seed=11)
    base, _ = per_position_scores(TinyBankLM(VOCAB, seed=12), tokens, cfg)
    for p in (10, 45, 57, 99, 130):
        scores, _ = per_position_scores(TinyBankLM(VOCAB, seed=12), changed_after(tokens, p + 2), cfg)
        assert np.array_equal(scores[:p + 1], base[:p + 1]), p
        assert scores[p + 1] != base[p + 1]


@pytest.mark.parametrize("cfg", [dataclasses.replace(SGD, lr=0.0, weight_decay=0.1),
                                 dataclasses.replace(ADAMW, lr=0.0)], ids=["sgd", "adamw"])
def test_learning_rate_zero_equals_sliding_eval(cfg):
    tokens = make_stream(150, VOCAB, seed=3)
    model = TinyBankLM(VOCAB, seed=4)
    before = copy.deepcopy(model.state_dict())
    sliding_scores = np.full(149, np.nan)

    def observer(positions, context, nll):
        sliding_scores[positions.numpy()] = nll.double().numpy()

    sliding = score_sliding_windows(model, tokens, make_tables(VOCAB), WINDOWS, observer=observer).sums
    scores, result = per_position_scores(model, tokens, cfg)
    assert result.train_steps > 0
    assert np.array_equal(scores, sliding_scores)
    assert (result.sums.scored_tokens, result.sums.byte_sum) == (sliding.scored_tokens, sliding.byte_sum)
    assert result.sums.nll_sum == pytest.approx(sliding.nll_sum, rel=1e-12, abs=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cfg", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_warmup_changes_no_score_weight_or_count(cfg):
    tokens = make_stream(150, VOCAB, seed=4)
    torch.manual_seed(0)
    model = TinyBankLM(VOCAB)
    twin = copy.deepcopy(model)
    plain_scores, plain = per_position_scores(model, tokens, cfg)
    counts = np.zeros(tokens.numel() - 1, dtype=np.int64)
    scores = np.full(tokens.numel() - 1, np.nan)

    def observer(positions, context, nll):
        scores[positions.numpy()] = nll.double().numpy()
        np.add.at(counts, positions.numpy(), 1)

    warmed = run_ttt(twin, tokens, make_tables(VOCAB), WINDOWS, cfg, observer=observer, warmup=True)
    assert np.array_equal(counts, np.ones_like(counts))
    assert np.array_equal(scores, plain_scores) and warmed.sums == plain.sums
    assert warmed.train_steps == plain.train_steps and warmed.compile_seconds > 0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_training_changes_later_scores_and_helps_on_repetitive_text():
    pattern = make_stream(24, VOCAB, seed=5)
    tokens = pattern.repeat(10)[:201]
    sliding = score_sliding_windows(TinyBankLM(VOCAB, seed=6), tokens, make_tables(VOCAB), WINDOWS).sums
    result = run_ttt(TinyBankLM(VOCAB, seed=6), tokens, make_tables(VOCAB), WINDOWS, SGD)
    assert result.sums.val_bpb < 0.9 * sliding.val_bpb
    assert result.chunks[-1]["running_bpb"] == pytest.approx(result.sums.val_bpb, rel=1e-12)
    assert result.chunks[0]["chunk_bpb"] == result.chunks[0]["running_bpb"]
    assert [c["chunk"] for c in result.chunks] == list(range(5))


@pytest.mark.parametrize("cfg", [dataclasses.replace(SGD, weight_decay=0.05),
                                 dataclasses.replace(ADAMW, weight_decay=0.5)], ids=["sgd", "adamw"])
def test_frozen_blocks_and_bank_slices_do_not_move(cfg):
    model = TinyBankLM(VOCAB, num_layers=3, seed=7)
    before = copy.deepcopy(model.state_dict())
    run_ttt(model, make_stream(150, VOCAB, seed=8), make_tables(VOCAB), WINDOWS,
            dataclasses.replace(cfg, freeze_blocks=2))
    after = model.state_dict()
    frozen_pair_rows, frozen_mlp_rows = [0, 1, 3, 4], [0, 1]      # L = 3: slices [i] and [L + i]
    assert torch.equal(after["pair_bank"][frozen_pair_rows], before["pair_bank"][frozen_pair_rows])
    assert torch.equal(after["mlp_bank"][frozen_mlp_rows], before["mlp_bank"][frozen_mlp_rows])
    assert torch.equal(after["blocks.0.gain"], before["blocks.0.gain"])
    assert torch.equal(after["blocks.1.gain"], before["blocks.1.gain"])
    for name, rows in (("pair_bank", [2, 5]), ("mlp_bank", [2])):
        assert not torch.equal(after[name][rows], before[name][rows])
    assert not torch.equal(after["blocks.2.gain"], before["blocks.2.gain"])
    assert not torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])
    assert all(p.requires_grad for p in model.parameters())


def test_freezing_more_blocks_than_the_model_has_is_a_param_error():
    model = TinyBankLM(VOCAB, num_layers=2)
    assert block_count(model) == 2
    with pytest.raises(ParamError, match="eval_ttt.freeze_blocks"):
        run_ttt(model, make_stream(50, VOCAB, seed=0), make_tables(VOCAB), WINDOWS,
                dataclasses.replace(SGD, freeze_blocks=3))


def test_cosine_schedule_by_hand():
    lrs = [chunk_lr(SGD, c, 5) for c in range(5)]
    assert lrs == pytest.approx([0.1, 0.1 * (1 + math.sqrt(0.5)) / 2, 0.05,
                                 0.1 * (1 - math.sqrt(0.5)) / 2, 0.0], abs=1e-15)
    assert chunk_lr(SGD, 0, 1) == 0.1
    assert chunk_lr(dataclasses.replace(SGD, lr_schedule="constant"), 3, 5) == 0.1


def reference_sgd(model, tokens, windows: EvalSlidingConfig, cfg: EvalTTTConfig, trained_chunks: int):
    """float64 SGD with momentum and global-norm clipping, written out by hand.

    Freezing block i zeroes the gradient of ``blocks.i.*`` and of bank rows
    i (and L + i for ``pair_bank``) before clipping.
    """
    layers = len(model.blocks)
    frozen_rows = {"pair_bank": [r for i in range(cfg.freeze_blocks) for r in (i, layers + i)],
                   "mlp_bank": list(range(cfg.freeze_blocks))}
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    targets = tokens.numel() - 1
    chunks = num_chunks(targets, cfg.chunk_tokens)
    for c in range(trained_chunks):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * c / (chunks - 1)))
        starts, lengths = chunk_sequences(c, cfg.chunk_tokens, targets, windows.seq_len)
        for _ in range(cfg.epochs):
            for a in range(0, len(starts), cfg.batch_seqs):
                batch = list(zip(starts[a:a + cfg.batch_seqs], lengths[a:a + cfg.batch_seqs]))
                for p in params:
                    p.grad = None
                total = sum(n for _, n in batch)
                loss = sum(model.token_nll(tokens[None, s:s + n], tokens[None, s + 1:s + n + 1]).sum()
                           for s, n in batch) / total
                loss.backward()
                for name, p in zip(names, params):
                    if name in frozen_rows:
                        p.grad[frozen_rows[name]] = 0
                    elif name.startswith("blocks.") and int(name.split(".")[1]) < cfg.freeze_blocks:
                        p.grad.zero_()
                norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
                scale = min(1.0, cfg.grad_clip / (norm + 1e-6))
                with torch.no_grad():
                    for p, buf in zip(params, momentum):
                        buf.mul_(cfg.momentum).add_(p.grad * scale)
                        p.sub_(lr * buf)


@pytest.mark.parametrize("freeze", [0, 1])
def test_sgd_training_matches_a_hand_written_float64_reference(freeze):
    tokens = make_stream(118, VOCAB, seed=9)          # 117 targets: chunks 40, 40, 37
    # 3 sequences per chunk: steps of 2 + 1; a clip that binds.
    cfg = dataclasses.replace(SGD, grad_clip=0.3, batch_seqs=2, freeze_blocks=freeze)
    model = TinyBankLM(VOCAB, seed=10).double()
    reference = copy.deepcopy(model)
    run_ttt(model, tokens, make_tables(VOCAB), WINDOWS, cfg)
    reference_sgd(reference, tokens, WINDOWS, cfg, trained_chunks=2)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
    assert not torch.equal(model.tok_emb.weight, TinyBankLM(VOCAB, seed=10).double().tok_emb.weight)


@pytest.mark.parametrize("key,value", [("chunk_tokens", 0), ("epochs", -1), ("lr", -0.1),
                                       ("momentum", 1.0), ("batch_seqs", 0), ("optimizer", "adam")])
def test_config_errors_name_the_key(key, value):
    section = to_dict(SGD)
    section[key] = value
    with pytest.raises(ParamError, match=f"eval_ttt.{key}"):
        from_params(EvalTTTConfig, {"eval_ttt": section}, "eval_ttt")


@pytest.mark.gpu
def test_cuda_compiled_ttt_scores_with_its_updated_weights():
    # If the compiled graph baked the weights in, TTT would score like eval_sliding.
    from tests.helpers import TINY_TRAIN_PARAMS
    from pgolf.model.gpt import GPT, ModelConfig

    cfg = from_params(ModelConfig, TINY_TRAIN_PARAMS, "model")
    tokens = make_stream(24, cfg.vocab_size, seed=13).repeat(40).cuda()
    tables = make_tables(cfg.vocab_size)
    windows = dataclasses.replace(WINDOWS, seq_len=32, stride=8)
    ttt = dataclasses.replace(SGD, chunk_tokens=128, lr=0.05, epochs=1)

    def model():
        torch.manual_seed(0)
        return GPT(cfg).cuda()

    frozen = score_sliding_windows(model(), tokens, tables, dataclasses.replace(windows, compile=True)).sums
    eager = run_ttt(model(), tokens, tables, windows, ttt).sums
    compiled = run_ttt(model(), tokens, tables, dataclasses.replace(windows, compile=True), ttt).sums
    assert eager.val_bpb < 0.9 * frozen.val_bpb
    assert compiled.val_bpb == pytest.approx(eager.val_bpb, rel=2e-2)


# ---------------------------------------------------------------- the stage
STAGE_PARAMS = {"launch": {"nproc_per_node": 1, "device": "cpu"},
                "eval_sliding": {"seq_len": 32, "stride": 8, "batch_windows": 16, "trim_to_seq_len": True,
                                 "compile": False, **TILT_OFF},
                "eval_ttt": {**to_dict(SGD),
                             "chunk_tokens": 4096, "epochs": 1, "batch_seqs": 32, "lr": 0.002,
                             "freeze_blocks": 1}}


@pytest.fixture(scope="module")
def ttt_root(tiny_data, tmp_path_factory):
    import stages.eval_sliding
    from tests.helpers import TINY_TRAIN_PARAMS
    from tests.helpers.models import write_eval_root

    root = tmp_path_factory.mktemp("eval_ttt")
    write_eval_root(root, tiny_data, TINY_TRAIN_PARAMS["model"])
    return root, stages.eval_sliding.run(STAGE_PARAMS, root)


@pytest.mark.slow
def test_stage_with_lr_zero_reproduces_eval_sliding(ttt_root):
    import json

    import stages.eval_ttt as stage

    root, sliding = ttt_root
    params = {**STAGE_PARAMS, "eval_ttt": {**STAGE_PARAMS["eval_ttt"], "lr": 0.0}}
    metrics = stage.run(params, root)
    assert json.loads((root / "artifacts/eval_ttt/metrics.json").read_text()) == metrics
    for key in ("scored_tokens", "bytes", "windows"):
        assert metrics[key] == sliding[key]
    assert metrics["val_bpb"] == pytest.approx(sliding["val_bpb"], rel=1e-12)
    assert abs(metrics["gain_vs_sliding"]) < 1e-12 and metrics["sliding_val_bpb"] == sliding["val_bpb"]
    assert metrics["chunks"] == -(-sliding["scored_tokens"] // 4096) and metrics["train_steps"] > 0
    series = json.loads((root / "artifacts/eval_ttt/chunks.json").read_text())
    assert [row["chunk"] for row in series] == list(range(metrics["chunks"]))
    assert series[-1]["running_bpb"] == pytest.approx(metrics["val_bpb"], rel=1e-12)


@pytest.mark.slow
def test_stage_trains_and_reports_the_gain(ttt_root):
    import stages.eval_ttt as stage

    root, sliding = ttt_root
    metrics = stage.run(STAGE_PARAMS, root)
    assert metrics["val_bpb"] != sliding["val_bpb"]
    assert metrics["gain_vs_sliding"] == pytest.approx(sliding["val_bpb"] - metrics["val_bpb"], abs=1e-15)


def test_stage_needs_the_sliding_metrics(tmp_path):
    import stages.eval_ttt as stage
    from pgolf.errors import DataError

    with pytest.raises(DataError, match="artifacts/eval_sliding/metrics.json: cannot read val_bpb"):
        stage.run(STAGE_PARAMS, tmp_path)
