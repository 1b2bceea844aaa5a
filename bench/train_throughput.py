"""Training throughput of the real training step: tokens/s, ms/step, peak memory, MFU.

Runs :class:`pgolf.train.loop.Trainer` (the loop's own step: micro-steps with
gradient accumulation, the composite optimizer, the EMA update) for a bounded
number of steps after an untimed compile warm-up, on synthetic or real tokens.

    # record shape on one GPU (11L/512, seq 2048, 786,432 tokens/step = 8 micro-steps of 48x2048)
    python bench/train_throughput.py --out bench_train.json
    # smoke test on CPU at a tiny shape
    python bench/train_throughput.py --shape tiny --out /tmp/bench_tiny.json
    # the model/optim sections of a params file (or of a profile) instead of the built-in shape
    python bench/train_throughput.py --params params.yaml --out bench.json
    python bench/train_throughput.py --profile f1855_gpu1 --no-qat --out f1855.json
    # the levers of issue 17 side by side in one process: baseline, model.fused_mlp, model.fused_loss,
    # train.compile_mode=reduce-overhead (CUDA graphs), all together; table + per-step losses + JSON
    python bench/train_throughput.py --levers --train-set mix_order_reduction=false --steps 8 \
        --warmup-steps 2 --out levers.json
    python bench/train_throughput.py --levers baseline fused_mlp --out two.json  # a subset
    python bench/train_throughput.py --levers baseline fa4 --out fa4.json  # needs pip install '.[fa4]'

``--levers``: every variant builds its own Trainer from the same seed, compiles
(untimed warm-up, then the state is restored), and runs the same timed steps
on the same tokens, so the per-step losses are comparable across variants
(same numerics class: bf16 autocast). A variant that fails is reported in the
table and the others still run.

FLOPs per token (forward + backward), written out:

    6 * N_matmul + 6 * L * T * D

* ``N_matmul``: weights used in matrix products once per token: the four
  banks (Q, K, V, O, MLP up and down of every layer), the output matrix
  (tok_emb when tied, else lm_head; V*D) and the small projections
  (BigramHash and value-embedding ``proj``). Embedding lookups are not
  matmuls and are excluded. 2 FLOPs per multiply-add, x3 for fwd + bwd.
* attention scores and weighted values: per layer and token, QK^T and AV each
  cost 2 * (T/2) * D FLOPs forward under a causal mask (a query sees T/2 keys
  on average; D = heads * head_dim), so 2*T*D forward, 6*T*D with backward.
  XSA's per-token projection (O(D)) is ignored.

``mfu`` divides by ``--peak-tflops`` (default 790, the bf16 dense rate
measured on the H100/H200 used for the records' comparisons). ``mfu_palm``
uses the PaLM convention (12*L*T*D, no causal halving) for comparison with
figures quoted that way. Reference: PR #549's own script on one H100 ran
776 ms/step = 1.01 M tokens/s, which is 29 % MFU by the first formula.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgolf.config import from_params, load_params  # noqa: E402
from pgolf.distributed import init_distributed, shutdown  # noqa: E402
from pgolf.data.loader import TokenStream, open_train_stream  # noqa: E402
from pgolf.model.attention import ATTENTION_BACKENDS  # noqa: E402
from pgolf.model.gpt import BANK_NAMES, GPT, ModelConfig  # noqa: E402
from pgolf.train.optim import OptimConfig  # noqa: E402
from pgolf.precision import peak_memory, synchronize  # noqa: E402
from pgolf.tools.profiles import compose, model_preset  # noqa: E402
from pgolf.data.shards import write_shard  # noqa: E402
from pgolf.train.loop import Trainer  # noqa: E402
from pgolf.quant.grid import GridBits, grid_bits_from_params  # noqa: E402
from pgolf.train.config import TrainConfig  # noqa: E402

# PR #960's model (conf/model/r960.yaml) and the record profile's optimizer (conf/profile/record.yaml);
# attention_backend "auto" lets PyTorch pick (--attention-backend sets one).
RECORD_MODEL = {**model_preset("r960"), "attention_backend": "auto"}
RECORD_OPTIM = compose("record")["optim"]
SHAPES = {
    # name: (seq_len, tokens_per_step, micro_batch_seqs, steps, warmup_steps)
    "record": (2048, 786_432, 48, 10, 3),
    "tiny": (256, 4096, 8, 5, 1),
}


def tiny_model() -> dict:
    return {**RECORD_MODEL, "num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2,
            "rope_dims": 16, "rope_base": 10000.0, "xsa_layers": [2, 3], "ve_layers": [2, 3], "ve_dim": 32,
            "bigram_buckets": 512, "bigram_dim": 64}


def matmul_params(model: GPT) -> int:
    """Weights that multiply every token (see the module docstring); a reused layer counts once per visit."""
    params = dict(model.named_parameters())
    visits = sum(len(part) for part in model.visits())  # num_layers unless depth recurrence is on
    n = sum(params[name].numel() for name in BANK_NAMES) * visits // model.cfg.num_layers
    n += sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if model.cfg.tie_embeddings:
        n += model.tok_emb.weight.numel()  # the output projection
    return n


def flops_per_token(model: GPT, seq_len: int) -> tuple[float, float]:
    """(causal convention, PaLM convention) training FLOPs per token."""
    cfg = model.cfg
    dense = 6.0 * matmul_params(model)
    attn_causal = 6.0 * sum(len(part) for part in model.visits()) * seq_len * cfg.model_dim
    return dense + attn_causal, dense + 2 * attn_causal


def synthetic_stream(directory: Path, n_tokens: int, vocab: int, seed: int) -> TokenStream:
    rng = np.random.default_rng(seed)
    path = directory / "train_000000.bin"
    write_shard(path, rng.integers(0, vocab, size=n_tokens, dtype=np.uint16))
    return TokenStream([path], vocab)


def profile_step(trainer: Trainer, step: int, out: Path) -> None:
    """One more training step under torch.profiler; the op/kernel table goes to ``out``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    synchronize(trainer.ctx.device)
    with profile(activities=activities) as prof:
        trainer.train_step(1.0, step)
        trainer.ema.update(trainer.model)
        synchronize(trainer.ctx.device)
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90) + "\n")
    if torch.cuda.is_available():
        events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        names = [e.key for e in events if e.key.startswith("triton_")][:12]
        (out.with_suffix(".kernels.py")).write_text(inductor_kernel_sources(names))


