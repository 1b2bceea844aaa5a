"""Bits-per-byte byte tables: hand-computed counts, a slow reference, and the exact
identity Σ bytes = Σ UTF-8 bytes of the normalised documents on the embedded val split."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.data.bpb import ByteTables, bits_per_byte, build_byte_tables, stream_bytes, target_bytes
from pgolf.config import from_params, load_params
from pgolf.data.corpus import CorpusConfig, build_split
from pgolf.errors import DataError
from tests.helpers import REPO

BOS, EOS, PAD, UNK = 1, 2, 0, 3


def sp_of(path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


def reference_bytes(sp: spm.SentencePieceProcessor, prev: int, target: int) -> int:
    """The rule of docs/RECIPE.md §1.4 spelled out per position with the sp API."""
    def boundary(i: int) -> bool:
        return i >= sp.vocab_size() or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
    if boundary(target):
        return 0
    if sp.is_byte(target):
        return 1
    piece = sp.id_to_piece(target)
    if piece.startswith("\u2581"):
        return len(piece[1:].encode("utf-8")) + (0 if boundary(prev) else 1)
    return len(piece.encode("utf-8"))


def per_target(tables: ByteTables, ids: list[int]) -> list[int]:
    t = torch.tensor(ids)
    return target_bytes(tables, t[:-1], t[1:]).tolist()


@pytest.fixture(scope="module")
def tables8192(sp8192_model_path) -> ByteTables:
    return build_byte_tables(sp8192_model_path, 8192)


@pytest.fixture(scope="module")
def embedded_val_docs() -> list[str]:
    """The default profile's validation documents (params.yaml, section corpus)."""
    cfg = from_params(CorpusConfig, load_params(REPO / "params.yaml"), "corpus")
    return list(build_split(cfg).val)


def test_hand_computed_counts_with_the_challenge_sp8192(sp8192_model_path, tables8192):
    sp = sp_of(sp8192_model_path)
    # "Hello world" -> H | ello | ▁world: 1 + 4 + (5 + 1 for the space)
    ids = sp.encode("Hello world")
    assert [sp.id_to_piece(i) for i in ids] == ["H", "ello", "\u2581world"]
    assert per_target(tables8192, [BOS] + ids) == [1, 4, 6]
    # é and ï are byte-fallback pairs (1 byte each); ▁— is a 3-byte char plus a space
    ids = sp.encode("café — naïve")
    assert [sp.id_to_piece(i) for i in ids] == [
        "c", "af", "<0xC3>", "<0xA9>", "\u2581—", "\u2581n", "a", "<0xC3>", "<0xAF>", "ve"]
    assert per_target(tables8192, [BOS] + ids) == [1, 2, 1, 1, 4, 2, 1, 1, 1, 2]
    assert sum(per_target(tables8192, [BOS] + ids)) == len("café — naïve".encode("utf-8")) == 16
    # a 4-byte emoji spelled in four byte pieces
    ids = sp.encode("😀 ok")
    assert per_target(tables8192, [BOS] + ids) == [1, 1, 1, 1, 3]


def test_leading_space_after_a_boundary_token_is_not_counted(sp8192_model_path, tables8192):
    world = sp_of(sp8192_model_path).piece_to_id("\u2581world")
    h = sp_of(sp8192_model_path).piece_to_id("H")
    for boundary in (BOS, EOS, PAD, UNK):
        assert per_target(tables8192, [boundary, world]) == [5]
    assert per_target(tables8192, [h, world]) == [6]
    lone_space = sp_of(sp8192_model_path).piece_to_id("\u2581")
    assert per_target(tables8192, [h, lone_space, BOS, lone_space]) == [1, 0, 0]


def test_control_tokens_are_zero_byte_boundaries(tables8192):
    for i in (PAD, BOS, EOS, UNK):
        assert tables8192.base_bytes[i] == 0 and tables8192.is_boundary[i]
        assert not tables8192.has_leading_space[i]
    assert np.all(tables8192.base_bytes[4:260] == 1) and not tables8192.is_boundary[4:260].any()
    assert tables8192.base_bytes.dtype == np.int16


def test_ids_beyond_the_sp_vocab_are_zero_byte_boundaries(sp8192_model_path):
    tables = build_byte_tables(sp8192_model_path, 8200)
    assert tables.size == 8200
    assert np.all(tables.base_bytes[8192:] == 0) and tables.is_boundary[8192:].all()
    world = sp_of(sp8192_model_path).piece_to_id("\u2581world")
    assert per_target(tables, [8195, world, 8199]) == [5, 0]
    # a smaller vocab_size never truncates the table
    assert build_byte_tables(sp8192_model_path, 1024).size == 8192


