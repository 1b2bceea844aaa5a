"""Read runs' metrics from metrics JSON files or from DVC experiments (`dvc exp show --json`).

`dvc exp show --json` (DVC 3.x) is a list of commits ``{"rev", "name", "data",
"experiments"}``; each commit's ``experiments`` is a list of *wrappers*
``{"name", "executor", "revs": [...]}`` whose ``revs`` hold the experiment's
own ``{"rev", "name", "data"}`` entries. Only entries with a ``rev`` carry
``data`` (params and metrics); a wrapper's ``name`` is given to its revs that
lack one. An experiment is found by its name, its full SHA or a SHA prefix of at
least 7 characters (what `dvc exp show` prints).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pgolf.errors import DataError
from pgolf.pipeline.paths import EVAL_SLIDING_DIR, EVAL_TTT_DIR

# Later stages' metrics win: the TTT score is the headline when TTT ran.
HEADLINE_FILES = tuple((d / "metrics.json").as_posix() for d in (EVAL_TTT_DIR, EVAL_SLIDING_DIR))
_MIN_SHA_PREFIX = 7


@dataclass(frozen=True)
class Experiment:
    """One `dvc exp show` entry: a commit, the workspace or an experiment."""

    name: str | None
    rev: str
    data: dict          # {"params": ..., "metrics": ..., ...}; {} while queued or failed
    state: str | None   # the executor's state (success, running, queued, failed), None for commits
    baseline: str | None  # the commit an experiment is based on; None for commits and the workspace

    @property
    def label(self) -> str:
        return self.name or (self.rev[:_MIN_SHA_PREFIX] if len(self.rev) == 40 else self.rev)

    def metrics(self, path: str) -> dict:
        found = ((self.data.get("metrics") or {}).get(path) or {}).get("data")
        return dict(found) if isinstance(found, dict) else {}

    def params(self) -> dict:
        return ((self.data.get("params") or {}).get("params.yaml") or {}).get("data") or {}

    def matches(self, ref: str) -> bool:
        return ref in (self.name, self.rev) or (len(ref) >= _MIN_SHA_PREFIX and self.rev.startswith(ref))


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


def experiments(exp_show: Any) -> Iterator[Experiment]:
    """Every commit, workspace and experiment entry of `dvc exp show --json`, in its order."""
    for commit in exp_show if isinstance(exp_show, list) else []:
        if not isinstance(commit, dict) or not isinstance(commit.get("rev"), str):
            continue
        yield Experiment(commit.get("name"), commit["rev"], commit.get("data") or {}, None, None)
        for wrapper in commit.get("experiments") or []:
            if not isinstance(wrapper, dict):
                continue
            state = (wrapper.get("executor") or {}).get("state")
            for entry in wrapper.get("revs") or []:
                if isinstance(entry, dict) and isinstance(entry.get("rev"), str):
                    yield Experiment(entry.get("name") or wrapper.get("name"), entry["rev"],
                                     entry.get("data") or {}, state, commit["rev"])


def run_dvc_exp_show(all_commits: bool = False) -> list:
    """`dvc exp show --json` (``-A``: every commit) in the current directory, parsed."""
    cmd = ["dvc", "exp", "show", "--json"] + (["-A"] if all_commits else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError("dvc exp show: the dvc command is not installed") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise DataError(f"dvc exp show failed: {last}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as exc:
        raise DataError(f"dvc exp show: output is not JSON ({exc})") from None


def dvc_experiment_metrics(name: str, exp_show: list | None = None) -> dict:
    """Metrics of DVC experiment ``name`` (headline file first), from `dvc exp show --json`."""
    if exp_show is None:
        exp_show = run_dvc_exp_show(all_commits=True)
    for exp in experiments(exp_show):
        if not exp.matches(name):
            continue
        for headline in HEADLINE_FILES:
            found = exp.metrics(headline)
            if found:
                return found
        state = f" (state: {exp.state})" if exp.state and exp.state != "success" else ""
        raise DataError(f"experiment {name}: no eval metrics ({', '.join(HEADLINE_FILES)}){state}")
    raise DataError(f"experiment {name}: not found in `dvc exp show`")


def load_run(ref: str) -> dict:
    """A metrics file path if one exists at ``ref``, else a DVC experiment name."""
    if ref.endswith(".json") or Path(ref).is_file():
        return read_metrics_file(ref)
    return dvc_experiment_metrics(ref)
