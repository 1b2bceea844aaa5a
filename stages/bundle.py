"""Stage bundle: pgolf's submission code + the resolved params → artifacts/bundle/train_gpt.py.

What the file holds and how it runs: pgolf/submission/bundle.py. Also writes
``reserved_bytes.json`` (the code bytes quantize's byte target sets aside: the
file's size rounded up to ``bundle.reserve_quantum``, pgolf/submission/limits.py,
so an eval-only params edit re-runs no quantize) and ``metrics.json`` (bytes raw
vs counted, the reserve, the module list, sha256).
"""
from __future__ import annotations

from pathlib import Path

from pgolf.io import write_json_atomic, write_text_atomic
from pgolf.submission.bundle import build_bundle
from pgolf.submission.driver import RunConfig
from pgolf.pipeline.paths import BUNDLE, BUNDLE_METRICS, BUNDLE_RESERVE
from pgolf.submission.limits import reserved_code_bytes
from pgolf.pipeline.launch import params, stage_main

METRICS = BUNDLE_METRICS
# The bundle packs the code that is running this stage (under DVC: the repository it runs in).
CODE_ROOT = Path(__file__).resolve().parents[1]


def run(p: dict, root: Path = Path(".")) -> dict:
    """Build the bundle of this code and ``p``, write it under ``root``; return its metrics."""
    cfg = RunConfig.from_params(p)  # the driver would refuse these params at run time: refuse them now
    bundle = build_bundle(CODE_ROOT, p, cfg.bundle.strip_docstrings)
    write_text_atomic(root / BUNDLE, bundle.text)
    reserved = reserved_code_bytes(bundle.counted_bytes, cfg.bundle.reserve_quantum)
    write_json_atomic(root / BUNDLE_RESERVE, {"reserved_bytes": reserved})
    metrics = {**bundle.metrics(), "reserved_bytes": reserved}
    write_json_atomic(root / METRICS, metrics)
    return metrics


@stage_main
def main() -> None:
    m = run(params())
    print(f"bundle: {m['num_modules']} modules, {m['source_bytes']:,} bytes of source ({m['raw_bytes']:,} packed) "
          f"-> {m['counted_bytes']:,} counted ({BUNDLE})")


if __name__ == "__main__":
    main()
