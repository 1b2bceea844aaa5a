"""Float quality of a profile over seeds at a fixed training time: train, then score the held-out text.

    python bench/seed_compare.py --root DIR --profile f1855_gap --seeds 1 2 3 --train-seconds 6 --out-dir OUT

For each seed: the real train stage (`stages.train.run`, compiled as the profile says) on the data under
``--root``, then the unquantised checkpoint scored on the whole validation split in non-overlapping
``eval_sliding.seq_len`` windows (the model's own attention, document-masked when the profile says so;
bytes from the tokenizer tables or the CaseOps sidecar, so bpb compares across tokenizers). Writes
``OUT/<profile>_s<seed>.json`` ({val_loss, val_bpb, ...}: `pgolf significance --metric val_bpb` reads
them) and prints one table. Epochs = steps x tokens_per_step / train tokens, printed per seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="folder holding data/ (artifacts/ is written there)")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--train-seconds", type=float, default=6.0)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--tilt", action="store_true",
                    help="also score with the n-gram tilt on (the profile's eval_sliding tilt keys): bpb gain and time")
    args = ap.parse_args()

    from pgolf.config import from_params
    from pgolf.data.shards import list_shards, read_shard
    from pgolf.distributed import resolve_device
    from pgolf.eval.inputs import load_eval_data
    from pgolf.eval.sliding import EvalSlidingConfig, score_nonoverlapping
    from pgolf.model.checkpoint import build_model, load_checkpoint
    from pgolf.pipeline.launch import launch_device
    from pgolf.pipeline.paths import CHECKPOINT
    from pgolf.tools.profiles import compose
    from stages import train

    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_tokens = sum(int(read_shard(p).size) for p in list_shards(args.root / "data/shards", "train"))
    rows = []
    for seed in args.seeds:
        p = compose(args.profile, [f"train.seed={seed}", f"train.max_train_seconds={args.train_seconds}",
                                   "eval_sliding.compile=false", *args.set])
        began = time.perf_counter()
        tm = train.run(p, args.root, curves=False)
        cfg = from_params(EvalSlidingConfig, p, "eval_sliding")
        device = resolve_device(launch_device(p))
        model = build_model(load_checkpoint(args.root / CHECKPOINT), device).eval()
        tokens, source = load_eval_data(args.root, cfg, model.cfg.vocab_size, device)
        with torch.no_grad():
            res = score_nonoverlapping(model, tokens, source, cfg)
        steps = int(tm.get("steps") or 0)
        row = {"profile": args.profile, "seed": seed, "val_loss": res.sums.val_loss, "val_bpb": res.sums.val_bpb,
               "scored_tokens": res.sums.scored_tokens, "steps": steps, "tokens_per_s": tm.get("tokens_per_s"),
               "epochs": steps * p["train"]["tokens_per_step"] / train_tokens, "train_tokens": train_tokens,
               "seconds": round(time.perf_counter() - began, 1)}
        if args.tilt:
            row.update(tilt_row(model, tokens, source, cfg, res))
        (args.out_dir / f"{args.profile}_s{seed}.json").write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| profile | seed | steps | epochs | tokens/s | val_bpb (non-overlapping, float) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['seed']} | {r['steps']} | {r['epochs']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['val_bpb']:.5f} |")


def tilt_row(model, tokens, source, cfg, plain) -> dict:
    """The same windows scored with ``eval_sliding.ngram_tilt`` on: its bpb, gain over ``plain``, and times."""
    import dataclasses

    from pgolf.eval.sliding import score_nonoverlapping

    with torch.no_grad():
        tilted = score_nonoverlapping(model, tokens, source, dataclasses.replace(cfg, ngram_tilt=True))
    return {"val_loss_tilt": tilted.sums.val_loss, "val_bpb_tilt": tilted.sums.val_bpb,
            "tilt_gain_bpb": plain.sums.val_bpb - tilted.sums.val_bpb,
            "tilt_hint_seconds": round(tilted.tilt.seconds, 3), "score_seconds": round(plain.seconds, 3),
            "score_seconds_tilt": round(tilted.seconds, 3),
            "tilt_gated_fraction": tilted.tilt.gated / max(1, tilted.tilt.hint.numel())}


if __name__ == "__main__":
    main()
