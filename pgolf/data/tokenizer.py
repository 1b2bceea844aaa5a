"""The SentencePiece tokenizer: train it the challenge's way, or check a given one;
and turn documents into BOS-separated token streams on all cores.

Training uses the challenge's trainer settings (docs/RECIPE.md §1.3). It is made
deterministic by using every training document (no sentence sampling) and one
trainer thread: the BPE trainer's result depends on its thread count (checked:
1 and 2 threads give different .model bytes), so the thread count is fixed.

Each training document is one trainer "sentence", so the piece statistics
see paragraph starts the way encoding does (NMT-NFKC turns the newlines
between paragraphs into a space, giving the next word its ``▁``).

``case_transform: caseops`` (pgolf/data/caseops.py) rewrites every document
before training and encoding, and reserves the four CaseOps control
characters as user-defined pieces. The id layout then matches the April
records' CaseOps sp8192 tokenizer (docs/FRONTIER.md §1.2): 0-3 pad/bos/eos/unk, 4-7
TITLE/ALLCAPS/CAPNEXT/ESC, then the 256 byte pieces. The layout is how a
.model says which transform it was built for (:func:`case_transform_of`).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import io
import itertools
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import sentencepiece as spm

from pgolf.config import check
from pgolf.data import caseops
from pgolf.data.corpus import iter_jsonl
from pgolf.errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE_PIECES_START = 4                 # ids 4..259 are <0x00>..<0xFF>
BYTE_PIECES_END = BYTE_PIECES_START + 256
MAX_VOCAB = 1 << 16                   # shard tokens are uint16

# docs/RECIPE.md §1.3: the challenge export script's trainer settings.
CHALLENGE_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
    hard_vocab_limit=False,
)
_DETERMINISTIC_SETTINGS = dict(num_threads=1, input_sentence_size=0, shuffle_input_sentence=False)
# Documents are sent to encoding workers in batches of about this many
# characters; batching never changes the output, only the overhead.
_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class TokenizerConfig:
    source: Literal["train", "file"]
    model_path: str        # source 'file': an existing .model; must be "" for 'train'
    vocab_size: int
    max_train_docs: int    # 'train': use only the first N training documents; 0 = all
    case_transform: caseops.CaseTransform  # none | caseops (lossless case controls, docs/FRONTIER.md §1.3)

    def __post_init__(self) -> None:
        fixed = byte_pieces_start(self.case_transform) + 256
        check(fixed < self.vocab_size <= MAX_VOCAB, "vocab_size",
              f"must be in ({fixed}, {MAX_VOCAB}] (specials, controls, 256 byte pieces, then more)")
        check(self.max_train_docs >= 0, "max_train_docs", "must be >= 0 (0 = all)")
        if self.source == "file":
            check(self.model_path != "", "model_path", "source 'file' needs a .model path")
        else:
            check(self.model_path == "", "model_path", "must be empty for source 'train'")


def byte_pieces_start(case_transform: str) -> int:
    """Id of ``<0x00>``: after the 4 specials, and after the 4 controls under CaseOps."""
    return BYTE_PIECES_START + (len(caseops.CONTROLS) if case_transform == "caseops" else 0)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_processor(model_bytes: bytes, where: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"{where}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None


def read_model(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    data = path.read_bytes()
    load_processor(data, str(path))
    return data


def train_model(docs: Sequence[str], vocab_size: int, case_transform: str = "none") -> bytes:
    """Serialized BPE model trained on ``docs``; exactly ``vocab_size`` pieces."""
    if not docs:
        raise DataError("no training documents for the tokenizer")
    docs = [caseops.apply(case_transform, d) for d in docs]
    longest = max(len(d.encode("utf-8")) for d in docs)
    reserved = dict(user_defined_symbols=list(caseops.CONTROLS)) if case_transform == "caseops" else {}
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=out, vocab_size=vocab_size,
        # the trainer silently skips longer sentences; no document may be skipped
        max_sentence_length=max(longest + 1, 4192),
        minloglevel=2, **CHALLENGE_TRAINER_SETTINGS, **_DETERMINISTIC_SETTINGS, **reserved)
    model = out.getvalue()
    got = load_processor(model, "trained tokenizer").vocab_size()
    if got != vocab_size:
        raise DataError(f"training text yields only {got} pieces, fewer than "
                        f"tokenizer.vocab_size={vocab_size}; use more text or a smaller vocab")
    return model


def case_transform_of(model_bytes: bytes, where: str = "tokenizer") -> str:
    """"caseops" if ids 4-7 are the CaseOps control pieces, else "none"."""
    return "caseops" if caseops.has_control_pieces(load_processor(model_bytes, where)) else "none"


def check_layout(model_bytes: bytes, vocab_size: int, where: str, case_transform: str = "none") -> None:
    """Require the challenge's id layout: 0-3 pad/bos/eos/unk, then (CaseOps only)
    4-7 the control pieces, then the 256 byte pieces <0x00>..<0xFF>."""
    sp = load_processor(model_bytes, where)
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{where}: vocab size {sp.vocab_size()} != tokenizer.vocab_size {vocab_size}")
    specials = {"pad": (sp.pad_id(), PAD_ID), "bos": (sp.bos_id(), BOS_ID),
                "eos": (sp.eos_id(), EOS_ID), "unk": (sp.unk_id(), UNK_ID)}
    for name, (got, want) in specials.items():
        if got != want:
            raise DataError(f"{where}: {name} id is {got}, expected {want}")
    controls = caseops.has_control_pieces(sp)
    if case_transform == "caseops" and not controls:
        raise DataError(f"{where}: ids 4-7 are not the CaseOps control pieces U+E001-U+E004 "
                        "(tokenizer.case_transform: caseops needs a CaseOps tokenizer)")
    if case_transform != "caseops" and controls:
        raise DataError(f"{where}: ids 4-7 are CaseOps control pieces; set tokenizer.case_transform: caseops")
    start = byte_pieces_start(case_transform)
    for byte in range(256):
        i = start + byte
        piece = sp.id_to_piece(i)
        if not sp.is_byte(i) or piece != f"<0x{byte:02X}>":
            raise DataError(f"{where}: id {i} is {piece!r}, expected byte-fallback piece <0x{byte:02X}>")


def build_tokenizer(cfg: TokenizerConfig, train_jsonl: Path) -> tuple[bytes, dict]:
    """(model bytes, meta) of the tokenizer stage: trained on ``train_jsonl``'s documents, or the given file,
    checked against the challenge's id layout either way."""
    meta: dict = {"source": cfg.source, "sentencepiece_version": importlib.metadata.version("sentencepiece")}
    if cfg.source == "train":
        docs = iter_jsonl(train_jsonl)
        docs = list(itertools.islice(docs, cfg.max_train_docs) if cfg.max_train_docs else docs)
        model = train_model(docs, cfg.vocab_size, cfg.case_transform)
        meta.update(train_docs=len(docs), trainer_settings=CHALLENGE_TRAINER_SETTINGS)
        where = "trained tokenizer"
    else:
        model = read_model(cfg.model_path)
        meta["model_path"] = cfg.model_path
        where = cfg.model_path
    check_layout(model, cfg.vocab_size, where, cfg.case_transform)
    meta.update(vocab_size=cfg.vocab_size, case_transform=cfg.case_transform, sha256=sha256_bytes(model))
    return model, meta


