"""Throughput of the sliding-window eval and of score-first TTT, projected to the challenge.

    python bench/eval_throughput.py OUT.json                       # record profile on CUDA
    python bench/eval_throughput.py OUT.json --profile tiny        # CPU smoke test

One process measures the work of rank 0 of ``--world`` ranks (default 8):
it scores rank 0's share of the windows and, in TTT, trains on rank 0's
share of each step's sequences, exactly as under torchrun, but without the
collectives (no process group). Per-GPU throughput is rank 0's scored
targets per second, and the projected time for the 62,021,632-target FineWeb
validation set on ``world`` GPUs is ``62,021,632 / (world × per-GPU tok/s)``.
TTT's gradient all-reduce (one flat buffer per step) is not in that figure;
``ttt_allreduce_mb_per_step`` gives its size. Compilation is warmed up on a
short slice first and not timed. The model is random-initialised (speed
does not depend on the weights) and the tokens are random.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import timed  # noqa: E402

from pgolf.data.bpb import ByteTables  # noqa: E402
from pgolf.distributed import resolve_device  # noqa: E402
from pgolf.eval.sliding import EvalSlidingConfig, nll_forward, score_sliding_windows  # noqa: E402
from pgolf.model.gpt import GPT, ModelConfig  # noqa: E402
from pgolf.tools.profiles import model_preset  # noqa: E402
from pgolf.precision import configure_backends  # noqa: E402
from pgolf.eval.ttt import EvalTTTConfig, run_ttt  # noqa: E402
from pgolf.eval.windows import CHALLENGE_VAL_TARGETS  # noqa: E402

# Seconds on 8×H100 in the records' logs (docs/RECIPE.md §7) and this project's goals.
RECORD_SECONDS = {"sliding": (73.7, 105.1), "ttt": (408.0, 410.3)}
GOAL_SECONDS = {"sliding": 75.0, "ttt": 300.0}

# PR #960's model (conf/model/r960.yaml): 11 layers of 512, GQA 8/4, MLP 3x, XSA on the last 4,
# VE on 9-10, BigramHash 3072x128, VRL (docs/RECIPE.md §2.1).
RECORD_MODEL = {**model_preset("r960"), "attention_backend": "auto"}
PROFILES = {
    "record": dict(model=RECORD_MODEL, seq_len=2048, stride=64, batch_windows=32, chunk_tokens=32768,
                   sliding_targets=4 * 2**20, ttt_chunks=24, warmup_chunks=2),
    "tiny": dict(model={**RECORD_MODEL, "num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1,
                        "xsa_layers": (1,), "ve_layers": (1,), "ve_dim": 8, "bigram_buckets": 64,
                        "bigram_dim": 8, "vocab_size": 64},
                 seq_len=64, stride=16, batch_windows=8, chunk_tokens=512, sliding_targets=8192,
                 ttt_chunks=6, warmup_chunks=2),
}


def synthetic_tables(vocab_size: int) -> ByteTables:
    rng = np.random.default_rng(0)
    return ByteTables(rng.integers(1, 6, vocab_size).astype(np.int16), rng.random(vocab_size) < 0.5,
                      np.zeros(vocab_size, dtype=bool))


def compile_phases() -> dict[str, float]:
    """Seconds per torch.compile phase so far (``torch._dynamo.utils.compile_times``)."""
    from torch._dynamo.utils import compile_times
    names, values = compile_times(repr="csv", aggregate=True)
    return {n: round(float(v), 2) for n, v in zip(names, values)}


def projection(rank_targets: int, seconds: float, world: int) -> dict:
    per_gpu = rank_targets / seconds
    return {"rank0_targets": rank_targets, "seconds": round(seconds, 3), "per_gpu_tokens_per_s": round(per_gpu, 1),
            "projected_seconds_fineweb": round(CHALLENGE_VAL_TARGETS / (world * per_gpu), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file for the results")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="record")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--world", type=int, default=8, help="ranks whose rank-0 share is measured")
    ap.add_argument("--no-compile", action="store_true", help="eager forward even on CUDA")
    ap.add_argument("--batch-windows", type=int, help="windows per forward (default: the profile's)")
    ap.add_argument("--attention-backend", help="model.attention_backend (default: the profile's)")
    ap.add_argument("--skip-ttt", action="store_true", help="measure the sliding eval only")
    args = ap.parse_args()
    prof = dict(PROFILES[args.profile])
    if args.batch_windows:
        prof["batch_windows"] = args.batch_windows
    if args.attention_backend:
        prof["model"] = {**prof["model"], "attention_backend": args.attention_backend}
    device = resolve_device(args.device)
    configure_backends(device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(prof["model"])
    model = GPT(cfg).to(device)
    with torch.no_grad():   # zero-initialised O / MLP-down would leave most of the net idle
        model.qo_bank[cfg.num_layers:].normal_(std=0.02)
        model.mlp_down_bank.normal_(std=0.02)
    tables = synthetic_tables(cfg.vocab_size)
    windows = EvalSlidingConfig(seq_len=prof["seq_len"], stride=prof["stride"], batch_windows=prof["batch_windows"],
                            trim_to_seq_len=False, compile=not args.no_compile)
    ttt_cfg = EvalTTTConfig(chunk_tokens=prof["chunk_tokens"], epochs=3, optimizer="sgd", lr=0.002,
                        lr_schedule="cosine", momentum=0.9, beta2=0.999, weight_decay=0.0, freeze_blocks=0,
                        grad_clip=1.0, batch_seqs=32)
    forward = nll_forward(model, windows.compile, device)
    gen = torch.Generator().manual_seed(1)
    stream = lambda n: torch.randint(cfg.vocab_size, (n + 1,), generator=gen).to(device)  # noqa: E731
    share = dict(rank=0, world_size=args.world, forward=forward)

    # Warm-up, not in the steady-state rates: the inference graph (what a fresh
    # eval_sliding process pays first), then TTT's training graph.
    warm_tokens = stream(prof["warmup_chunks"] * prof["chunk_tokens"])
    _, compile_sliding_s = timed(lambda: score_sliding_windows(model, warm_tokens, tables, windows, **share), device)
    compile_ttt_s = 0.0
    if not args.skip_ttt:
        _, compile_ttt_s = timed(lambda: run_ttt(model, warm_tokens, tables, windows, ttt_cfg, **share), device)

    sliding, sliding_s = timed(lambda: score_sliding_windows(
        model, stream(prof["sliding_targets"]), tables, windows, **share), device)
    ttt = None
    if not args.skip_ttt:
        ttt, ttt_s = timed(lambda: run_ttt(model, stream(prof["ttt_chunks"] * prof["chunk_tokens"]), tables,
                                           windows, ttt_cfg, **share), device)
    names = ("sliding",) if ttt is None else ("sliding", "ttt")
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "profile": args.profile, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "compiled": windows.compile and device.type == "cuda", "world": args.world,
        "parameters": model.num_parameters(), "seq_len": windows.seq_len, "stride": windows.stride,
        "batch_windows": windows.batch_windows, "chunk_tokens": ttt_cfg.chunk_tokens, "epochs": ttt_cfg.epochs,
        "warmup_seconds_sliding": round(compile_sliding_s, 2), "warmup_seconds_ttt": round(compile_ttt_s, 2),
        "sliding": projection(sliding.sums.scored_tokens, sliding_s, args.world),
        "attention_backend": cfg.attention_backend,
        # Where this process's compile time went (dynamo/inductor phases, summed).
        "compile_phases": compile_phases(),
        "sliding_projected_with_compile_s": round(compile_sliding_s + CHALLENGE_VAL_TARGETS / (
            args.world * sliding.sums.scored_tokens / sliding_s), 1),
        "ttt_allreduce_mb_per_step": round(grad_bytes / 1e6, 1),
        "record_seconds_8xh100": RECORD_SECONDS, "goal_seconds": GOAL_SECONDS,
    }
    if ttt is not None:
        result["ttt"] = {**projection(ttt.sums.scored_tokens, ttt_s, args.world), "train_steps": ttt.train_steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in names:
        r = result[name]
        ok = "meets" if r["projected_seconds_fineweb"] <= GOAL_SECONDS[name] else "misses"
        print(f"{name}: {r['per_gpu_tokens_per_s']:,.0f} scored tok/s per GPU -> "
              f"{r['projected_seconds_fineweb']:.1f} s for {CHALLENGE_VAL_TARGETS:,} targets on {args.world} GPUs "
              f"({ok} the {GOAL_SECONDS[name]:.0f} s goal; records {RECORD_SECONDS[name]})")
    assert all(math.isfinite(result[n]["per_gpu_tokens_per_s"]) for n in names)


if __name__ == "__main__":
    main()
