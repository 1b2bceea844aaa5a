"""`pgolf` command line: significance, inspect and export."""
from __future__ import annotations

import argparse
import json
import math
import sys

from pgolf.submission import export as export_command
from pgolf.tools import inspect as inspect_command
from pgolf.errors import PgolfError


def _cmd_significance(args: argparse.Namespace) -> int:
    from pgolf.tools.run_metrics import load_run
    from pgolf.tools.significance import welch_improvement_test

    def values(refs: list[str], key: str) -> list[float]:
        out = []
        for ref in refs:
            m = load_run(ref)
            if key not in m:
                raise PgolfError(f"{ref}: metric '{key}' missing (has: {', '.join(sorted(m))})")
            out.append(float(m[key]))
        return out

    cand, base = values(args.candidate, args.metric), values(args.baseline, args.metric)
    r = welch_improvement_test(cand, base, margin=args.margin, alpha=args.alpha)
    report = {"metric": args.metric, "candidate": cand, "baseline": base,
              "candidate_mean": r.candidate_mean, "candidate_std": r.candidate_std,
              "baseline_mean": r.baseline_mean, "baseline_std": r.baseline_std,
              "improvement_nats": r.improvement, "margin_nats": r.margin,
              "t": r.t_stat, "df": r.df, "p_value": r.p_value, "alpha": r.alpha,
              "significant": r.significant}
    try:
        cb, bb = values(args.candidate, "val_bpb"), values(args.baseline, "val_bpb")
        report["improvement_bpb"] = sum(bb) / len(bb) - sum(cb) / len(cb)
    except PgolfError:
        report["improvement_bpb"] = None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"candidate {args.metric}: mean {r.candidate_mean:.6f}  std {r.candidate_std:.6f}  (n={len(cand)})")
        print(f"baseline  {args.metric}: mean {r.baseline_mean:.6f}  std {r.baseline_std:.6f}  (n={len(base)})")
        bpb = report["improvement_bpb"]
        print(f"improvement: {r.improvement:+.6f} nats" + (f", {bpb:+.6f} bpb" if bpb is not None else ""))
        df = "inf" if math.isinf(r.df) else f"{r.df:.2f}"
        print(f"Welch t = {r.t_stat:.4f}, df = {df}, one-sided p = {r.p_value:.3g} "
              f"for improvement >= {r.margin} nats")
        verdict = "SIGNIFICANT" if r.significant else "NOT significant"
        print(f"verdict: {verdict} at alpha {r.alpha} (needs improvement > {r.margin} nats and p < {r.alpha})")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from pgolf.tools.profiles import compose, write_params
    write_params(args.out, compose(args.profile, args.set), args.profile)
    print(f"wrote {args.out} (profile {args.profile}{', ' + ' '.join(args.set) if args.set else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sig = sub.add_parser("significance", help="one-sided Welch t-test of a record claim")
    sig.add_argument("--candidate", nargs="+", required=True,
                     help="metrics JSON files or DVC experiment names of the candidate's seeds")
    sig.add_argument("--baseline", nargs="+", required=True, help="same, for the current best")
    sig.add_argument("--metric", default="val_loss", help="metric key in nats per token (default val_loss)")
    sig.add_argument("--margin", type=float, default=0.005, help="required improvement in nats (default 0.005)")
    sig.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    sig.add_argument("--json", action="store_true", help="print the result as JSON")
    sig.set_defaults(func=_cmd_significance)
    prm = sub.add_parser("params", help="write params.yaml for a profile (cpu, record, gpu1, gpu_smoke)")
    prm.add_argument("--profile", default="cpu", help="conf/profile/<name>.yaml overlay (default cpu)")
    prm.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides, e.g. train.seed=7")
    prm.add_argument("--out", default="params.yaml", help="file to write (default params.yaml)")
    prm.set_defaults(func=_cmd_params)
    inspect_command.add_subcommand(sub)
    export_command.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
