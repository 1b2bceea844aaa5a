"""Sliding-window eval: exact coverage, hand-computed bpb, float64 references."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.eval_lm import (TILT_OFF, ProbeLM, TinyBankLM, decode_probe, make_stream,
                              make_tables)

from pgolf.data.bpb import ByteTables, stream_bytes
from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.eval.sliding import (EvalSlidingConfig, prepare_tokens, score_nonoverlapping,
                                score_sliding_windows)

torch.set_num_threads(1)


def config(seq_len=16, stride=4, batch_windows=3, trim=False, compile=False) -> EvalSlidingConfig:
    return EvalSlidingConfig(seq_len=seq_len, stride=stride, batch_windows=batch_windows,
                         trim_to_seq_len=trim, compile=compile)


class UniformLM(nn.Module):
    """Predicts every id with probability 1/V: NLL = ln V (in fp32) everywhere."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def token_nll(self, ids, targets):
        return torch.full(targets.shape, math.log(self.vocab_size), dtype=torch.float32)


# Hand-built byte table (V = 8): ids 0, 1 are boundary tokens worth 0 bytes.
HAND_TABLES = ByteTables(np.array([0, 0, 1, 2, 3, 1, 2, 4], dtype=np.int16),
                         np.array([0, 0, 0, 1, 0, 1, 0, 1], dtype=bool),
                         np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool))
HAND_STREAM = [1, 3, 4, 5, 1, 5, 7, 2, 3, 6, 1, 3]
# Bytes per target (prev -> target): 1->3: 2 (space after BOS not counted), 3->4: 3,
# 4->5: 1+1, 5->1: 0, 1->5: 1, 5->7: 4+1, 7->2: 1, 2->3: 2+1, 3->6: 2, 6->1: 0, 1->3: 2.
HAND_BYTES_ALL = 21          # 11 targets
HAND_BYTES_TRIMMED = 17      # trimmed to seq_len 4: the first 8 targets


@pytest.mark.parametrize("seq_len,stride,batch,trim", [
    (4, 1, 1, False), (4, 2, 3, False), (4, 4, 2, False), (16, 3, 5, False),   # 16 > stream
    (4, 1, 1, True), (4, 2, 3, True), (4, 4, 2, True)])
def test_uniform_model_bpb_equals_hand_computation(seq_len, stride, batch, trim):
    cfg = config(seq_len, stride, batch, trim)
    tokens = prepare_tokens(np.array(HAND_STREAM, dtype=np.uint16), seq_len, trim,
                            torch.device("cpu"), "hand")
    targets, nbytes = (8, HAND_BYTES_TRIMMED) if trim else (11, HAND_BYTES_ALL)
    result = score_sliding_windows(UniformLM(8), tokens, HAND_TABLES, cfg)
    assert result.sums.scored_tokens == targets and result.sums.byte_sum == nbytes
    # ln 8 / ln 2 = 3 bits per token; fp32 rounding of ln 8 is the only error.
    assert result.sums.val_bpb == pytest.approx(targets * 3 / nbytes, rel=1e-7)
    ln_v = float(np.float32(math.log(8)))
    assert result.sums.val_bpb == pytest.approx(targets * ln_v / math.log(2) / nbytes, rel=1e-12)
    assert result.sums.val_loss == pytest.approx(ln_v, rel=1e-12)


def probe_check(tokens: torch.Tensor, seq_len: int, stride: int, score, min_context) -> None:
    """Score with ProbeLM and check what each scored target was fed."""
    counts = np.zeros(tokens.numel() - 1, dtype=np.int64)
    seen = []

    def observer(positions, context, nll):
        np.add.at(counts, positions.numpy(), 1)
        seen.append((positions, context, nll))

    result = score(ProbeLM(16, seq_len), tokens, make_tables(16), observer)
    assert np.array_equal(counts, np.ones_like(counts))
    assert result.sums.scored_tokens == counts.size
    for positions, context, nll in seen:
        inputs, targets, columns = decode_probe(nll, 16, seq_len)
        assert torch.equal(inputs, tokens[positions]) and torch.equal(targets, tokens[positions + 1])
        assert torch.equal(columns, context)
        assert torch.all(context >= min_context(positions))


@pytest.mark.parametrize("num_tokens", [2, 9, 16, 17, 18, 33, 50, 101])
@pytest.mark.parametrize("seq_len,stride,batch", [(16, 4, 3), (16, 5, 1), (8, 8, 4)])
def test_sliding_feeds_each_target_once_with_right_ids_and_context(num_tokens, seq_len, stride, batch):
    tokens = make_stream(num_tokens, 16, seed=num_tokens)
    cfg = config(seq_len, stride, batch)
    probe_check(tokens, seq_len, stride,
                lambda m, t, tb, obs: score_sliding_windows(m, t, tb, cfg, observer=obs),
                lambda p: torch.clamp(p, max=seq_len - stride))


