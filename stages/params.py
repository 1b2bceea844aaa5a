"""Stage params: params.yaml → artifacts/params/validated.json, every key checked before any other stage runs.

DVC removes a stage's outputs before running its command, so a bad value
found by the train stage itself would cost train's last good results. This
stage runs first (every other stage depends on its output) and depends on
the whole of params.yaml, so any edit, an added key too (``train.max_step``,
``dvc exp run -S +train.max_step=100``), runs it (pgolf/pipeline/params_check.py).

The output names the sections checked, never their values: it changes only
when a section is added or removed, so a valid edit re-runs just the stages
that list the edited key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from pgolf.io import write_json_atomic
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.params_check import check_params
from pgolf.pipeline.paths import PARAMS_RECORD as OUT


def run(p: Mapping, root: Path = Path(".")) -> dict:
    """Check ``p`` and write the record of what was checked under ``root``."""
    record = {"checked": "params.yaml", "sections": check_params(p)}
    write_json_atomic(root / OUT, record)
    return record


@stage_main
def main() -> None:
    p = params()
    run(p)
    print(f"params: params.yaml is valid ({sum(len(v) for v in p.values() if isinstance(v, dict))} keys "
          f"in {len(p)} sections)")


if __name__ == "__main__":
    main()
