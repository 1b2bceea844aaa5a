"""Per-token byte counts for the bits-per-byte metric (docs/RECIPE.md §1.4, docs/FRONTIER.md §1.4).

A byte source says how many bytes each scored target is worth. There are two:
the tokenizer's byte tables (:class:`ByteTables`, below), and the val byte
sidecar (:class:`SidecarBytes`), which stores the count for every val token
position and is the only source for a CaseOps tokenizer: its control pieces
stand for no text, and its lowercased pieces for bytes of the original case,
which no per-piece table can know. :func:`load_byte_source` picks the
sidecar whenever the shard folder has one; :func:`build_byte_tables` refuses
a CaseOps tokenizer. The evals call :func:`target_bytes` with the targets' stream
positions, so either source plugs into the same scoring code.

Three tables, indexed by token id and of length max(sp_vocab, vocab_size):

* ``base_bytes``: 0 for control/unknown/unused pieces and for ids beyond the
  SentencePiece vocabulary; 1 for a byte-fallback piece ``<0xXX>``; otherwise
  the UTF-8 length of the piece without its leading ``▁`` (U+2581).
* ``has_leading_space``: the piece starts with ``▁`` (a normal piece only).
* ``is_boundary``: control/unknown/unused pieces and ids beyond the sp vocab.

A target ``y`` after input ``x`` is worth ``base[y] + (space[y] and not
boundary[x])`` bytes: the ``▁`` stands for one space byte, except right after
a boundary token such as BOS, where there is no space to count.

Exact identity (tested on the embedded val split). Let ``N`` be the model's
normalizer (``SentencePieceProcessor.normalize``: NMT-NFKC, then whitespace
runs collapsed to one ``▁`` and leading/trailing whitespace removed, because
the challenge models set ``remove_extra_whitespaces`` and not
``add_dummy_prefix``). For a stream ``BOS t(d1) BOS t(d2) ...`` with one BOS
before every document, the bytes credited to all targets sum to

    Σ_docs len(utf8(N(d).replace("▁", " ")))   ==   Σ_docs len(utf8(decode(t(d))))

because (1) BOS targets count 0; (2) pieces concatenate to ``N(d)``, each
``▁`` counted as the 1-byte space it stands for and every other character at
its UTF-8 length; (3) a character missing from the vocabulary is spelled in
byte-fallback pieces, one per UTF-8 byte, at 1 byte each; (4) ``N(d)`` never
starts with ``▁``, so the "no space after a boundary" rule removes nothing
(if it did start with one, that space would go uncounted, as it is dropped by
``decode``). It assumes, as holds for BPE models trained with
``split_by_whitespace`` (ours and the challenge's sp8192), that no piece has
``▁`` after its first character and that no UNK is emitted (byte fallback).
Paragraph breaks are not counted: NMT-NFKC turns ``\\n`` into a space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import sentencepiece as spm

from pgolf.data.caseops import has_control_pieces
from pgolf.data.shards import SIDECAR, load_sidecar
from pgolf.errors import DataError

if TYPE_CHECKING:
    import torch

SPACE_MARK = "\u2581"


@dataclass(frozen=True, eq=False)
class ByteTables:
    base_bytes: np.ndarray          # int16 [V]
    has_leading_space: np.ndarray   # bool  [V]
    is_boundary: np.ndarray         # bool  [V]
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = {self.base_bytes.shape, self.has_leading_space.shape, self.is_boundary.shape}
        if len(sizes) != 1 or self.base_bytes.ndim != 1:
            raise ValueError(f"byte tables must be 1-D and of equal length, got {sorted(sizes)}")

    @property
    def size(self) -> int:
        return int(self.base_bytes.shape[0])

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base int64, space bool, boundary bool) tensors on ``device``, cached."""
        # Imported here so the data stages, which only need the numpy tables,
        # and their spawned encoding workers do not pay torch's ~1 s import.
        import torch

        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = (
                torch.from_numpy(self.base_bytes.astype(np.int64)).to(device),
                torch.from_numpy(self.has_leading_space.copy()).to(device),
                torch.from_numpy(self.is_boundary.copy()).to(device),
            )
        return self._on_device[key]


