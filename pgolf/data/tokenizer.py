"""The SentencePiece tokenizer: train it the challenge's way, or check a given one;
and turn documents into BOS-separated token streams on all cores.

Training uses the challenge's trainer settings (docs/RECIPE.md §1.3). It is made
deterministic by using every training document (no sentence sampling) and one
trainer thread: the BPE trainer's result depends on its thread count (checked:
1 and 2 threads give different .model bytes), so the thread count is fixed.

Each training document is one trainer "sentence", so the piece statistics
see paragraph starts the way encoding does (NMT-NFKC turns the newlines
between paragraphs into a space, giving the next word its ``▁``).
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

    def __post_init__(self) -> None:
        check(BYTE_PIECES_END < self.vocab_size <= MAX_VOCAB, "vocab_size",
              f"must be in ({BYTE_PIECES_END}, {MAX_VOCAB}] (4 specials + 256 byte pieces + more)")
        check(self.max_train_docs >= 0, "max_train_docs", "must be >= 0 (0 = all)")
        if self.source == "file":
            check(self.model_path != "", "model_path", "source 'file' needs a .model path")
        else:
            check(self.model_path == "", "model_path", "must be empty for source 'train'")


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


def train_model(docs: Sequence[str], vocab_size: int) -> bytes:
    """Serialized BPE model trained on ``docs``; exactly ``vocab_size`` pieces."""
    if not docs:
        raise DataError("no training documents for the tokenizer")
    longest = max(len(d.encode("utf-8")) for d in docs)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=out, vocab_size=vocab_size,
        # the trainer silently skips longer sentences; no document may be skipped
        max_sentence_length=max(longest + 1, 4192),
        minloglevel=2, **CHALLENGE_TRAINER_SETTINGS, **_DETERMINISTIC_SETTINGS)
    model = out.getvalue()
    got = load_processor(model, "trained tokenizer").vocab_size()
    if got != vocab_size:
        raise DataError(f"training text yields only {got} pieces, fewer than "
                        f"tokenizer.vocab_size={vocab_size}; use more text or a smaller vocab")
    return model


def check_layout(model_bytes: bytes, vocab_size: int, where: str) -> None:
    """Require the challenge's id layout: 0-3 pad/bos/eos/unk, 4-259 <0x00>..<0xFF>."""
    sp = load_processor(model_bytes, where)
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{where}: vocab size {sp.vocab_size()} != tokenizer.vocab_size {vocab_size}")
    specials = {"pad": (sp.pad_id(), PAD_ID), "bos": (sp.bos_id(), BOS_ID),
                "eos": (sp.eos_id(), EOS_ID), "unk": (sp.unk_id(), UNK_ID)}
    for name, (got, want) in specials.items():
        if got != want:
            raise DataError(f"{where}: {name} id is {got}, expected {want}")
    for byte in range(256):
        i = BYTE_PIECES_START + byte
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
        model = train_model(docs, cfg.vocab_size)
        meta.update(train_docs=len(docs), trainer_settings=CHALLENGE_TRAINER_SETTINGS)
        where = "trained tokenizer"
    else:
        model = read_model(cfg.model_path)
        meta["model_path"] = cfg.model_path
        where = cfg.model_path
    check_layout(model, cfg.vocab_size, where)
    meta.update(vocab_size=cfg.vocab_size, sha256=sha256_bytes(model))
    return model, meta


# --- encoding ---------------------------------------------------------------

_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def _encode_batch(texts: list[str]) -> np.ndarray:
    assert _worker_sp is not None, "encoding worker not initialised"
    flat: list[int] = []
    for ids in _worker_sp.encode(texts):
        flat.append(BOS_ID)
        flat.extend(ids)
    return np.array(flat, dtype=np.uint16)


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
    before each document, as uint16 chunks. The stream is identical for any
    worker count: batches are encoded independently and returned in order.
    """

    def __init__(self, model_bytes: bytes, workers: int):
        if load_processor(model_bytes, "tokenizer").vocab_size() > MAX_VOCAB:
            raise DataError(f"tokenizer vocab exceeds {MAX_VOCAB}; ids would not fit uint16 shards")
        self.model_bytes = model_bytes
        self.workers = workers or available_cores()
        self._pool = None

    def __enter__(self) -> "DocumentEncoder":
        if self.workers > 1:
            # spawn, not fork: the parent may hold threads (torch, sentencepiece)
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=_init_worker, initargs=(self.model_bytes,))
        else:
            _init_worker(self.model_bytes)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def encode(self, docs: Iterable[str]) -> Iterator[np.ndarray]:
        if self._pool is None:
            yield from map(_encode_batch, _batches(docs))
            return
        # At most 2 batches per worker are in flight, so a huge input is
        # streamed (Pool.imap would read all of it ahead) and input errors
        # surface here, in the caller's thread.
        in_flight: collections.deque = collections.deque()
        for batch in _batches(docs):
            in_flight.append(self._pool.apply_async(_encode_batch, (batch,)))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def encode_documents(model_bytes: bytes, docs: Iterable[str], workers: int) -> np.ndarray:
    """The whole BOS-separated token stream of ``docs`` as one uint16 array."""
    with DocumentEncoder(model_bytes, workers) as encoder:
        chunks = list(encoder.encode(docs))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
