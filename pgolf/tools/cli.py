"""`pgolf` command line: significance, params, inspect, results and export."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from pgolf.submission import export as export_command
from pgolf.tools import inspect as inspect_command
from pgolf.tools import results as results_command
from pgolf.tools.profiles import known_profiles
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
            value = m[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PgolfError(f"{ref}: metric '{key}' is {value!r}, not a finite number")
            out.append(float(value))
        return out

    cand, base = values(args.candidate, args.metric), values(args.baseline, args.metric)
    try:
        r = welch_improvement_test(cand, base, margin=args.margin, alpha=args.alpha)
    except ValueError as exc:
        raise PgolfError(f"significance: {exc}") from None
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
        unit = "bpb" if args.metric.endswith("bpb") else "nats"  # the margin is in the metric's own unit
        print(f"improvement: {r.improvement:+.6f} {unit}" + (f", {bpb:+.6f} bpb" if bpb is not None and unit == "nats" else ""))
        df = "inf" if math.isinf(r.df) else f"{r.df:.2f}"
        print(f"Welch t = {r.t_stat:.4f}, df = {df}, one-sided p = {r.p_value:.3g} "
              f"for improvement >= {r.margin} {unit}")
        verdict = "SIGNIFICANT" if r.significant else "NOT significant"
        print(f"verdict: {verdict} at alpha {r.alpha} (needs improvement > {r.margin} {unit} and p < {r.alpha})")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from pgolf.tools.profiles import compose, validate, write_params
    params = compose(args.profile, args.set)
    validate(params)
    write_params(args.out, params, args.profile)
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
    profiles = ", ".join(known_profiles())
    prm = sub.add_parser("params", help=f"write params.yaml for a profile ({profiles})")
    prm.add_argument("--profile", default="cpu",
                     help=f"conf/profile/<name>.yaml overlay: {profiles} (default cpu)")
    prm.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides, e.g. train.seed=7")
    prm.add_argument("--out", default="params.yaml", help="file to write (default params.yaml)")
    prm.set_defaults(func=_cmd_params)
    inspect_command.add_subcommand(sub)
    results_command.add_subcommand(sub)
    export_command.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`pgolf inspect ... | head`): stop quietly. stdout is
        # pointed at devnull so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
