"""Benchmark: the quantisation gap (float vs quantised eval loss/bpb) of each frontier variant, per run.

    python bench/quant_gap.py OUT.json RUN_DIR [RUN_DIR ...] [--device auto] [--val-tokens N] [--stride S]

Each RUN_DIR is a finished pgolf run (one seed each): ``params.yaml``,
``artifacts/train/model.pt``, ``data/shards`` (train for calibration, val for
scoring) and ``data/tokenizer``. Its Hessians are
``artifacts/hessians/hessians.pt`` when that file already holds the head
Hessian and the activation RMS; otherwise they are collected here with the
run's ``hessians`` section plus ``head`` and ``activation_rms`` (the block
Hessians are the same either way, docs/FRONTIER.md §4.2).

The run's ``quantize`` section is the base (byte fitting and pruning off, so
every variant is compared at full width) and the variants change only:

- ``search``: ``clip: search``, ``embed_method: rtn``, ``awq_top_k: 0`` (today's quantiser);
- ``sdclip``: ``clip: sdclip`` with the run's (or default) k per class (docs/FRONTIER.md §4.3);
- ``sdclip_embed7``: + the tied embedding through GPTQ at int7 (docs/FRONTIER.md §4.1);
- ``sdclip_embed7_lqer``: + LQER on the 3 worst tensors at the run's rank and group (docs/FRONTIER.md §4.4);
- ``sdclip_embed7_lqer_awq``: + AWQ-lite, one 64-column group model-wide (docs/FRONTIER.md §4.5).

``gate_int8`` stays as the run's params say. Scoring uses the first
``--val-tokens`` validation tokens (all by default) in non-overlapping
``eval_sliding.seq_len`` windows, or sliding windows with ``--stride``. The
JSON holds every run's float and quantised loss/bpb, gap and artifact bytes;
the table gives each variant's mean gap over runs and its spread (sample std).
Compare variants over ≥ 3 seeds with ``pgolf significance``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgolf.config import from_params  # noqa: E402
from pgolf.data.shards import list_shards  # noqa: E402
from pgolf.distributed import init_distributed  # noqa: E402
from pgolf.eval.inputs import load_eval_data  # noqa: E402
from pgolf.eval.sliding import EvalSlidingConfig, score_nonoverlapping, score_sliding_windows  # noqa: E402
from pgolf.model.checkpoint import Checkpoint, build_model, load_checkpoint  # noqa: E402
from pgolf.model.gpt import rebank_state_dict  # noqa: E402
from pgolf.precision import configure_backends  # noqa: E402
from pgolf.progress import StageLog  # noqa: E402
from pgolf.quant.artifact import decode, dequantize  # noqa: E402
from pgolf.quant.hessian_file import HEAD_HESSIAN_KEY, load_hessians  # noqa: E402
from pgolf.quant.hessians import HessiansConfig, calibrate_model  # noqa: E402
from pgolf.quant.pipeline import quantize_loaded  # noqa: E402
from pgolf.quant.policy import QuantizeConfig  # noqa: E402

VARIANTS = {
    "search": dict(clip="search", embed_method="rtn", awq_top_k=0, lqer_top_k=0),
    "sdclip": dict(clip="sdclip", embed_method="rtn", awq_top_k=0, lqer_top_k=0),
    "sdclip_embed7": dict(clip="sdclip", embed_method="gptq", embed_bits=7, awq_top_k=0, lqer_top_k=0),
    "sdclip_embed7_lqer": dict(clip="sdclip", embed_method="gptq", embed_bits=7, awq_top_k=0, lqer_top_k=3),
    "sdclip_embed7_lqer_awq": dict(clip="sdclip", embed_method="gptq", embed_bits=7, awq_top_k=1,
                                   awq_group_size=64, lqer_top_k=3),
}
CHECKPOINT = Path("artifacts/train/model.pt")
HESSIANS = Path("artifacts/hessians/hessians.pt")
SHARDS = Path("data/shards")


def section(params: dict, name: str, cls, extra: dict | None = None):
    """``params[name]`` as ``cls``, keys the run's params predate taking the dataclass defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in params.get(name, {}).items() if k in fields}
    for key, f in fields.items():
        if key not in values and f.default is not dataclasses.MISSING:
            values[key] = f.default
    return from_params(cls, {name: {**values, **(extra or {})}}, name)


def run_hessians(run: Path, params: dict, ckpt: Checkpoint, device: torch.device, log: StageLog):
    path = run / HESSIANS
    if path.is_file():
        hs = load_hessians(path)
        if HEAD_HESSIAN_KEY in hs.hessians and hs.act_rms:
            return hs, "file"
    cfg = section(params, "hessians", HessiansConfig, {"head": True, "activation_rms": True})
    ctx = init_distributed(0, 1, 0, str(device))
    outcome = calibrate_model(cfg, ckpt, list_shards(run / SHARDS, "train"), ctx, log)
    return outcome.hessians, "collected"


