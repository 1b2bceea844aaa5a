"""Throughput of per-document LoRA TTT (eval_ttt.mode doc_lora) and its projected 8-GPU eval time.

    python bench/doc_ttt_throughput.py OUT.json                     # f1855 profile on CUDA
    python bench/doc_ttt_throughput.py OUT.json --profile cpu_tiny  # CPU smoke test
    python bench/doc_ttt_throughput.py OUT.json --docs 50000 --sample-stride 12 --set compile=false  # eager
    python bench/doc_ttt_throughput.py OUT.json --docs 50000 --sample-stride 12 --set compile_width_step=256

Model and settings come from a params profile (``--params-profile``, default
f1855: conf/profile/f1855.yaml's model, eval_sliding.seq_len and eval_ttt),
randomly initialised (speed does not depend on the weights). Documents are
synthetic: BOS + random ids, lengths drawn log-normally with the challenge's
mean (47,851,520 targets / 50,000 documents ≈ 957) and a long tail, so the
batches mix short documents with window-capped long ones as the real val
set does.

One process measures a systematic sample of the work of rank 0 of
``--world`` ranks (default 8): with ``--sample-stride K`` it runs as rank 0
of ``world × K`` ranks, so it scores every (world·K)-th batch of the run
order (longest first), exactly as under torchrun but with no process group
(the final all-reduce is a no-op). The batches are sorted by length, so the
sample spans the whole length range, from the longest batch down (K = 1 is
rank 0's full share; with few ``--docs`` rank 0's share is dominated by the
longest batch and overstates the cost per target). Per-GPU throughput is the
sample's scored targets per second; the projected LoRA-TTT time is
``47,851,520 / (world × per-GPU tok/s)``. Global SGD is timed on rank 0's
share of ``--sgd-chunks`` 32,768-token chunks (2 of 16 sequences at world 8)
after one untimed warm-up chunk, and projected for the phase chunk counts of
F1855's seed-42 log (131 / 219 / 289, ``--phase-chunks``); its gradient
all-reduce is not modelled. The eval timer of the records covers both
parts (docs/FRONTIER.md §5.5); their 8×H100 times were 455–509 s (F1855).

``eval_ttt.compile`` (on in f1855; ``--set compile=false`` for eager, ``--set
compile_width_step=0`` for one dynamic-width graph) compiles the chunk forward
and global SGD's forward (pgolf/eval/lora_forward.py): their warm-up
(``compile_seconds``, ``global_sgd_compile_seconds``: token-0 inputs, no
validation data) is reported apart and is not in the timed figures, which
are ``run_doc_ttt``'s own timer. Eager, one discarded batch warms up first.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

from pgolf.config import from_params  # noqa: E402
from pgolf.data.bpb import SidecarBytes  # noqa: E402
from pgolf.distributed import resolve_device  # noqa: E402
from pgolf.eval.doc_ttt import run_doc_ttt  # noqa: E402
from pgolf.eval.global_sgd import GlobalSGDSettings, global_sgd, global_sgd_forward, warm_up_global_sgd  # noqa: E402
from pgolf.eval.ttt import EvalTTTConfig  # noqa: E402
from pgolf.model.gpt import GPT, ModelConfig  # noqa: E402
from pgolf.precision import compile_enabled, configure_backends  # noqa: E402
from pgolf.progress import StageLog  # noqa: E402
from pgolf.tools.profiles import compose  # noqa: E402

CHALLENGE_TARGETS = 47_851_520   # CaseOps val targets trimmed to 2048 (docs/FRONTIER.md §1.1)
CHALLENGE_DOCS = 50_000
F1855_PHASE_CHUNKS = (131, 219, 289)
F1855_EVAL_SECONDS = (508.8, 455.1, 470.0)
GOAL_SECONDS = 540.0
TINY = dict(num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=256, recur_start=1, recur_end=2,
            recur_loops=1, parallel_start_layer=2, xsa_layers=[0, 1, 2, 3], doc_attention_impl="dense",
            attention_backend="auto")


def synthetic_documents(docs: int, vocab: int, mean: float, seed: int) -> torch.Tensor:
    """BOS-led documents with log-normal lengths of the given mean (sigma 1.1), plus a closing BOS."""
    rng = np.random.default_rng(seed)
    sigma = 1.1
    lengths = np.maximum(2, rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, docs).astype(np.int64))
    stream = rng.integers(2, vocab, int(lengths.sum()) + 1)
    stream[np.concatenate([[0], np.cumsum(lengths)])] = 1
    return torch.from_numpy(stream)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file for the results")
    ap.add_argument("--params-profile", default="f1855", help="conf/profile/<name>.yaml for model and eval_ttt")
    ap.add_argument("--profile", choices=("full", "cpu_tiny"), default="full", help="cpu_tiny: a tiny model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--docs", type=int, default=2048, help="synthetic documents (all ranks)")
    ap.add_argument("--mean-doc", type=float, default=CHALLENGE_TARGETS / CHALLENGE_DOCS)
    ap.add_argument("--sgd-chunks", type=int, default=4, help="global SGD chunks timed")
    ap.add_argument("--sample-stride", type=int, default=1,
                    help="time every K-th of rank 0's batches (run as rank 0 of world x K)")
    ap.add_argument("--progress-lines", type=int, default=10, help="progress lines over the sampled batches")
    ap.add_argument("--phase-chunks", default=",".join(map(str, F1855_PHASE_CHUNKS)))
    ap.add_argument("--backend", default="auto",
                    help="chunk forward: auto (inductor if eval_ttt.compile and CUDA), eager, padded, or a "
                         "torch.compile backend (aot_eager: a CPU smoke test of the compiled path)")
    ap.add_argument("--set", nargs="*", default=[], help="eval_ttt overrides KEY=VALUE (yaml values)")
    args = ap.parse_args()
    params = compose(args.params_profile)
    model_params = {**params["model"], **(TINY if args.profile == "cpu_tiny" else {})}
    cfg = ModelConfig.from_dict(model_params)
    import yaml
    ttt = {**params["eval_ttt"], **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    doc_cfg = dataclasses.replace(from_params(EvalTTTConfig, {"eval_ttt": ttt}, "eval_ttt"), prefix_docs=0)
    seq_len = int(params["eval_sliding"]["seq_len"])
    device = resolve_device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    with torch.no_grad():   # zero-initialised O / MLP-down would leave most of the net idle
        model.qo_bank[cfg.num_layers:].normal_(std=0.02)
        model.mlp_down_bank.normal_(std=0.02)
    model.eval()
    tokens = synthetic_documents(args.docs, cfg.vocab_size, args.mean_doc, 1).to(device)
    sidecar = SidecarBytes(np.full(tokens.numel(), 3, dtype=np.uint16))
    warm = synthetic_documents(doc_cfg.batch_docs, cfg.vocab_size, args.mean_doc, 2).to(device)
    backend = {"auto": "inductor" if compile_enabled(doc_cfg.compile, device) else None, "eager": None}.get(
        args.backend, args.backend)
    compiled = backend not in (None, "padded")
    warm_s = 0.0 if compiled else timed(lambda: run_doc_ttt(model, warm, sidecar, seq_len, doc_cfg,
                                                            backend=backend), device)[1]
    with StageLog(None, lines_per_task=args.progress_lines) as log:   # lines on stdout: a time limit keeps them
        result, wall = timed(lambda: run_doc_ttt(model, tokens, sidecar, seq_len, doc_cfg, rank=0, backend=backend,
                                                 world_size=args.world * args.sample_stride, progress=log), device)
    seconds = result.seconds
    per_gpu = result.sums.scored_tokens / seconds
    lora_projected = CHALLENGE_TARGETS / (args.world * per_gpu)
    print(f"LoRA TTT: {result.sums.scored_tokens:,} targets in {seconds:.1f} s = {per_gpu:,.0f} tok/s per GPU "
          f"(compile {result.compile_seconds:.1f} s apart, eager warm-up {warm_s:.1f} s); projected 8-GPU "
          f"{lora_projected:.1f} s without phases", flush=True)  # before global SGD: survives a time limit
    sgd = GlobalSGDSettings(doc_cfg.global_lr, doc_cfg.global_momentum, doc_cfg.global_grad_clip,
                            doc_cfg.global_chunk_tokens, seq_len)
    sgd_nll = global_sgd_forward(model, backend) if compiled else None
    sgd_compile_s = warm_up_global_sgd(model, sgd_nll, sgd, rank=0, world_size=args.world) if compiled else 0.0
    global_sgd(model, tokens[:2 * sgd.chunk_tokens + 1], sgd, rank=0, world_size=args.world, nll=sgd_nll)  # warm-up
    stream = tokens[:min(tokens.numel(), (args.sgd_chunks + 1) * sgd.chunk_tokens + 1)]
    done = global_sgd(model, stream, sgd, rank=0, world_size=args.world, nll=sgd_nll)
    per_chunk = done["seconds"] / max(done["steps"], 1)
    phase_chunks = [int(c) for c in args.phase_chunks.split(",") if c]
    sgd_projected = per_chunk * sum(phase_chunks)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "params_profile": args.params_profile, "profile": args.profile, "parameters": model.num_parameters(),
        "world": args.world, "seq_len": seq_len, "chunk_tokens": doc_cfg.chunk_tokens,
        "batch_docs": doc_cfg.batch_docs, "lora_rank": doc_cfg.lora_rank, "lora_targets": list(doc_cfg.lora_targets),
        "docs": args.docs, "rank0_targets": result.sums.scored_tokens,
        "sample_stride": args.sample_stride,
        "sampled_batches": -(-result.batches // (args.world * args.sample_stride)),
        "compile": compiled, "backend": backend, "compile_width_step": doc_cfg.compile_width_step,
        "compiled_graphs": result.graphs,
        "compile_seconds": round(result.compile_seconds, 2), "global_sgd_compile_seconds": round(sgd_compile_s, 2),
        "lora_steps": result.lora_steps, "warmup_seconds": round(warm_s, 2), "seconds": round(seconds, 2),
        "wall_seconds_with_compile": round(wall, 2),
        "per_gpu_tokens_per_s": round(per_gpu, 1), "projected_8gpu_seconds_no_phases": round(lora_projected, 1),
        "global_sgd_seconds_per_chunk_rank0": round(per_chunk, 4), "phase_chunks": phase_chunks,
        "projected_global_sgd_seconds": round(sgd_projected, 1),
        "projected_8gpu_seconds_with_phases": round(lora_projected + sgd_projected, 1),
        "f1855_eval_seconds_8xh100": F1855_EVAL_SECONDS, "goal_seconds": GOAL_SECONDS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    print(f"{'per-GPU tok/s':>16} {'8-GPU s (no phases)':>20} {'global SGD s':>13} {'8-GPU s (phases)':>17} goal")
    print(f"{per_gpu:16,.0f} {lora_projected:20.1f} {sgd_projected:13.1f} {lora_projected + sgd_projected:17.1f} "
          f"{GOAL_SECONDS:.0f} (F1855: {', '.join(map(str, F1855_EVAL_SECONDS))})")
    if compiled:
        print(f"compile (outside the timed figures): chunk forward {result.compile_seconds:.1f} s in "
              f"{result.graphs} graphs, global SGD {sgd_compile_s:.1f} s")


if __name__ == "__main__":
    main()