@pytest.mark.parametrize("num_tokens", [2, 16, 17, 40])
def test_nonoverlapping_feeds_each_target_once_from_its_sequence_start(num_tokens):
    tokens = make_stream(num_tokens, 16, seed=num_tokens)
    cfg = config(8, 8, 2)
    probe_check(tokens, 8, 8, lambda m, t, tb, obs: score_nonoverlapping(m, t, tb, cfg, observer=obs),
                lambda p: p % 8)


def reference_sums(model: nn.Module, tokens: torch.Tensor, tables: ByteTables, starts, lengths):
    """float64: score each [start, start+length) span alone, every target in it."""
    model = model.double()
    nll = 0.0
    with torch.no_grad():
        for s, n in zip(starts, lengths):
            ids, targets = tokens[None, s:s + n], tokens[None, s + 1:s + n + 1]
            nll += float(model.token_nll(ids, targets).sum())
    return nll, stream_bytes(tables, tokens.numpy())


@pytest.mark.parametrize("num_tokens", [40, 101])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sliding_equals_one_float64_pass_for_a_short_memory_model(num_tokens, dtype):
    # The model sees at most 3 tokens back, less than seq_len - stride: every
    # sliding score must equal the full-stream score.
    tokens = make_stream(num_tokens, 16, seed=3)
    tables = make_tables(16)
    model = TinyBankLM(16, full_context=False, seed=4).to(dtype)
    result = score_sliding_windows(model, tokens, tables, config(16, 5, 3))
    ref_nll, ref_bytes = reference_sums(TinyBankLM(16, full_context=False, seed=4), tokens, tables,
                                        [0], [num_tokens - 1])
    assert result.sums.byte_sum == ref_bytes and result.sums.scored_tokens == num_tokens - 1
    assert result.sums.nll_sum == pytest.approx(ref_nll, rel=1e-12 if dtype == torch.float64 else 1e-5)


def test_nonoverlapping_equals_per_sequence_float64_reference():
    tokens = make_stream(45, 16, seed=5)    # 44 targets: 16 + 16 + 12
    tables = make_tables(16)
    result = score_nonoverlapping(TinyBankLM(16, seed=6).double(), tokens, tables, config(16, 16, 2))
    ref_nll, ref_bytes = reference_sums(TinyBankLM(16, seed=6), tokens, tables, [0, 16, 32], [16, 16, 12])
    assert result.sums.byte_sum == ref_bytes
    assert result.sums.nll_sum == pytest.approx(ref_nll, rel=1e-12)


def test_batch_size_and_rank_shares_do_not_change_the_sums():
    tokens = make_stream(203, 16, seed=7)
    tables = make_tables(16)
    model = TinyBankLM(16, seed=8)
    base = score_sliding_windows(model, tokens, tables, config(16, 4, 1)).sums
    for batch in (2, 5, 64):
        sums = score_sliding_windows(model, tokens, tables, config(16, 4, batch)).sums
        assert (sums.scored_tokens, sums.byte_sum) == (base.scored_tokens, base.byte_sum)
        assert sums.nll_sum == pytest.approx(base.nll_sum, rel=1e-12)
    # Without a process group each rank's share is scored alone; the shares add up.
    world = 3
    shares = [score_sliding_windows(model, tokens, tables, config(16, 4, 2), rank=r, world_size=world).sums
              for r in range(world)]
    assert sum(s.scored_tokens for s in shares) == base.scored_tokens
    assert sum(s.byte_sum for s in shares) == base.byte_sum
    assert sum(s.nll_sum for s in shares) == pytest.approx(base.nll_sum, rel=1e-12)


def test_result_reports_throughput_and_window_count():
    tokens = make_stream(101, 16, seed=9)
    result = score_sliding_windows(TinyBankLM(16), tokens, make_tables(16), config(16, 4, 3))
    assert result.windows == (100 - 16) // 4 + 1
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(100 / result.seconds)


def test_warmup_batch_is_discarded_and_timed_apart():
    tokens = make_stream(101, 16, seed=9)
    plain = score_sliding_windows(TinyBankLM(16), tokens, make_tables(16), config(16, 4, 3))
    counts = np.zeros(100, dtype=np.int64)

    def observer(positions, context, nll):
        np.add.at(counts, positions.numpy(), 1)

    warmed = score_sliding_windows(TinyBankLM(16), tokens, make_tables(16), config(16, 4, 3),
                                   observer=observer, warmup=True)
    assert np.array_equal(counts, np.ones_like(counts))  # the warm-up batch is not observed
    assert warmed.sums == plain.sums and warmed.windows == plain.windows
    assert warmed.compile_seconds > 0 and plain.compile_seconds == 0