def score(model: torch.nn.Module, tokens: torch.Tensor, byte_source, cfg: EvalSlidingConfig) -> dict:
    model.eval()
    with torch.no_grad():
        result = (score_sliding_windows(model, tokens, byte_source, cfg) if cfg.stride < cfg.seq_len
                  else score_nonoverlapping(model, tokens, byte_source, cfg))
    return {"val_loss": result.sums.val_loss, "val_bpb": result.sums.val_bpb,
            "scored_tokens": result.sums.scored_tokens}


def measure_run(run: Path, variants: list[str], device: torch.device, val_tokens: int, stride: int | None,
                overrides: dict | None = None) -> dict:
    params = yaml.safe_load((run / "params.yaml").read_text())
    ckpt = load_checkpoint(run / CHECKPOINT)
    base = section(params, "quantize", QuantizeConfig, {"fit_to_limit": False, "prune": False, **(overrides or {})})
    eval_cfg = section(params, "eval_sliding", EvalSlidingConfig, {"compile": False})
    if stride is not None:
        eval_cfg = dataclasses.replace(eval_cfg, stride=stride)
    else:
        eval_cfg = dataclasses.replace(eval_cfg, stride=eval_cfg.seq_len)
    with StageLog(None, enabled=False) as log:
        hs, source = run_hessians(run, params, ckpt, device, log)
        tokens, byte_source = load_eval_data(run, eval_cfg, ckpt.model_config.vocab_size, device)
        if val_tokens:
            tokens = tokens[:val_tokens + 1]
        out = {"run": str(run), "hessians": source, "float": score(build_model(ckpt, device), tokens, byte_source,
                                                                    eval_cfg), "variants": {}}
        for name in variants:
            cfg = dataclasses.replace(base, **VARIANTS[name])
            began = time.perf_counter()
            q = quantize_loaded(ckpt, hs, cfg, device, None, str(run / CHECKPOINT), "hessians", log)
            seconds = time.perf_counter() - began
            art = decode(q.blob)
            state = rebank_state_dict(dequantize(art), ckpt.model_config)
            model = build_model(Checkpoint(ckpt.model_config, state, art.meta), device)
            scored = score(model, tokens, byte_source, eval_cfg)
            out["variants"][name] = {**scored, "gap_loss": scored["val_loss"] - out["float"]["val_loss"],
                                     "gap_bpb": scored["val_bpb"] - out["float"]["val_bpb"],
                                     "model_bytes": len(q.blob), "quantize_seconds": round(seconds, 2),
                                     "awq": q.metrics["awq"]}
            print(f"{run}: {name}: gap {out['variants'][name]['gap_bpb']:+.6f} bpb, {len(q.blob):,} bytes",
                  flush=True)
    return out


def table(results: list[dict], variants: list[str]) -> list[str]:
    head = f"{'variant':<20} {'gap bpb mean':>13} {'std':>9} {'gap loss mean':>14} {'bytes mean':>12}  per run"
    lines = [head, "-" * len(head)]
    for name in variants:
        gaps = [r["variants"][name]["gap_bpb"] for r in results]
        loss = [r["variants"][name]["gap_loss"] for r in results]
        size = [r["variants"][name]["model_bytes"] for r in results]
        std = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
        lines.append(f"{name:<20} {statistics.mean(gaps):>+13.6f} {std:>9.6f} {statistics.mean(loss):>+14.6f} "
                     f"{statistics.mean(size):>12,.0f}  " + " ".join(f"{g:+.5f}" for g in gaps))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file for the results")
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories, one per seed")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--val-tokens", type=int, default=0, help="score only the first N val targets (0 = all)")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: non-overlapping)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="quantize overrides for every variant (yaml values), e.g. compression=plain")
    parser.add_argument("--per-seed-dir", type=Path,
                        help="also write <variant>_s<N>.json (val_loss, val_bpb of the quantised model, gap_bpb) "
                             "per run N (1-based) for `pgolf significance --metric val_bpb`")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    device = init_distributed(0, 1, 0, args.device).device
    configure_backends(device)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    results = []
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "variants": variants, "quantize_overrides": overrides, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(args.runs, 1):
        results.append(measure_run(run, variants, device, args.val_tokens, args.stride, overrides))
        args.out.write_text(json.dumps(summary, indent=2) + "\n")  # after every run: a timeout keeps the rest
        if args.per_seed_dir is not None:
            args.per_seed_dir.mkdir(parents=True, exist_ok=True)
            for name, row in results[-1]["variants"].items():
                (args.per_seed_dir / f"{name}_s{i}.json").write_text(json.dumps(
                    {"run": str(run), "val_loss": row["val_loss"], "val_bpb": row["val_bpb"],
                     "gap_bpb": row["gap_bpb"], "gap_loss": row["gap_loss"]}, indent=2) + "\n")
    print(json.dumps(summary))
    print("\n".join(table(results, variants)))


if __name__ == "__main__":
    main()
