"""Which artifact and which bundle a result belongs to: the checks that keep export from pairing stale numbers.

Every result export reads names the files it was computed from by sha256:

* ``artifacts/size.json``: ``artifact_sha256`` of the model.ptz it measured, and
  the bundle's bytes (``code_bytes``, ``code_files == [bundle]``);
* ``artifacts/eval_{sliding,ttt}/metrics.json``: ``artifact_sha256`` of the
  artifact they scored;
* ``artifacts/bundle/metrics.json``: ``sha256`` of train_gpt.py, whose
  embedded params must be today's params.yaml;
* ``artifacts/budget.json``: ``artifact_sha256`` copied from the sliding eval.

A mismatch or a missing key is a DataError naming the file and the stage to
re-run: never a silently stale number (the export of a new model.ptz with an
older model's TTT score, issue 18 item 4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pgolf.errors import DataError
from pgolf.pipeline.paths import BUNDLE


def check_computed_from(where: Path, data: Mapping[str, Any], key: str, expected_sha: str, what: Path,
                        stage: str) -> None:
    """``data[key]`` must be the sha256 of ``what`` (``expected_sha``)."""
    recorded = data.get(key)
    if not isinstance(recorded, str):
        raise DataError(f"{where}: no '{key}' (it does not say which {what.name} it was computed from); "
                        f"re-run the {stage} stage")
    if recorded != expected_sha:
        raise DataError(f"{where}: computed from {what.name} sha256 {recorded[:12]}…, but {what} is now "
                        f"{expected_sha[:12]}…; stale, re-run the {stage} stage (dvc repro)")


def check_size_report(root: Path, size: Mapping[str, Any], artifact: Path, artifact_sha: str) -> None:
    """size.json must describe today's artifact and bundle."""
    where = root / "artifacts/size.json"
    for key in ("code_bytes", "model_bytes", "total_bytes", "limit"):
        value = size.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{where}: key '{key}' missing or not an integer")
    if not isinstance(size.get("fits"), bool):
        raise DataError(f"{where}: key 'fits' (true/false) is required")
    if size.get("code_files") != [BUNDLE.as_posix()]:
        raise DataError(f"{where}: counts {size.get('code_files')!r}, not the bundle {BUNDLE}; "
                        "re-run the size_check stage")
    check_computed_from(where, size, "artifact_sha256", artifact_sha, artifact, "size_check")
    bundle_bytes = (root / BUNDLE).stat().st_size
    if bundle_bytes != size["code_bytes"]:
        raise DataError(f"{where}: code_bytes {size['code_bytes']:,} but {BUNDLE} is {bundle_bytes:,} bytes; "
                        "size.json is stale, re-run the size_check stage")


def check_bundle(root: Path, bundle_metrics: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle must be the one its metrics describe, built from today's params; returns its index."""
    from pgolf.submission.bundle import read_bundle
    where = root / "artifacts/bundle/metrics.json"
    index = read_bundle(root / BUNDLE)
    check_computed_from(where, bundle_metrics, "sha256", index["sha256"], root / BUNDLE, "bundle")
    if index["params"] != dict(params):
        raise DataError(f"{root / BUNDLE}: embeds other params than {root / 'params.yaml'}; "
                        "stale, re-run the bundle stage (dvc repro)")
    return index