def test_prepare_tokens_trims_to_whole_sequences():
    stream = np.arange(40, dtype=np.uint16)
    assert prepare_tokens(stream, 16, True, torch.device("cpu"), "val").numel() == 33
    assert prepare_tokens(stream, 16, False, torch.device("cpu"), "val").numel() == 40


@pytest.mark.parametrize("key,value", [("stride", 0), ("stride", 17), ("batch_windows", 0), ("seq_len", 0)])
def test_config_range_errors_name_the_key(key, value):
    section = {"seq_len": 16, "stride": 4, "batch_windows": 2, "trim_to_seq_len": True, "compile": True,
               **TILT_OFF}
    section[key] = value
    with pytest.raises(ParamError, match=f"eval_sliding.{key}"):
        from_params(EvalSlidingConfig, {"eval_sliding": section}, "eval_sliding")


@pytest.mark.gpu
def test_cuda_bf16_compiled_scoring_is_close_to_cpu_fp32():
    tokens = make_stream(301, 16, seed=10)
    tables = make_tables(16)
    cpu = score_sliding_windows(TinyBankLM(16, seed=11), tokens, tables, config(32, 8, 4)).sums
    gpu = score_sliding_windows(TinyBankLM(16, seed=11).cuda(), tokens.cuda(), tables,
                                config(32, 8, 4, compile=True)).sums
    assert (gpu.scored_tokens, gpu.byte_sum) == (cpu.scored_tokens, cpu.byte_sum)
    assert gpu.nll_sum == pytest.approx(cpu.nll_sum, rel=2e-2)


# ---------------------------------------------------------------- the stage
EVAL_PARAMS = {"launch": {"nproc_per_node": 1, "device": "cpu"},
               "eval_sliding": {"seq_len": 32, "stride": 8, "batch_windows": 16, "trim_to_seq_len": True,
                                "compile": True, **TILT_OFF}}   # compile is ignored on CPU


@pytest.fixture(scope="module")
def eval_root(tiny_data, tmp_path_factory):
    from tests.helpers import TINY_TRAIN_PARAMS
    from tests.helpers.models import write_eval_root

    root = tmp_path_factory.mktemp("eval_sliding")
    return root, write_eval_root(root, tiny_data, TINY_TRAIN_PARAMS["model"])


@pytest.mark.slow
def test_stage_scores_the_artifact_on_the_trimmed_val_split(eval_root, capsys):
    import json

    import stages.eval_sliding as stage
    from pgolf.data.bpb import build_byte_tables
    from pgolf.data.shards import load_split

    root, model = eval_root
    metrics = stage.run(EVAL_PARAMS, root)
    assert json.loads((root / "artifacts/eval_sliding/metrics.json").read_text()) == metrics
    stream = load_split(root / "data/shards", "val")
    targets = (stream.size - 1) // 32 * 32
    tables = build_byte_tables(root / "data/tokenizer/tokenizer.model", 512)
    assert metrics["scored_tokens"] == targets
    assert metrics["bytes"] == stream_bytes(tables, stream[:targets + 1])
    tokens = torch.from_numpy(stream[:targets + 1].astype(np.int64))
    cfg = config(32, 8, 16, trim=True)
    assert metrics["val_bpb"] == score_sliding_windows(model, tokens, tables, cfg).sums.val_bpb
    assert metrics["nonoverlap_val_bpb"] == score_nonoverlapping(model, tokens, tables, cfg).sums.val_bpb
    assert metrics["val_loss"] == pytest.approx(metrics["val_bpb"] * math.log(2) * metrics["bytes"] / targets)
    assert metrics["seconds"] > 0 and metrics["tokens_per_s"] > 0 and metrics["world_size"] == 1
    assert metrics["size_warning"] is True and "size unknown" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_stays_quiet_when_the_size_check_passed(eval_root, capsys):
    import json

    import stages.eval_sliding as stage

    root, _ = eval_root
    size = {"fits": True, "total_bytes": 100, "limit": 16_000_000}
    (root / "artifacts/size.json").write_text(json.dumps(size))
    try:
        assert stage.run(EVAL_PARAMS, root)["size_warning"] is False
    finally:
        (root / "artifacts/size.json").unlink()
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_stage_without_an_artifact_prints_one_error_line_and_exits_1(tmp_path):
    import subprocess

    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(EVAL_PARAMS))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "stages.eval_sliding"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: artifacts/quant/model.ptz: quantised artifact not found"]
