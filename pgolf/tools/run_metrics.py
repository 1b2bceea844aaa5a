"""Read one run's headline metrics from a metrics JSON file or a DVC experiment."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pgolf.errors import DataError
from pgolf.pipeline.paths import EVAL_SLIDING_DIR, EVAL_TTT_DIR

# Later stages' metrics win: the TTT score is the headline when TTT ran.
HEADLINE_FILES = tuple((d / "metrics.json").as_posix() for d in (EVAL_TTT_DIR, EVAL_SLIDING_DIR))


def read_metrics_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _walk_experiments(node: Any):
    if isinstance(node, list):
        for item in node:
            yield from _walk_experiments(item)
    elif isinstance(node, dict):
        if "rev" in node or "name" in node:
            yield node
        for key in ("experiments", "revs"):
            if key in node:
                yield from _walk_experiments(node[key])


def dvc_experiment_metrics(name: str, exp_show: list | None = None) -> dict:
    """Metrics of DVC experiment ``name`` (headline file first), from `dvc exp show --json`."""
    if exp_show is None:
        out = subprocess.run(["dvc", "exp", "show", "--json", "-A"], capture_output=True, text=True)
        if out.returncode != 0:
            raise DataError(f"dvc exp show failed: {out.stderr.strip().splitlines()[-1:] or ['?']}")
        exp_show = json.loads(out.stdout)
    for entry in _walk_experiments(exp_show):
        if name not in (entry.get("name"), entry.get("rev")):
            continue
        metrics = (entry.get("data") or {}).get("metrics") or {}
        for headline in HEADLINE_FILES:
            found = metrics.get(headline, {}).get("data")
            if found:
                return dict(found)
        raise DataError(f"experiment {name}: no eval metrics ({', '.join(HEADLINE_FILES)})")
    raise DataError(f"experiment {name}: not found in `dvc exp show`")


def load_run(ref: str) -> dict:
    """A metrics file path if one exists at ``ref``, else a DVC experiment name."""
    if ref.endswith(".json") or Path(ref).is_file():
        return read_metrics_file(ref)
    return dvc_experiment_metrics(ref)
