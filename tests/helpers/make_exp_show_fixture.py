"""Regenerate tests/fixtures/dvc_exp_show_sweep.json: real `dvc exp show --json`
output of a real queued sweep (DVC 3.67), for tests/tools/test_reliability_tools.py.

    PYTHONPATH=$PWD DVC_NO_ANALYTICS=1 python tests/helpers/make_exp_show_fixture.py [SCRATCH_DIR]

Sets up the tiny git+DVC project of tests/helpers/sweep.py (the real dvc.yaml and
conf/ with tiny overrides), runs `dvc repro`, queues
`dvc exp run --queue -S quantize.damp=0.01,0.02,0.05,0.1`, runs the queue and
saves `dvc exp show --json` under tests/fixtures/. Takes ~25 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tests.helpers.sweep import make_project  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "dvc_exp_show_sweep.json"
SWEEP = "quantize.damp=0.01,0.02,0.05,0.1"


def main() -> None:
    root = make_project(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "proj")
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    run(["dvc", "exp", "run", "--queue", "-S", SWEEP], root)
    run(["dvc", "exp", "run", "--run-all", "-j", "1"], root)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root))
    FIXTURE.write_text(json.dumps(shown, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} from {root}")


def run(cmd: list[str], cwd: Path) -> str:
    """stdout of ``cmd`` (the queue of four runs takes ~20 min on 2 busy cores)."""
    import os
    import subprocess
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


if __name__ == "__main__":
    main()
