"""Launcher of the torchrun stages: ``python -m pgolf.pipeline.launcher NPROC stages.<name>``.

dvc.yaml runs each multi-process stage through this instead of calling
torchrun directly, for two reasons:

- One line on failure. torchrun reports a failed worker with a ~34-line
  ChildFailedError block that buries the stage's own ``error:`` line. Here
  the stderr of torchrun and its workers goes to ``artifacts/logs/<name>.log``
  (``warning:`` lines are still shown as they come); on failure exactly one
  line is printed: the stage's last ``error:`` line (or, after a crash, the
  worker's exception), with the log's path.
- No orphans. ``kill -9`` of ``dvc`` cannot stop its children; each link of
  dvc → launcher → torchrun → worker is told by Linux to die with its parent
  (PR_SET_PDEATHSIG; the workers do it in pgolf.pipeline.launch.run_distributed).

``NPROC`` is checked first (``launch.nproc_per_node: 0`` is one line, not a
torchrun AssertionError).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from pgolf.errors import PgolfError
from pgolf.pipeline.paths import LAUNCH_LOG_DIR
from pgolf.pipeline.launch import check_nproc_per_node, die_with_parent

LOG_DIR = LAUNCH_LOG_DIR
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")
TORCHRUN_OWN = "ChildFailedError"  # torchrun's report, not the worker's cause


def torchrun_command(nproc: int | str, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module]


def failure_line(stderr_lines: list[str], module: str, returncode: int) -> str:
    """The one line that says why the stage failed (without the log's path)."""
    errors = [ln for ln in stderr_lines if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    causes = [ln for ln in stderr_lines if EXCEPTION_LINE.match(ln) and TORCHRUN_OWN not in ln]
    if causes:
        return f"error: {module}: {causes[0]}"
    return f"error: {module}: failed with exit status {returncode}"


def _child_setup(parent: int) -> None:
    """In torchrun, before exec: die with the launcher, take Ctrl-C (which the launcher ignores)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL, parent)


def launch(nproc: int | str, module: str, log_path: Path) -> int:
    """Run ``module`` under torchrun; stderr to ``log_path``; return the exit status to report."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    lines: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        child = subprocess.Popen(torchrun_command(nproc, module), stderr=subprocess.PIPE,
                                 preexec_fn=lambda: _child_setup(me))
        # Ctrl-C reaches the whole foreground group: torchrun and its workers stop on
        # their own and the launcher reports; a SIGTERM sent to the launcher alone is passed on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        assert child.stderr is not None
        for raw in child.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            log.write(line + "\n")
            log.flush()
            if line.startswith("error: ") or EXCEPTION_LINE.match(line):
                lines.append(line)  # the candidates for failure_line, not the whole log
            if line.startswith("warning: "):
                print(line, file=sys.stderr, flush=True)
        returncode = child.wait()
    if returncode != 0:
        print(f"{failure_line(lines, module, returncode)} (full log: {log_path})", file=sys.stderr, flush=True)
        return 130 if returncode in (130, -signal.SIGINT) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    if len(argv) != 2 or not argv[1].startswith("stages."):
        print("usage: python -m pgolf.pipeline.launcher NPROC_PER_NODE stages.<name>", file=sys.stderr)
        sys.exit(2)
    try:
        nproc = check_nproc_per_node(argv[0])
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    module = argv[1]
    sys.exit(launch(nproc, module, LOG_DIR / f"{module.split('.', 1)[1]}.log"))


if __name__ == "__main__":
    main()
