"""Training progress for people and for DVC: a log file, a terminal view, dvclive curves.

Only rank 0 reports; other ranks get a reporter whose methods do nothing.
On a terminal the progress is a tqdm bar (steps, tokens/s, ETA) with log lines
printed above it; when stdout is not a terminal (CI, `dvc repro` piped to a
file) the same lines are printed plainly, so logs stay readable.

Curves are kept as a list of rows (one per logged step) so the resume
state can carry them: DVC deletes the stage's outputs before re-running
it, and replaying the rows keeps a resumed run's curves complete.

The log and the curve folder are written under their pending names
(``.train.log.partial``, ``.live.partial``; pgolf.io.pending_path) and take
their real names only when the run succeeds (``close(succeeded=True)``), so a
failed or killed run never overwrites the last good run's. A resumed run
appends to the partial log of the run it resumes.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TextIO

from pgolf.io import pending_path, publish

CURVE_STEP = "step"


class TrainReporter:
    def __init__(self, log_path: Path | None, live_dir: Path | None, total_steps: int,
                 enabled: bool, append: bool = False, stream: TextIO | None = None):
        self.enabled = enabled
        self.rows: list[dict[str, float]] = []
        self._stream = stream if stream is not None else sys.stdout
        self._log_file = None
        self._bar = None
        self._live = None
        self._outputs = [path for path in (log_path, live_dir) if path is not None] if enabled else []
        if not enabled:
            return
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            # A resumed run continues the log of the run it resumes: its partial log, or
            # the published one if that run got as far as publishing it.
            pending = pending_path(log_path)
            if append and not pending.exists() and log_path.is_file():
                shutil.copyfile(log_path, pending)
            self._log_file = open(pending, "a" if append else "w", encoding="utf-8")
        if live_dir is not None:
            from dvclive import Live
            # dvclive empties its folder on start; the curves are complete from the replayed rows
            self._live = Live(str(pending_path(live_dir)), dvcyaml=False, save_dvc_exp=False, report=None)
        if self._stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=self._stream)

    def line(self, text: str) -> None:
        """One log line: to the log file and to the terminal (above the bar)."""
        if not self.enabled:
            return
        if self._log_file is not None:
            self._log_file.write(text + "\n")
            self._log_file.flush()
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def progress(self, step: int, tokens_per_s: float) -> None:
        """Advance the bar to ``step`` (no-op without a terminal)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(f"{tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
            self._bar.refresh()

    def curve(self, step: int, values: dict[str, float]) -> None:
        """One point of every named curve at ``step``."""
        if not self.enabled:
            return
        row = {CURVE_STEP: step, **values}
        self.rows.append(row)
        self._log_row(row)

    def replay(self, rows: list[dict[str, float]]) -> None:
        """Re-log the curve rows of an interrupted run (resume)."""
        for row in rows:
            if self.enabled:
                self.rows.append(dict(row))
                self._log_row(row)

    def _log_row(self, row: dict[str, float]) -> None:
        if self._live is None:
            return
        self._live.step = int(row[CURVE_STEP])
        for name, value in row.items():
            if name != CURVE_STEP:
                self._live.log_metric(name, float(value))
        self._live.next_step()

    def close(self, succeeded: bool = True) -> None:
        """Close the files; if ``succeeded``, the log and curves replace the last run's."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._live is not None:
            self._live.end()
            self._live = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if succeeded:
            for path in self._outputs:
                publish(path)
        self._outputs = []
