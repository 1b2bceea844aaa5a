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
* training log: its ``train:`` / ``step N/M loss`` lines; a stage log
  (hessians, quantize, eval_sliding, eval_ttt): its first line, which names the stage;
* live training curves (dvclive ``plots/metrics/*.tsv``): a ``step<TAB>name`` header;
* PNG plots: the PNG signature.
* submission bundle (``train_gpt.py``): its first line ``# pgolf submission bundle``.

Each summariser (``pgolf/tools/inspect_data.py``, ``inspect_model.py``,
``inspect_reports.py``) returns a :class:`~pgolf.tools.inspect_summary.Summary`:
JSON-able facts plus the lines a person reads. A file that is not recognised, or that is recognised but
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
from pathlib import Path
from typing import Callable

from pgolf.errors import DataError, PgolfError
from pgolf.pipeline.paths import TOKENIZER_MODEL as DEFAULT_TOKENIZER
from pgolf.tools.inspect_summary import (DEFAULT_SLICE_TOKENS, STAGE_LOG_FIRST_LINE, InspectOptions, Summary,
                                         UnrecognisedFile,
                                         natural_key, one_line)

# Bytes read to recognise a file; every magic number fits in them.
_SNIFF_BYTES = 64
_TORCH_ZIP_SIGNATURE = b"PK\x03\x04"
# SentencePiece models are a few MB; a bigger file is not offered to the parser.
_MAX_TOKENIZER_BYTES = 64 << 20
_TRAIN_LOG_LINE = re.compile(r"^(train: [\d,]+ parameters|step \d+/\d+ loss )", re.MULTILINE)
_LIVE_TSV_HEADER = re.compile(rb"^step\t[A-Za-z_][\w.]*\r?\n")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    if head.startswith(_PNG_SIGNATURE):
        return "plot_image"
    if _LIVE_TSV_HEADER.match(head):
        return "live_curve"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return "corpus_jsonl" if _first_line_is_document(path) else "json"
    # A SentencePiece ModelProto starts with field 1 (pieces), tag byte 0x0a.
    if head[:1] == b"\n" and path.stat().st_size <= _MAX_TOKENIZER_BYTES and _is_sentencepiece(path):
        return "tokenizer"
    with open(path, "rb") as f:
        text = f.read(4096)
    if _is_train_log(text):
        return "train_log"
    if STAGE_LOG_FIRST_LINE.match(text.decode("utf-8", errors="replace")):
        return "stage_log"
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
            "stage_log": lambda p, o: inspect_reports.summarise_stage_log(p),
            "live_curve": lambda p, o: inspect_reports.summarise_live_curve(p),
            "plot_image": lambda p, o: inspect_reports.summarise_png(p),
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