def build_byte_tables(model_path: str | Path, vocab_size: int) -> ByteTables:
    """Byte tables of a SentencePiece model, padded to ``vocab_size`` ids."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as exc:
        raise DataError(f"{model_path}: not a SentencePiece model ({exc})") from None
    if has_control_pieces(sp):
        raise DataError(f"{model_path}: a CaseOps tokenizer; its bytes come from the val byte sidecar "
                        f"({SIDECAR}_NNNNNN.bin beside the val shards), never from byte tables")
    sp_vocab = sp.vocab_size()
    size = max(sp_vocab, vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)   # ids past the sp vocab stay boundary, 0 bytes
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


@dataclass(frozen=True, eq=False)
class SidecarBytes:
    """The val byte sidecar: the target at stream position ``p`` is worth ``per_token[p]``."""

    per_token: np.ndarray           # uint16 [val tokens]
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.per_token.ndim != 1:
            raise ValueError(f"a byte sidecar must be 1-D, got shape {self.per_token.shape}")

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The counts as an int32 tensor on ``device``, cached."""
        import torch

        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = torch.from_numpy(self.per_token.astype(np.int32)).to(device)
        return self._on_device[key]


ByteSource = ByteTables | SidecarBytes


def load_byte_source(shard_dir: str | Path, tokenizer_path: str | Path, vocab_size: int,
                     challenge_names: bool = False) -> ByteSource:
    """The val byte sidecar of ``shard_dir`` if it has one, else the tokenizer's
    byte tables (which refuse a CaseOps tokenizer). ``challenge_names``: a folder in the
    challenge's layout (``fineweb_val_bytes_*.bin``; the submission driver's)."""
    sidecar = load_sidecar(shard_dir, challenge_names)
    if sidecar is not None:
        return SidecarBytes(sidecar)
    return build_byte_tables(tokenizer_path, vocab_size)


def target_bytes(source: ByteSource, prev_ids: torch.Tensor, target_ids: torch.Tensor,
                 target_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Bytes credited to each target (int64): from the tables ``base[y] + (space[y] &
    ~boundary[x])``; from a sidecar its entry at the target's stream position."""
    if isinstance(source, SidecarBytes):
        if target_positions is None:
            raise ValueError("a byte sidecar charges by stream position; pass target_positions")
        return source.on(target_ids.device)[target_positions].long()
    base, space, boundary = source.on(target_ids.device)
    return base[target_ids] + (space[target_ids] & ~boundary[prev_ids]).long()


def stream_bytes(source: ByteSource, tokens: np.ndarray | Iterable[np.ndarray]) -> int:
    """Σ bytes over the targets ``stream[1:]`` of one token stream, given whole
    or as consecutive chunks (e.g. shard files); exact integer arithmetic.
    With a sidecar the stream is the val stream (or a prefix of it)."""
    chunks = [tokens] if isinstance(tokens, np.ndarray) else tokens
    if isinstance(source, SidecarBytes):
        length = sum(int(np.asarray(c).size) for c in chunks)
        if length > source.per_token.size:
            raise ValueError(f"stream of {length} tokens is longer than the sidecar ({source.per_token.size})")
        return int(source.per_token[1:length].sum(dtype=np.int64))
    tables = source
    total = 0
    prev_last: np.ndarray | None = None
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.int64)
        if chunk.size == 0:
            continue
        stream = chunk if prev_last is None else np.concatenate([prev_last, chunk])
        prev, target = stream[:-1], stream[1:]
        extra = tables.has_leading_space[target] & ~tables.is_boundary[prev]
        total += int(tables.base_bytes[target].sum(dtype=np.int64)) + int(np.count_nonzero(extra))
        prev_last = chunk[-1:]
    return total


def bits_per_byte(nll_sum_nats: float, byte_sum: float) -> float:
    """(Σ NLL / ln 2) / Σ bytes over the same scored positions."""
    if byte_sum <= 0:
        raise ValueError(f"byte_sum must be positive, got {byte_sum}")
    return float(nll_sum_nats) / math.log(2.0) / float(byte_sum)
