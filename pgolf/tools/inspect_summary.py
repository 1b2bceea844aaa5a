"""What every ``pgolf inspect`` summariser returns (:class:`Summary`) and the formatting helpers they share.

Kept apart from the command (``pgolf/tools/inspect.py``) so that the
summarisers import this and the command imports them, with no cycle.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pgolf.errors import DataError

DEFAULT_SLICE_TOKENS = 64

# The first line of a pgolf.progress.StageLog log names its stage ("quantize (gptq): 12 matrices").
STAGE_LOG_FIRST_LINE = re.compile(r"^(hessians|quantize|eval_sliding|eval_ttt)( \([^)\n]*\))?: ")

KIND_TITLES = {
    "corpus_jsonl": "corpus documents (JSONL)",
    "tokenizer": "SentencePiece tokenizer model",
    "shard": "token shard",
    "checkpoint": "training checkpoint",
    "train_averages": "training weight averages (live / EMA / SWA)",
    "resume_state": "training resume state",
    "hessians": "GPTQ Hessians",
    "quantized_artifact": "quantised model artifact (.ptz)",
    "size_report": "submission size report",
    "eval_sliding_metrics": "sliding-window eval metrics",
    "eval_ttt_metrics": "legal TTT eval metrics",
    "ttt_chunks": "TTT per-chunk bpb series",
    "quant_report": "per-tensor quantisation report",
    "quant_metrics": "quantize stage metrics",
    "train_metrics": "training metrics",
    "train_config": "resolved training configuration",
    "hessian_metrics": "hessians stage metrics",
    "corpus_manifest": "corpus manifest",
    "shards_manifest": "shards manifest",
    "tokenizer_meta": "tokenizer meta",
    "data_metrics": "data stage metrics",
    "submission": "exported submission summary",
    "train_log": "training log",
    "stage_log": "stage log",
    "layer_error": "per-matrix quantisation error (DVC plot data)",
    "live_metrics": "live training metrics (dvclive, latest step)",
    "live_curve": "live training curve (dvclive TSV)",
    "plot_image": "plot image (PNG)",
    "bundle": "submission bundle (self-extracting train_gpt.py)",
    "bundle_metrics": "bundle stage metrics",
    "budget_report": "ten-minute budget report",
    "driver_results": "results of a bundle run (train_gpt.py)",
    "directory": "directory",
}


class UnrecognisedFile(DataError):
    """The file is readable but not one the pipeline writes (a directory listing skips it)."""


@dataclass(frozen=True)
class InspectOptions:
    """How shard slices are shown. ``tokenizer`` None: ids only, no text."""

    tokenizer: Path | None = None
    tokenizer_required: bool = False  # given explicitly: missing is an error, not a note
    offset: int = 0
    count: int = DEFAULT_SLICE_TOKENS


@dataclass(frozen=True)
class Summary:
    kind: str
    path: str
    facts: dict[str, Any]
    lines: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, **self.facts}

    def to_text(self) -> str:
        title = KIND_TITLES.get(self.kind, self.kind)
        return "\n".join([f"{self.path}: {title}"] + [f"  {line}" for line in self.lines])


# --- formatting helpers shared by the summarisers -------------------------------------

def fmt(value: Any, digits: int = 6) -> str:
    """Readable scalar: ints with thousands separators, floats to ``digits`` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned text columns; cells are passed through :func:`fmt`."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def preview(text: str, chars: int = 160) -> str:
    """First ``chars`` characters as a one-line JSON string literal (newlines escaped)."""
    short = text[:chars] + ("…" if len(text) > chars else "")
    return json.dumps(short, ensure_ascii=False)


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.10`` after ``blocks.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
