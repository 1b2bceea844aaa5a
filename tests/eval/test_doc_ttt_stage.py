"""The eval_ttt stage with ``mode: doc_lora`` end to end, and the throughput bench's CPU smoke run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pgolf.config import to_dict
from tests.helpers import REPO
from tests.helpers.doc_ttt_ref import doc_config
from tests.helpers.eval_lm import TILT_OFF

STAGE_PARAMS = {"launch": {"nproc_per_node": 1, "device": "cpu"},
                "eval_sliding": {"seq_len": 32, "stride": 8, "batch_windows": 16, "trim_to_seq_len": True,
                                 "compile": False, **TILT_OFF},
                "eval_ttt": {**to_dict(doc_config(chunk_tokens=16, batch_docs=1, lora_rank=4, lora_alpha=8.0,
                                                  prefix_docs=1, phases=1, global_chunk_tokens=256)),
                             "lr": 0.001}}
# A short context and a low gate so that the tiny val split has hints to tilt by.
TILT_ON = {"ngram_tilt": True, "ngram_order": 3, "ngram_threshold": 0.5, "ngram_beta": 2.625}


@pytest.mark.slow
@pytest.mark.parametrize("tilt", [False, True], ids=["untilted", "tilted"])
def test_doc_lora_stage_scores_every_target_once(tiny_data, tmp_path, tilt):
    import stages.eval_sliding
    import stages.eval_ttt
    from tests.helpers import TINY_TRAIN_PARAMS
    from tests.helpers.models import write_eval_root

    from pgolf.data.shards import read_shard, write_shard

    # The tiny run's val split cut to its first 2,000 tokens (the whole split takes minutes on a CPU).
    (tmp_path / "data/shards").mkdir(parents=True)
    for shard in (tiny_data / "data/shards").iterdir():
        (tmp_path / "data/shards" / shard.name).symlink_to(shard)
    val = tmp_path / "data/shards/val_000000.bin"
    tokens = read_shard(val)[:2000]
    val.unlink()
    write_shard(val, tokens)
    write_eval_root(tmp_path, tiny_data, TINY_TRAIN_PARAMS["model"])
    params = {**STAGE_PARAMS, "eval_ttt": {**STAGE_PARAMS["eval_ttt"], **(TILT_ON if tilt else {})}}
    sliding = stages.eval_sliding.run(params, tmp_path)
    metrics = stages.eval_ttt.run(params, tmp_path)
    # the doc_lora pass tilts its scores through the same stream hints as the sliding eval would
    assert ("ngram_gated" in metrics) == tilt and (not tilt or metrics["ngram_gated"] > 0)
    assert json.loads((tmp_path / "artifacts/eval_ttt/metrics.json").read_text()) == metrics
    # the same targets and bytes as the sliding eval, each scored once
    assert (metrics["scored_tokens"], metrics["bytes"]) == (sliding["scored_tokens"], sliding["bytes"])
    assert metrics["scored_tokens"] == 1984 and metrics["documents"] >= 2
    assert metrics["phases_done"] == 1 and metrics["lora_steps"] > 0
    assert metrics["gain_vs_sliding"] == pytest.approx(sliding["val_bpb"] - metrics["val_bpb"], abs=1e-15)
    assert metrics["timer_seconds"] == pytest.approx(metrics["seconds"], abs=1e-3)
    series = json.loads((tmp_path / "artifacts/eval_ttt/chunks.json").read_text())
    assert series[-1]["running_bpb"] == pytest.approx(metrics["val_bpb"], rel=1e-12)


@pytest.mark.slow
def test_throughput_bench_runs_on_a_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/doc_ttt_throughput.py"), str(out), "--profile",
                           "cpu_tiny", "--device", "cpu", "--docs", "24", "--mean-doc", "40", "--sgd-chunks", "1",
                           "--world", "2", "--sample-stride", "2", "--set", "batch_docs=4", "lora_rank=4", "global_chunk_tokens=4096"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "doc ttt batches: 2/2 batches" in proc.stdout   # progress lines before the end (a time limit keeps them)
    result = json.loads(out.read_text())
    assert result["rank0_targets"] > 0 and result["per_gpu_tokens_per_s"] > 0
    assert result["sample_stride"] == 2 and result["sampled_batches"] == 2  # 6 batches, every 4th
    assert result["projected_8gpu_seconds_with_phases"] > result["projected_8gpu_seconds_no_phases"]


@pytest.mark.slow
def test_trace_bench_counts_one_dynamic_graph_on_a_cpu():
    proc = subprocess.run([sys.executable, str(REPO / "bench/doc_ttt_trace.py"), "--params-profile", "cpu_frontier",
                           "--width-step", "0", "--seq-len", "32", "--rows", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chunk forward + backward: 1 dynamic (rows, width) graph(s)" in proc.stdout
    assert "RowAdamW.step_rows over" in proc.stdout
