"""`pgolf results`: one short row per experiment, the scores first.

`dvc exp show` prints every param and metric (hundreds of columns, val_bpb
buried). This reads the same `dvc exp show --json` (or, outside a DVC
repository or with ``--workspace``, the workspace's metrics files) and prints,
per run: its name, the sliding and TTT val_bpb, the submission's total bytes,
whether it fits, then only the params whose values differ between the runs
shown. Runs still queued or failed are listed with their state.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pgolf.errors import DataError
from pgolf.tools.run_metrics import Experiment, experiments, read_metrics_file, run_dvc_exp_show

SLIDING = "artifacts/eval_sliding/metrics.json"
TTT = "artifacts/eval_ttt/metrics.json"
SIZE = "artifacts/size.json"
SCORE_COLUMNS = ("val_bpb_sliding", "val_bpb_ttt", "total_bytes", "fits")


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 1}}`` → ``{"train.seed": 1}`` (lists stay values)."""
    if not isinstance(params, dict):
        return {prefix: params} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in params.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _row(label: str, state: str | None, metrics: dict[str, dict], params: dict) -> dict:
    size = metrics.get(SIZE, {})
    return {"name": label, "state": state,
            "val_bpb_sliding": metrics.get(SLIDING, {}).get("val_bpb"),
            "val_bpb_ttt": metrics.get(TTT, {}).get("val_bpb"),
            "total_bytes": size.get("total_bytes"), "fits": size.get("fits"),
            "params": flatten(params)}


def experiment_rows(exp_show: list) -> list[dict]:
    """A row per entry of `dvc exp show --json` (workspace, commits, experiments)."""
    def row(exp: Experiment) -> dict:
        return _row(exp.label, exp.state, {path: exp.metrics(path) for path in (SLIDING, TTT, SIZE)},
                    exp.params())
    return [row(exp) for exp in experiments(exp_show)]


def workspace_rows(root: Path) -> list[dict]:
    """The workspace's own metrics files and params.yaml as one row."""
    import yaml
    metrics = {path: read_metrics_file(root / path) for path in (SLIDING, TTT, SIZE) if (root / path).is_file()}
    if not metrics:
        raise DataError(f"{root}: no metrics yet ({', '.join((SLIDING, TTT, SIZE))}); run `dvc repro` first")
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8")) if params_path.is_file() else {}
    return [_row("workspace", None, metrics, params if isinstance(params, dict) else {})]


def changed_params(rows: list[dict]) -> list[str]:
    """Param keys whose value is not the same in every row that has params."""
    with_params = [r["params"] for r in rows if r["params"]]
    keys = sorted({k for p in with_params for k in p})
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in with_params}) > 1]


def _cell(value: Any, score: bool = False) -> str:
    """Scores: bpb to 6 decimals, byte counts with separators; params as written in params.yaml."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return ("yes" if value else "NO") if score else str(value).lower()
    if score and isinstance(value, float):
        return f"{value:.6f}"
    if score and isinstance(value, int):
        return f"{value:,}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def render(rows: list[dict], changed: list[str]) -> str:
    headers = ["experiment", "sliding bpb", "TTT bpb", "total bytes", "fits", *changed]
    cells = [headers]
    for r in rows:
        name = r["name"] + (f" ({r['state']})" if r["state"] not in (None, "success") else "")
        cells.append([name, *(_cell(r[c], score=True) for c in SCORE_COLUMNS), *(_cell(r["params"].get(k)) for k in changed)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def run_results(args: argparse.Namespace) -> int:
    if args.exp_show:
        try:
            exp_show = json.loads(Path(args.exp_show).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{args.exp_show}: not a readable `dvc exp show --json` file ({exc})") from None
        rows = experiment_rows(exp_show)
    elif args.workspace or not Path(".dvc").is_dir():
        rows = workspace_rows(Path("."))
    else:
        rows = experiment_rows(run_dvc_exp_show(all_commits=args.all_commits))
    changed = changed_params(rows)
    if args.json:
        print(json.dumps([{**{k: r[k] for k in ("name", "state", *SCORE_COLUMNS)},
                           "changed_params": {k: r["params"].get(k) for k in changed}} for r in rows], indent=2))
    else:
        print(render(rows, changed))
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("results", help="short table of runs: val_bpb, bytes, fits, changed params")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--workspace", action="store_true",
                        help="only the workspace's metrics files (default outside a DVC repository)")
    parser.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit (dvc -A)")
    parser.add_argument("--exp-show", metavar="FILE", help="read a saved `dvc exp show --json` instead of running it")
    parser.set_defaults(func=run_results)