# --- encoding ---------------------------------------------------------------

_worker_sp: spm.SentencePieceProcessor | None = None
_worker_transform = "none"


def _init_worker(model_bytes: bytes, case_transform: str) -> None:
    global _worker_sp, _worker_transform
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    _worker_transform = case_transform


def _encode_batch(texts: list[str]) -> np.ndarray:
    assert _worker_sp is not None, "encoding worker not initialised"
    flat: list[int] = []
    for ids in _worker_sp.encode([caseops.apply(_worker_transform, t) for t in texts]):
        flat.append(BOS_ID)
        flat.extend(ids)
    return np.array(flat, dtype=np.uint16)


def _encode_batch_with_bytes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and, per token, the UTF-8 bytes of the original text it covers
    (BOS 0; pgolf/data/caseops.py). int64 bytes, so the caller checks the range."""
    assert _worker_sp is not None, "encoding worker not initialised"
    transformed = [caseops.apply(_worker_transform, t) for t in texts]
    try:
        encoded = _worker_sp.encode(transformed, return_type="offset_mapping")
    except (TypeError, ValueError) as exc:
        raise DataError(f"sentencepiece {spm.__version__} cannot report token offsets ({exc}); the byte "
                        "sidecar needs encode(return_type='offset_mapping') (present in 0.2.3)") from None
    tokens: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for text, doc in zip(transformed, encoded):
        tokens.append(np.array([BOS_ID, *doc["ids"]], dtype=np.uint16))
        counts.append(np.concatenate([[0], caseops.piece_original_bytes(
            text, doc["offsets"], caseops=_worker_transform == "caseops")]))
    return np.concatenate(tokens), np.concatenate(counts).astype(np.int64)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class DocumentEncoder:
    """Encodes documents on ``workers`` processes (0 = all cores); use as a
    context manager so one pool serves several splits.

    ``encode(docs)`` yields the token stream of ``docs`` in order, one BOS
    before each document, as uint16 chunks; each document goes through
    ``case_transform`` first. ``encode_with_bytes(docs)`` yields (tokens,
    original bytes per token) chunk pairs, the byte sidecar's source. The
    stream is identical for any worker count: batches are encoded
    independently and returned in order.
    """

    def __init__(self, model_bytes: bytes, workers: int, case_transform: str = "none"):
        if load_processor(model_bytes, "tokenizer").vocab_size() > MAX_VOCAB:
            raise DataError(f"tokenizer vocab exceeds {MAX_VOCAB}; ids would not fit uint16 shards")
        if case_transform not in caseops.CASE_TRANSFORMS:
            raise ValueError(f"unknown case transform {case_transform!r}")
        self.model_bytes = model_bytes
        self.workers = workers or available_cores()
        self.case_transform = case_transform
        self._pool = None

    def __enter__(self) -> "DocumentEncoder":
        if self.workers > 1:
            # spawn, not fork: the parent may hold threads (torch, sentencepiece)
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=_init_worker, initargs=(self.model_bytes, self.case_transform))
        else:
            _init_worker(self.model_bytes, self.case_transform)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def encode(self, docs: Iterable[str]) -> Iterator[np.ndarray]:
        return self._run(_encode_batch, docs)

    def encode_with_bytes(self, docs: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._run(_encode_batch_with_bytes, docs)

    def _run(self, encode_batch, docs: Iterable[str]) -> Iterator:
        if self._pool is None:
            yield from map(encode_batch, _batches(docs))
            return
        # At most 2 batches per worker are in flight, so a huge input is
        # streamed (Pool.imap would read all of it ahead) and input errors
        # surface here, in the caller's thread.
        in_flight: collections.deque = collections.deque()
        for batch in _batches(docs):
            in_flight.append(self._pool.apply_async(encode_batch, (batch,)))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def encode_documents(model_bytes: bytes, docs: Iterable[str], workers: int,
                     case_transform: str = "none") -> np.ndarray:
    """The whole BOS-separated token stream of ``docs`` as one uint16 array."""
    with DocumentEncoder(model_bytes, workers, case_transform) as encoder:
        chunks = list(encoder.encode(docs))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
