"""The GPU benchmark harness: every pipeline stage at record shape, bounded in time, one table.

Runs, in one process on the profile's ``launch.device`` (auto: CUDA when present), the real stage functions
(`stages.<name>.run`) on a profile composed exactly as `dvc exp run -S
profile=<name>` would (conf/ + overrides), over data already prepared under
``--root`` (run the data stages on a CPU first and carry `data/`):

    train (bounded by --train-seconds) → hessians → bundle → quantize → size_check
    → float-checkpoint sliding eval (for the quantisation gap) → eval_sliding → eval_ttt

and prints one table (also written as JSON): train tokens/s and MFU, steps,
pre-quant and quantised bpb and the gap, total bytes and headroom under
16,000,000, Hessian + GPTQ seconds, sliding and TTT scored tokens/s and their
projected 8-GPU times for the challenge's 62,021,632-token validation set
(compiled evals: the stages time compilation apart, on one discarded warm-up
batch, so the projection is that compile time plus 62,021,632 / (8 × the
steady-state rate); the gradient all-reduce of 8-GPU TTT is not included).

    python bench/pipeline.py --root .carry --profile gpu_smoke --train-seconds 120 --out bench.json

MFU uses 6·N_matmul + 6·L·T·D FLOPs per token (causal attention halves the
12·L·T·D term) against --peak-tflops (790 = measured bf16 dense on this H100/H200).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pgolf.eval.windows import CHALLENGE_VAL_TARGETS  # noqa: E402
from pgolf.tools.profiles import compose  # noqa: E402


def float_sliding_bpb(root: Path, p: dict) -> dict:
    """Sliding-window bpb of the unquantised training checkpoint: eval_sliding's data, windows and scorer."""
    from pgolf.config import from_params
    from pgolf.distributed import resolve_device
    from pgolf.eval.inputs import load_eval_data
    from pgolf.eval.sliding import EvalSlidingConfig, nll_forward, score_sliding_windows
    from pgolf.model.checkpoint import build_model, load_checkpoint
    from pgolf.pipeline.launch import launch_device
    from pgolf.pipeline.paths import CHECKPOINT
    from pgolf.precision import compile_enabled
    cfg = from_params(EvalSlidingConfig, p, "eval_sliding")
    device = resolve_device(launch_device(p))
    model = build_model(load_checkpoint(root / CHECKPOINT), device).eval()
    tokens, tables = load_eval_data(root, cfg, model.cfg.vocab_size, device)
    res = score_sliding_windows(model, tokens, tables, cfg, rank=0, world_size=1,
                                forward=nll_forward(model, cfg.compile, device),
                                warmup=compile_enabled(cfg.compile, device))
    return {"val_loss": res.sums.val_loss, "val_bpb": res.sums.val_bpb, "seconds": res.seconds,
            "compile_seconds": res.compile_seconds}


