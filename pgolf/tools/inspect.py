"""`pgolf inspect PATH`: recognise any file the pipeline writes and summarise it.

Files are recognised by content, not by name, so a renamed or copied file is
still understood:

* ``.ptz`` quantised artifact: the ``PGOLFQZ\\n`` magic;
* token shard: the int32 magic 20240520 in the first 4 bytes;
* ``torch.save`` files (checkpoint, weight averages, Hessians, resume state):
  the zip signature, then the payload's ``format`` tag or keys;
* JSON reports (size, eval metrics, manifests, quantisation report, ...):
  their key sets; corpus JSONL: a first line ``{"text": ...}``;
* SentencePiece model: a protobuf that SentencePiece itself accepts;
* training log: its ``train:`` / ``step N/M loss`` lines;
* submission bundle (``train_gpt.py``): its first line ``# pgolf submission bundle``.

Each summariser (``pgolf/tools/inspect_data.py``, ``inspect_model.py``,
``inspect_reports.py``) returns a :class:`Summary`: JSON-able facts plus the
lines a person reads. A file that is not recognised, or that is recognised but
fails its loader's checks, is a DataError: ``error: <path>: <what>``, exit 1.
A directory summarises every file under it (hidden files skipped); files that
are not pipeline artifacts are listed as skipped, corrupt ones as errors.

Heavy libraries (torch, sentencepiece) are imported only when a file needs
them, so building the ``pgolf`` command line stays fast.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pgolf.errors import DataError, PgolfError

DEFAULT_TOKENIZER = Path("data/tokenizer/tokenizer.model")
DEFAULT_SLICE_TOKENS = 64
# Bytes read to recognise a file; every magic number fits in them.
_SNIFF_BYTES = 64
_TORCH_ZIP_SIGNATURE = b"PK\x03\x04"
# SentencePiece models are a few MB; a bigger file is not offered to the parser.
_MAX_TOKENIZER_BYTES = 64 << 20
_TRAIN_LOG_LINE = re.compile(r"^(train: [\d,]+ parameters|step \d+/\d+ loss )", re.MULTILINE)

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
    "bundle": "submission bundle (self-extracting train_gpt.py)",
    "bundle_metrics": "bundle stage metrics",
    "budget_report": "time budgets (training, eval)",
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


# --- recognition -------------------------------------------------------------------

def _first_line_is_document(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline()
    try:
        record = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and isinstance(record.get("text"), str)


def _is_sentencepiece(path: Path) -> bool:
    import sentencepiece as spm
    try:
        spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except (RuntimeError, OSError):
        return False
    return True


def _is_train_log(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _TRAIN_LOG_LINE.search(text) is not None


def sniff(path: Path) -> str | None:
    """The reader a file's content calls for (``shard``, ``torch``, ``json``, ...), or None."""
    from pgolf.quant.artifact import MAGIC as ARTIFACT_MAGIC
    from pgolf.data.shards import MAGIC as SHARD_MAGIC
    from pgolf.submission.bundle import FIRST_LINE as BUNDLE_FIRST_LINE

    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(ARTIFACT_MAGIC):
        return "quantized_artifact"
    if head.startswith(BUNDLE_FIRST_LINE.encode("ascii")):
        return "bundle"
    if len(head) >= 4 and int.from_bytes(head[:4], "little", signed=True) == SHARD_MAGIC:
        return "shard"
    if head.startswith(_TORCH_ZIP_SIGNATURE):
        return "torch"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return "corpus_jsonl" if _first_line_is_document(path) else "json"
    # A SentencePiece ModelProto starts with field 1 (pieces), tag byte 0x0a.
    if head[:1] == b"\n" and path.stat().st_size <= _MAX_TOKENIZER_BYTES and _is_sentencepiece(path):
        return "tokenizer"
    with open(path, "rb") as f:
        if _is_train_log(f.read(4096)):
            return "train_log"
    return None


def _summariser(reader: str) -> Callable[[Path, InspectOptions], Summary]:
    if reader in ("corpus_jsonl", "tokenizer", "shard"):
        from pgolf.tools import inspect_data
        return {"corpus_jsonl": lambda p, o: inspect_data.summarise_corpus(p),
                "tokenizer": lambda p, o: inspect_data.summarise_tokenizer(p),
                "shard": inspect_data.summarise_shard}[reader]
    if reader in ("torch", "quantized_artifact"):
        from pgolf.tools import inspect_model
        return {"torch": lambda p, o: inspect_model.summarise_torch_file(p),
                "quantized_artifact": lambda p, o: inspect_model.summarise_artifact(p)}[reader]
    from pgolf.tools import inspect_reports
    return {"json": lambda p, o: inspect_reports.summarise_json(p),
            "train_log": lambda p, o: inspect_reports.summarise_train_log(p),
            "bundle": lambda p, o: inspect_reports.summarise_bundle(p)}[reader]