@pytest.mark.parametrize("which", ["sp8192", "tiny"])
def test_tables_match_the_slow_reference_on_random_pairs(which, sp8192_model_path, tiny_data):
    path = sp8192_model_path if which == "sp8192" else tiny_data / "data/tokenizer/tokenizer.model"
    sp = sp_of(path)
    vocab = sp.vocab_size() + 8
    tables = build_byte_tables(path, vocab)
    rng = np.random.default_rng(0)
    prev = rng.integers(0, vocab, size=3000)
    prev[::7] = BOS
    target = rng.integers(0, vocab, size=3000)
    got = target_bytes(tables, torch.from_numpy(prev), torch.from_numpy(target))
    assert got.dtype == torch.int64
    assert got.tolist() == [reference_bytes(sp, int(x), int(y)) for x, y in zip(prev, target)]
    # the numpy stream version agrees with the torch one on the same pairs
    stream = np.empty(6000, dtype=np.int64)
    stream[0::2], stream[1::2] = prev, target
    pairs = target_bytes(tables, torch.from_numpy(stream[:-1]), torch.from_numpy(stream[1:]))
    assert stream_bytes(tables, stream) == int(pairs.sum())
    assert stream_bytes(tables, np.array_split(stream, 7)) == int(pairs.sum())


def test_small_trained_tokenizer_hand_counts(tiny_data):
    path = tiny_data / "data/tokenizer/tokenizer.model"
    sp, tables = sp_of(path), build_byte_tables(path, 512)
    text = "The Congress ½ “quoted”  end"
    ids = sp.encode(text)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces), pieces  # the curly quotes fall back to bytes
    counts = per_target(tables, [BOS] + ids)
    for piece, count, i in zip(pieces, counts, ids):
        if sp.is_byte(i):
            assert count == 1
        elif piece.startswith("\u2581"):
            assert count == len(piece.encode("utf-8")) - 3 + 1
        else:
            assert count == len(piece.encode("utf-8"))
    # NFKC: ½ -> 1⁄2 (5 bytes); the double space collapses to one
    assert sum(counts) == len("The Congress 1⁄2 “quoted” end".encode("utf-8"))


def identity_check(model_path, docs: list[str]) -> tuple[int, int, int]:
    """(Σ table bytes over the BOS-separated stream, Σ normalised bytes, Σ decoded bytes)."""
    sp = sp_of(model_path)
    tables = build_byte_tables(model_path, sp.vocab_size())
    encoded = sp.encode(docs)
    stream = np.concatenate([np.array([BOS] + ids, dtype=np.int64) for ids in encoded])
    normalised = sum(len(sp.normalize(d).replace("\u2581", " ").encode("utf-8")) for d in docs)
    decoded = sum(len(sp.decode(ids).encode("utf-8")) for ids in encoded)
    return stream_bytes(tables, stream), normalised, decoded


@pytest.mark.parametrize("which", ["sp8192", "tiny"])
def test_byte_sum_equals_normalised_utf8_length_on_embedded_val(which, sp8192_model_path, tiny_data,
                                                                 embedded_val_docs):
    path = sp8192_model_path if which == "sp8192" else tiny_data / "data/tokenizer/tokenizer.model"
    sp = sp_of(path)
    # the identity's assumptions: no ▁ inside a piece, no leading ▁ after normalisation
    assert not any("\u2581" in sp.id_to_piece(i)[1:] for i in range(sp.vocab_size()))
    assert not any(sp.normalize(d).startswith("\u2581") for d in embedded_val_docs)
    table_bytes, normalised, decoded = identity_check(path, embedded_val_docs)
    assert table_bytes == normalised == decoded
    # roughly 1 MB, and less than the raw text: paragraph breaks collapse to one space
    raw = sum(len(d.encode("utf-8")) for d in embedded_val_docs)
    assert 0.8e6 < table_bytes < raw


def test_bits_per_byte_formula():
    nll = torch.rand(50, dtype=torch.float64) * 5
    nbytes = torch.randint(0, 6, (50,), dtype=torch.int64)
    expected = (nll.sum().item() / math.log(2)) / nbytes.sum().item()
    assert bits_per_byte(nll.sum().item(), nbytes.sum().item()) == pytest.approx(expected, rel=1e-12)
    # equivalent form: mean nats / ln 2 * tokens / bytes
    alt = nll.mean().item() / math.log(2) * 50 / nbytes.sum().item()
    assert bits_per_byte(float(nll.sum()), float(nbytes.sum())) == pytest.approx(alt, rel=1e-12)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_missing_or_corrupt_model_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        build_byte_tables(tmp_path / "none.model", 1024)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="bad.model: not a SentencePiece model"):
        build_byte_tables(tmp_path / "bad.model", 1024)