def inductor_kernel_sources(names: list[str]) -> str:
    """The generated source of each named Triton kernel, from inductor's on-disk cache (for reading
    what a slow fused kernel computes and with which launch grid)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    found = {}
    for path in Path(cache_dir()).rglob("*.py"):
        text = path.read_text(errors="replace")
        for name in names:
            if name not in found and f"def {name}(" in text:
                start = text.rfind("@triton", 0, text.index(f"def {name}("))
                end = text.find("\n\n\n", start)
                found[name] = text[max(start - 2000, 0):end if end > 0 else None]
    return "\n\n".join(f"# ===== {n}\n{found.get(n, '(source not found)')}" for n in names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON result path (required unless --table)")
    ap.add_argument("--table", nargs="+", metavar="LABEL=RESULT.json",
                    help="print the lever table of earlier results side by side and exit")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="record")
    ap.add_argument("--params", help="take model/optim sections from this params.yaml instead")
    ap.add_argument("--profile", help="take model/optim sections from this conf/profile (e.g. f1855_gpu1) instead")
    ap.add_argument("--levers", nargs="*", metavar="NAME",
                    help=f"measure these variants one after another in this process (none named = all: "
                         f"{', '.join(LEVERS)}); prints the table and the per-step losses side by side")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (shape default)")
    ap.add_argument("--tokens-per-step", type=int, help="global tokens per optimizer step (shape default)")
    ap.add_argument("--micro-batch-seqs", type=int, help="sequences per rank per micro-step (shape default)")
    ap.add_argument("--steps", type=int, help="timed optimizer steps (shape default)")
    ap.add_argument("--warmup-steps", type=int, help="untimed compile warm-up steps (shape default)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile on CUDA (default on; CPU always eager)")
    ap.add_argument("--qat", action=argparse.BooleanOptionalAction, default=True,
                    help="put the (off) late-QAT switch in the graph, as a training run with QAT does")
    ap.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS),
                    help="override the model's attention_backend")
    ap.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override model fields, values parsed as YAML (e.g. residual_dtype=float32)")
    ap.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override train fields, values parsed as YAML (e.g. mix_order_reduction=false)")
    ap.add_argument("--shards", help="directory of real train_*.bin shards (default: synthetic tokens)")
    ap.add_argument("--profile-out", help="also profile one extra step (torch.profiler) and write its "
                    "kernel table (sorted by device time) to this text file")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config options before compiling, values parsed as YAML "
                         "(e.g. coordinate_descent_tuning=true max_autotune_gemm=true)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak for MFU (TFLOP/s)")
    return ap.parse_args(argv)


def lever_table(entries: list[str]) -> str:
    """Markdown table of earlier results (``LABEL=path.json``), the first row being the baseline."""
    rows = ["| variant | ms/step | tokens/s | MFU | peak memory | vs first |", "|---|---|---|---|---|---|"]
    base = None
    for entry in entries:
        label, _, path = entry.partition("=")
        r = json.loads(Path(path).read_text())
        base = base or r["ms_per_step_median"]
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        rows.append(f"| {label} | {r['ms_per_step_median']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                    f"{r['peak_memory_bytes'] / 2**30:.1f} GiB | {base / r['ms_per_step_median']:.3f}x |")
    return "\n".join(rows)


# --levers: each variant's (model overrides, train overrides) on top of the configured step.
LEVERS = {
    "baseline": ({}, {}),
    "fused_mlp": ({"fused_mlp": True}, {}),
    "fused_loss": ({"fused_loss": True}, {}),
    "cuda_graphs": ({}, {"compile_mode": "reduce-overhead"}),
    "all": ({"fused_mlp": True, "fused_loss": True}, {"compile_mode": "reduce-overhead"}),
    # FlashAttention-4's Hopper kernels (needs the flash-attn-4 package)
    "fa4": ({"attention_backend": "fa4"}, {}),
}
OPTIONAL_LEVERS = {"fa4"}  # need a package pgolf does not install: run only when named
DEFAULT_LEVERS = [name for name in LEVERS if name not in OPTIONAL_LEVERS]


def set_inductor_options(items: list[str]) -> None:
    import torch._inductor.config as inductor_config
    for item in items:
        key, value = item.split("=", 1)
        *sections, name = key.split(".")
        target = inductor_config
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, yaml.safe_load(value))


def build_configs(args: argparse.Namespace, seq_len: int, tokens_per_step: int, micro_seqs: int, steps: int,
                  warmup: int) -> tuple[ModelConfig, OptimConfig, TrainConfig, GridBits]:
    """The model/optim sections (params file, profile or built-in shape) and the bench's train section,
    with the command line's overrides applied."""
    if args.params or args.profile:
        p = load_params(args.params) if args.params else compose(args.profile)
        model_cfg, optim_cfg = from_params(ModelConfig, p, "model"), from_params(OptimConfig, p, "optim")
        grid = grid_bits_from_params(p)
    else:
        grid = GridBits(attn_bits=6, mlp_bits=6)  # the records' int6 export grid
        model_dict = RECORD_MODEL if args.shape == "record" else tiny_model()
        model_cfg = from_params(ModelConfig, {"model": model_dict}, "model")
        optim_cfg = from_params(OptimConfig, {"optim": RECORD_OPTIM}, "optim")
    if args.attention_backend:
        model_cfg = model_cfg.replace(attention_backend=args.attention_backend)
    if args.model_set:
        overrides = dict(item.split("=", 1) for item in args.model_set)
        merged = {**model_cfg.to_dict(), **{k: yaml.safe_load(v) for k, v in overrides.items()}}
        model_cfg = ModelConfig.from_dict(merged, "--model-set")
    train_cfg = from_params(TrainConfig, {"train": {
        **compose("record")["train"],  # every key the config needs; the bench's own choices follow
        "seed": 1337, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
        "micro_batch_tokens": micro_seqs * seq_len, "max_steps": steps + 1, "max_train_seconds": 0.0,
        "warmdown": "steps", "warmdown_steps": 0, "warmdown_frac": 0.0, "compile": args.compile,
        "compile_warmup_steps": warmup, "qat_lr_scale_threshold": 0.15 if args.qat else 0.0,
        "holdout_tokens": seq_len + 1, "final_weights": "live", "resume_every": 0, "log_every": 1,
        "mix_order_reduction": True, "min_lr_scale": 0.0, "recur_start_frac": 0.0,  # recurrence (if any) on throughout
        "compile_mode": "default",
        **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.train_set)}}}, "train")
    return model_cfg, optim_cfg, train_cfg, grid