def summarise_file(path: Path, options: InspectOptions) -> Summary:
    """Recognise and summarise one file; DataError naming it when it is unknown or corrupt."""
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.stat().st_size == 0:
        raise UnrecognisedFile(f"{path}: empty file; not a pgolf artifact")
    try:
        reader = sniff(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if reader is None:
        raise UnrecognisedFile(f"{path}: unrecognised file (no pgolf artifact magic, JSON keys or log lines)")
    try:
        return _summariser(reader)(path, options)
    except PgolfError as exc:
        if "\n" in str(exc):
            raise DataError(one_line(exc)) from None
        raise
    except Exception as exc:  # foreign bytes can break a library parser in any way; never a traceback
        raise DataError(f"{path}: cannot summarise this {reader} file ({type(exc).__name__}: "
                        f"{one_line(exc)})") from None


# --- directories -------------------------------------------------------------------

_SHARD_SPLIT = re.compile(r"(train|val)_\d+\.bin$")


def _shard_splits(summaries: list[Summary]) -> dict[str, dict[str, int]]:
    splits: dict[str, dict[str, int]] = {}
    for s in summaries:
        match = _SHARD_SPLIT.search(Path(s.path).name)
        if s.kind == "shard" and match:
            totals = splits.setdefault(match.group(1), {"files": 0, "tokens": 0, "documents": 0})
            totals["files"] += 1
            totals["tokens"] += s.facts["num_tokens"]
            totals["documents"] += s.facts["documents"]
    return splits


def summarise_directory(path: Path, options: InspectOptions) -> tuple[Summary, list[Summary], list[str]]:
    """(directory summary, file summaries, error lines) for every visible file under ``path``.

    Files that are not pipeline artifacts are skipped; recognised but corrupt
    ones are errors. Shard slices are not decoded here (a listing is an overview).
    """
    quiet = InspectOptions(tokenizer=None, offset=0, count=0)
    summaries: list[Summary] = []
    skipped: list[str] = []
    errors: list[str] = []
    files = sorted((p for p in path.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: natural_key(p.as_posix()))
    for file in files:
        try:
            summaries.append(summarise_file(file, quiet))
        except UnrecognisedFile:
            skipped.append(str(file))
        except PgolfError as exc:
            errors.append(one_line(exc))
        except OSError as exc:
            errors.append(f"{file}: cannot read ({exc.strerror})")
    splits = _shard_splits(summaries)
    lines = [f"{len(files)} files: {len(summaries)} recognised, {len(skipped)} skipped, {len(errors)} errors"]
    for split, t in sorted(splits.items()):
        lines.append(f"{split} shards: {t['files']} files, {t['tokens']:,} tokens, {t['documents']:,} documents")
    lines += [f"skipped (not a pgolf artifact): {s}" for s in skipped]
    facts = {"files": [s.to_json() for s in summaries], "skipped": skipped, "errors": errors,
             "shard_splits": splits}
    return Summary("directory", str(path), facts, lines), summaries, errors


# --- command -----------------------------------------------------------------------

def _options(args: argparse.Namespace) -> InspectOptions:
    if args.offset < 0 or args.count < 0:
        raise PgolfError("inspect: --offset and --count must be >= 0")
    if args.tokenizer is not None:
        return InspectOptions(Path(args.tokenizer), True, args.offset, args.count)
    default = DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.is_file() else None
    return InspectOptions(default, False, args.offset, args.count)


def run_inspect(args: argparse.Namespace) -> int:
    """Print the summary of ``args.path``; 1 when any file in it was corrupt or unknown."""
    path = Path(args.path)
    options = _options(args)
    if path.is_dir():
        directory, summaries, errors = summarise_directory(path, options)
        if args.json:
            print(json.dumps(directory.to_json(), indent=2, ensure_ascii=False))
        else:
            print("\n\n".join([directory.to_text()] + [s.to_text() for s in summaries]))
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1 if errors else 0
    summary = summarise_file(path, options)
    print(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) if args.json else summary.to_text())
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="recognise and summarise any pipeline artifact")
    parser.add_argument("path", help="a file or directory the pipeline wrote (recognised by content)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--tokenizer", default=None,
                        help=f"shards: SentencePiece model to decode with (default {DEFAULT_TOKENIZER} if present)")
    parser.add_argument("--offset", type=int, default=0, help="shards: first token of the shown slice")
    parser.add_argument("--count", type=int, default=DEFAULT_SLICE_TOKENS,
                        help=f"shards: tokens in the shown slice (default {DEFAULT_SLICE_TOKENS}; 0 = none)")
    parser.set_defaults(func=run_inspect)