def mfu(p: dict, tokens_per_s: float, peak_tflops: float) -> tuple[float, float]:
    """(FLOPs per token, MFU) with bench/train_throughput.py's causal convention."""
    from bench.train_throughput import flops_per_token
    from pgolf.config import from_params
    from pgolf.model.gpt import GPT, ModelConfig
    with torch.device("meta"):
        model = GPT(from_params(ModelConfig, p, "model"))
    per_token = flops_per_token(model, p["train"]["seq_len"])[0]
    return per_token, tokens_per_s * per_token / (peak_tflops * 1e12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="folder holding data/ (outputs go to its artifacts/)")
    ap.add_argument("--profile", default="gpu_smoke")
    ap.add_argument("--train-seconds", type=float, default=120.0)
    ap.add_argument("--eval-compile", choices=["true", "false"], default=None,
                    help="override eval_sliding.compile (eager avoids ~80 s of compile on small val sets)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--skip-ttt", action="store_true", help="stop after eval_sliding (seed sweeps of train + quantise)")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--out", type=Path, default=Path("bench_pipeline.json"))
    args = ap.parse_args()

    overrides = [f"train.max_train_seconds={args.train_seconds}", *args.set]
    if args.eval_compile:
        overrides.append(f"eval_sliding.compile={args.eval_compile}")
    p = compose(args.profile, overrides)

    from stages import bundle, eval_sliding, eval_ttt, hessians, quantize, size_check, train
    root = args.root
    row: dict = {"profile": args.profile, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "train_seconds_cap": args.train_seconds}
    stage_seconds: dict = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        stage_seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"[bench] {name}: {stage_seconds[name]} s", flush=True)
        return out

    tm = timed("train", train.run, p, root, curves=False)
    row.update(steps=tm.get("steps"), train_tokens_per_s=tm.get("tokens_per_s"),
               train_loss=tm.get("final_train_loss"), weights=tm.get("final_weights"),
               holdout_live_ema_swa=[tm.get(f"holdout_loss_{k}") for k in ("live", "ema", "swa")])
    fpt, util = mfu(p, float(tm.get("tokens_per_s") or 0.0), args.peak_tflops)
    row.update(flops_per_token=fpt, mfu=util)
    hm = timed("hessians", hessians.run, p, root)
    bm = timed("bundle", bundle.run, p, root)  # the counted code: quantize's byte target, size_check's count
    qm = timed("quantize", quantize.run, p, root)
    sm = timed("size_check", size_check.run, p, root)
    row.update(hessian_seconds=hm.get("seconds"), gptq_seconds=qm.get("seconds_quantize"), quantize_seconds=qm.get("seconds"),
               total_bytes=sm["total_bytes"], model_bytes=sm["model_bytes"], code_bytes=sm["code_bytes"],
               headroom=sm["headroom"], fits=sm["fits"], bundle_raw_bytes=bm["raw_bytes"])
    fm = timed("float_eval", float_sliding_bpb, root, p)
    em = timed("eval_sliding", eval_sliding.run, p, root)
    tt = {"val_bpb": float("nan"), "tokens_per_s": float("inf"), "compile_seconds": 0.0} if args.skip_ttt \
        else timed("eval_ttt", eval_ttt.run, p, root)
    # The float eval compiles the same graph first, so eval_sliding's own warm-up is ~0
    # here; a fresh process pays the larger of the two.
    sliding_compile = max(em["compile_seconds"], fm["compile_seconds"])
    row.update(prequant_bpb=fm["val_bpb"], quant_bpb=em["val_bpb"], quant_gap_bpb=em["val_bpb"] - fm["val_bpb"],
               ttt_bpb=tt["val_bpb"], sliding_tokens_per_s=em["tokens_per_s"], ttt_tokens_per_s=tt["tokens_per_s"],
               sliding_compile_s=sliding_compile, ttt_compile_s=tt["compile_seconds"],
               # Steady-state rate over the challenge's val set on 8 GPUs, plus the compile time.
               sliding_8gpu_projected_s=sliding_compile + CHALLENGE_VAL_TARGETS / (8 * em["tokens_per_s"]),
               ttt_8gpu_projected_s=tt["compile_seconds"] + CHALLENGE_VAL_TARGETS / (8 * tt["tokens_per_s"]),
               stage_seconds=stage_seconds, train_metrics=tm, quantize_metrics=qm, sliding_metrics=em, ttt_metrics=tt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2, default=str))
    keys = ["device", "profile", "steps", "train_tokens_per_s", "mfu", "train_loss", "weights", "prequant_bpb", "quant_bpb", "quant_gap_bpb",
            "ttt_bpb", "total_bytes", "headroom", "fits", "hessian_seconds", "gptq_seconds",
            "sliding_tokens_per_s", "sliding_compile_s", "sliding_8gpu_projected_s",
            "ttt_tokens_per_s", "ttt_compile_s", "ttt_8gpu_projected_s"]
    width = max(map(len, keys))
    print("\n| metric | value |\n|---|---|")
    for k in keys:
        v = row.get(k)
        print(f"| {k:<{width}} | {v:.6g} |" if isinstance(v, float) else f"| {k:<{width}} | {v} |")
    print("stage seconds:", stage_seconds)


if __name__ == "__main__":
    main()
