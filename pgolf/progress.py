"""Progress of a long stage for people: a log file, a tqdm bar on a terminal, plain lines otherwise.

Library loops take an optional ``progress`` argument (default None: silent,
which keeps tests quiet) and call ``progress.start(task, total, unit)`` once
per phase, then ``progress.advance(n, tokens)`` as work items finish.
:class:`StageLog` is what the stages pass; only rank 0 enables it.

The log file gets every line, progress included, so a finished run's log
shows its rates. Progress goes to the log at each tenth of a task, and to
stdout the same way when stdout is not a terminal (CI, ``dvc repro`` piped to
a file); a terminal gets a live tqdm bar instead. The file is written as the
stage runs to ``.NAME.partial`` beside it (pgolf.io.pending_path), which can be
followed, and takes the log's name only when the stage succeeds: a failed or
killed run leaves the last good run's log as it was, and its own partial log
(ending in a ``failed:`` line) beside it.

The loops report from host-side counts and never synchronise the device for
it, so on a GPU a rate is of work queued: ahead at first, then held to the
device's pace once the launch queue is full.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, TextIO

from pgolf.io import pending_path, publish


class Progress(Protocol):
    def start(self, task: str, total: int | None, unit: str) -> None: ...

    def advance(self, n: int = 1, tokens: int = 0) -> None: ...


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageLog:
    """Context manager for one stage's log file and progress view (see the module docstring).

    ``lines_per_task`` plain progress lines per task of known total; with an
    unknown total (None) a line every ``lines_per_task`` items.
    """

    def __init__(self, path: Path | None, enabled: bool = True, stream: TextIO | None = None,
                 lines_per_task: int = 10):
        self.enabled = enabled
        self._path = path
        self._stream = stream if stream is not None else sys.stdout
        self._lines = max(1, lines_per_task)
        self._file: TextIO | None = None
        self._bar = None
        self._task, self._unit, self._total = "", "items", None
        self._done = self._tokens = self._next_line = 0
        self._began = time.perf_counter()

    def __enter__(self) -> "StageLog":
        if self.enabled and self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(pending_path(self._path), "w", encoding="utf-8")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close_bar()
        if self._file is not None:
            # The stage's own error line goes to stderr; the log keeps a copy.
            if exc is not None:
                self._file.write(f"failed: {type(exc).__name__}: {exc}\n")
            self._file.close()
            self._file = None
            if exc is None and self._path is not None:
                publish(self._path)

    def line(self, text: str) -> None:
        """One line to the log file and to stdout (above the bar on a terminal)."""
        if not self.enabled:
            return
        self._write_file(text)
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def warning(self, text: str) -> None:
        """``warning: text`` to the log file and to stderr."""
        if not self.enabled:
            return
        self._write_file(f"warning: {text}")
        print(f"warning: {text}", file=sys.stderr, flush=True)

    def start(self, task: str, total: int | None, unit: str) -> None:
        """Begin a task of ``total`` ``unit`` (plural, e.g. "windows"; None: unknown); resets the counters."""
        if not self.enabled:
            return
        self._close_bar()
        self._task, self._unit, self._total = task, unit, total
        self._done = self._tokens = 0
        self._next_line = self._step()
        self._began = time.perf_counter()
        self.line(f"{task}: {'?' if total is None else f'{total:,}'} {unit}")
        if self._stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=task, unit=unit, dynamic_ncols=True, file=self._stream)

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        """``n`` more items done, covering ``tokens`` tokens (0 when items are not token work)."""
        if not self.enabled:
            return
        self._done += n
        self._tokens += tokens
        elapsed = time.perf_counter() - self._began
        if self._bar is not None:
            self._bar.update(n)
            if self._tokens:
                self._bar.set_postfix_str(f"{self._tokens / max(elapsed, 1e-9) / 1e3:,.1f}k tok/s",
                                          refresh=False)
        finished = self._total is not None and self._done >= self._total
        if self._done >= self._next_line or finished:
            while self._next_line <= self._done:
                self._next_line += self._step()
            text = self.status(elapsed)
            self._write_file(text)
            if self._bar is None:
                print(text, file=self._stream, flush=True)

    def status(self, elapsed: float) -> str:
        """``task: done/total unit (pct) rate, elapsed, ETA`` for the current counters."""
        done = f"{self._done:,}"
        if self._total:
            done += f"/{self._total:,} {self._unit} ({100 * self._done / self._total:.0f}%)"
        else:
            done += f" {self._unit}"
        rate = (f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s" if self._tokens
                else f"{self._done / max(elapsed, 1e-9):,.2f} {self._unit}/s")
        text = f"{self._task}: {done}, {rate}, elapsed {format_seconds(elapsed)}"
        if self._total and 0 < self._done < self._total:
            text += f", ETA {format_seconds(elapsed / self._done * (self._total - self._done))}"
        return text

    def _step(self) -> int:
        """Items between plain progress lines."""
        if not self._total:
            return self._lines
        return max(1, -(-self._total // self._lines))

    def _write_file(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