def measure(model_cfg: ModelConfig, optim_cfg: OptimConfig, train_cfg: TrainConfig, grid: GridBits, ctx,
            stream: TokenStream, steps: int, label: str, profile_out: str | None = None) -> dict:
    """Compile warm-up, then ``steps`` timed optimizer steps from the same starting state: the figures."""
    trainer = Trainer(model_cfg, optim_cfg, train_cfg, grid, ctx, stream)
    warmup_s = trainer.compile_warmup()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    step_ms, losses = [], []
    for i in range(steps):
        synchronize(ctx.device)
        t0 = time.perf_counter()
        loss, _ = trainer.train_step(1.0, i)
        trainer.ema.update(trainer.model)
        synchronize(ctx.device)
        step_ms.append(1000 * (time.perf_counter() - t0))
        losses.append(float(loss))
        if ctx.is_main:
            print(f"[{label}] step {i + 1}/{steps}: {step_ms[-1]:.1f} ms, loss {losses[-1]:.4f}", flush=True)
    if profile_out and ctx.is_main:
        profile_step(trainer, steps, Path(profile_out))
    # The first timed step can still pay one-off costs; the median is the figure.
    median_ms = statistics.median(step_ms)
    tokens_per_s = train_cfg.tokens_per_step / (median_ms / 1000)
    fpt, fpt_palm = flops_per_token(trainer.model, train_cfg.seq_len)
    peak_bytes, peak_kind = peak_memory(ctx.device)
    return {
        "label": label, "compiled": trainer.compiled, "compile_mode": train_cfg.compile_mode,
        "fused_mlp": model_cfg.fused_mlp, "fused_loss": model_cfg.fused_loss,
        "num_parameters": trainer.model.num_parameters(), "matmul_parameters": matmul_params(trainer.model),
        "num_layers": model_cfg.num_layers, "model_dim": model_cfg.model_dim, "grad_accum": trainer.accum,
        "compile_warmup_seconds": warmup_s, "step_ms": step_ms, "ms_per_step_median": median_ms,
        "ms_per_step_mean": statistics.fmean(step_ms), "ms_per_step_min": min(step_ms),
        "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "flops_per_token_palm": fpt_palm,
        "achieved_tflops": fpt * tokens_per_s / 1e12, "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak_kind, "losses": losses,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def release(ctx) -> None:
    """Free one variant's graphs and memory before the next (compiled code, CUDA-graph pools)."""
    gc.collect()
    torch._dynamo.reset()
    if ctx.device.type == "cuda":
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees
        reset_cudagraph_trees()
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def loss_table(variants: dict[str, dict]) -> str:
    """Per-step training loss of every variant, side by side (same seed, data and starting state)."""
    names = [n for n, r in variants.items() if r.get("losses")]
    rows = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(max((len(variants[n]["losses"]) for n in names), default=0)):
        rows.append(f"| {i + 1} | " + " | ".join(f"{variants[n]['losses'][i]:.4f}" for n in names) + " |")
    return "\n".join(rows)


def variants_table(variants: dict[str, dict], peak_tflops: float | None) -> str:
    rows = ["| variant | ms/step | tokens/s | MFU | peak memory | vs baseline | compile s |",
            "|---|---|---|---|---|---|---|"]
    base = next((r["ms_per_step_median"] for r in variants.values() if "error" not in r), None)
    for name, r in variants.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        rows.append(f"| {name} | {r['ms_per_step_median']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                    f"{r['peak_memory_bytes'] / 2**30:.1f} GiB | {base / r['ms_per_step_median']:.3f}x | "
                    f"{r['compile_warmup_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        print(lever_table(args.table))
        return {}
    if not args.out:
        raise SystemExit("error: --out is required (unless --table)")
    set_inductor_options(args.inductor)
    from pgolf.pipeline.launch import launch_facts  # torchrun's facts, if launched by it
    rank, world, local_rank = launch_facts()
    ctx = init_distributed(rank, world, local_rank, args.device)
    seq_len, tokens_per_step, micro_seqs, steps, warmup = SHAPES[args.shape]
    seq_len = args.seq_len or seq_len
    tokens_per_step = args.tokens_per_step or tokens_per_step
    micro_seqs = args.micro_batch_seqs or micro_seqs
    steps = args.steps if args.steps is not None else steps
    warmup = args.warmup_steps if args.warmup_steps is not None else warmup
    model_cfg, optim_cfg, train_cfg, grid = build_configs(args, seq_len, tokens_per_step, micro_seqs, steps, warmup)
    unknown = sorted(set(args.levers or []) - set(LEVERS))
    if unknown:
        raise SystemExit(f"error: --levers: unknown {unknown}; choose from {list(LEVERS)}")
    chosen = (args.levers or DEFAULT_LEVERS) if args.levers is not None else ["baseline"]
    on_gpu = ctx.device.type == "cuda"
    variants: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            stream = open_train_stream(args.shards, model_cfg.vocab_size)
        else:
            stream = synthetic_stream(Path(tmp), 2 * tokens_per_step + seq_len + 1, model_cfg.vocab_size, 0)
        for name in chosen:
            model_over, train_over = LEVERS[name] if args.levers is not None else ({}, {})
            try:  # one failing lever must not cost the others' figures
                variants[name] = measure(model_cfg.replace(**model_over), optim_cfg,
                                         dataclasses.replace(train_cfg, **train_over), grid, ctx, stream, steps,
                                         name, args.profile_out if args.levers is None else None)
            except Exception as exc:  # noqa: BLE001 -- reported in the table, the run goes on
                if args.levers is None:
                    raise
                traceback.print_exc()
                variants[name] = {"label": name, "error": f"{type(exc).__name__}: {exc}"}
            release(ctx)
    for r in variants.values():
        if "error" not in r:
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / (args.peak_tflops * 1e12) if on_gpu else None
            r["mfu_palm"] = (r["flops_per_token_palm"] * r["tokens_per_s"] / (args.peak_tflops * 1e12)
                             if on_gpu else None)
    common = {
        "device": torch.cuda.get_device_name(ctx.device) if on_gpu else "cpu",
        "torch": torch.__version__, "world_size": world, "shape": args.shape, "params_file": args.params,
        "profile": args.profile, "data": args.shards or "synthetic",
        "attention_backend": model_cfg.attention_backend, "residual_dtype": model_cfg.residual_dtype,
        "model_overrides": args.model_set, "inductor_options": args.inductor, "train_overrides": args.train_set,
        "qat_switch_in_graph": args.qat, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
        "micro_batch_seqs": micro_seqs, "steps": steps, "compile_warmup_steps": warmup,
        "flops_formula": "6*N_matmul + 6*L*T*D (causal attention); palm: 6*N_matmul + 12*L*T*D",
        "peak_tflops": args.peak_tflops if on_gpu else None}
    if args.levers is None:
        result = {**common, **variants["baseline"]}
    else:
        result = {**common, "variants": variants, "table": variants_table(variants, args.peak_tflops),
                  "loss_table": loss_table(variants)}
    if ctx.is_main:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        if args.levers is None:
            mfu = f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] is not None else ""
            print(f"{result['device']}: {result['ms_per_step_median']:.1f} ms/step (median of {steps}), "
                  f"{result['tokens_per_s']:,.0f} tokens/s{mfu}, peak memory "
                  f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB ({result['peak_memory_kind']}); wrote {out}")
        else:
            print(f"\n{result['device']}, {steps} timed steps per variant (median), torch {torch.__version__}:\n"
                  f"{result['table']}\n\nTraining loss per step (same seed, data and starting state):\n"
                  f"{result['loss_table']}\nwrote {out}")
    shutdown()
    return result


if __name__ == "__main__":
    main()
