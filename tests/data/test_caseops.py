"""CaseOps transform (pgolf/data/caseops.py): rules against a slow reference, the
decoder's strictness, a byte-exact round trip over the whole embedded corpus,
and the control-token layout of the April records' CaseOps sp8192 tokenizer."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import yaml

from pgolf.config import from_params
from pgolf.data import caseops
from pgolf.data.bpb import build_byte_tables
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode
from pgolf.data.corpus import iter_jsonl
from pgolf.data.tokenizer import (TokenizerConfig, case_transform_of, check_layout, encode_documents,
                                  train_model)
from pgolf.errors import DataError, ParamError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
CASEOPS_MODEL = FIXTURES / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
CASEOPS_SHA256 = "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"
CHALLENGE_MODEL = FIXTURES / "fineweb_8192_bpe.model"


def reference_encode(text: str) -> str:
    """The rules of docs/FRONTIER.md §1.3, one character at a time."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in caseops.CONTROLS:
            out += [ESC, ch]
            i += 1
            continue
        if not ("a" <= ch <= "z" or "A" <= ch <= "Z"):
            out.append(ch)
            i += 1
            continue
        j = i
        while j < len(text) and ("a" <= text[j] <= "z" or "A" <= text[j] <= "Z"):
            j += 1
        word = text[i:j]
        upper = [("A" <= c <= "Z") for c in word]
        if not any(upper):
            out.append(word)
        elif len(word) >= 2 and all(upper):
            out += [ALLCAPS, word.lower()]
        elif upper[0] and len(word) >= 2 and not any(upper[1:]):
            out += [TITLE, word.lower()]
        else:
            for k, c in enumerate(word):
                if upper[k]:
                    out.append(TITLE if k == 0 else CAPNEXT)
                out.append(c.lower())
        i = j
    return "".join(out)


@pytest.mark.parametrize("text,expected", [
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("iPhone", f"i{CAPNEXT}phone"),
    ("OpenAI", f"{TITLE}open{CAPNEXT}a{CAPNEXT}i"),
    ("I", f"{TITLE}i"),
    ("ABc AbC aBC", f"{TITLE}a{CAPNEXT}bc {TITLE}ab{CAPNEXT}c a{CAPNEXT}b{CAPNEXT}c"),
    ("McDonald's USA-2 ÉCOLE Éa", f"{TITLE}mc{CAPNEXT}donald's {ALLCAPS}usa-2 É{ALLCAPS}cole Éa"),
    (f"x{TITLE}Y{ESC}", f"x{ESC}{TITLE}{TITLE}y{ESC}{ESC}"),
    ("", ""),
])
def test_spec_examples(text, expected):
    assert encode(text) == expected == reference_encode(text)
    assert decode(expected) == text


def test_random_text_matches_the_reference_and_round_trips():
    alphabet = list("aAbBzZ  '-09é\nÉ") + list(caseops.CONTROLS) + ["😀"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert encode(text) == reference_encode(text), repr(text)
        assert decode(encode(text)) == text
        assert not any("A" <= c <= "Z" for c in encode(text))


@pytest.mark.parametrize("bad", [
    "A", TITLE, f"a{TITLE}b", f"{TITLE}1", f"{ALLCAPS}a", f"{ALLCAPS}ab{CAPNEXT}c", f"x{ALLCAPS}ab",
    f"{CAPNEXT}a", f" {CAPNEXT}a", f"a{CAPNEXT}", f"{ESC}a", f"ab{ESC}", ESC])
def test_decoder_rejects_misplaced_markers(bad):
    with pytest.raises(CaseOpsError, match="misplaced"):
        decode(bad)


@pytest.fixture(scope="module")
def embedded_corpus(tmp_path_factory) -> Path:
    """The default params' whole embedded corpus (both splits)."""
    import stages.corpus
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    root = tmp_path_factory.mktemp("corpus")
    stages.corpus.run({"corpus": params["corpus"]}, root)
    return root / "data" / "corpus"


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_round_trip_over_the_whole_embedded_corpus(embedded_corpus):
    fired = dict.fromkeys(caseops.CONTROLS[:3], 0)
    docs = 0
    for split in ("train", "val"):
        for doc in iter_jsonl(embedded_corpus / f"{split}.jsonl"):
            encoded = encode(doc)
            assert decode(encoded).encode("utf-8") == doc.encode("utf-8")
            assert int(caseops.char_original_bytes(encoded).sum()) == len(doc.encode("utf-8"))
            for marker in fired:
                fired[marker] += encoded.count(marker)
            docs += 1
    assert docs > 4000 and min(fired.values()) > 100, fired   # every rule is exercised


def test_caseops_fixture_is_the_records_tokenizer_with_the_control_layout():
    data = CASEOPS_MODEL.read_bytes()
    assert hashlib.sha256(data).hexdigest() == CASEOPS_SHA256
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.vocab_size() == 8192
    for i, control in zip(range(4, 8), (TITLE, ALLCAPS, CAPNEXT, ESC)):
        assert sp.id_to_piece(i) == control
        assert not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i) or sp.is_unused(i))
    assert [sp.id_to_piece(i) for i in (8, 263, 8133)] == ["<0x00>", "<0xFF>", "\u2581"]
    check_layout(data, 8192, "caseops.model", "caseops")
    assert case_transform_of(data) == "caseops"
    with pytest.raises(DataError, match="set tokenizer.case_transform: caseops"):
        check_layout(data, 8192, "caseops.model", "none")
    plain = CHALLENGE_MODEL.read_bytes()
    assert case_transform_of(plain) == "none"
    with pytest.raises(DataError, match="not the CaseOps control pieces"):
        check_layout(plain, 8192, "sp8192.model", "caseops")


def test_fixture_tokenizer_emits_the_control_ids():
    data = CASEOPS_MODEL.read_bytes()
    stream = encode_documents(data, ["The NASA iPhone", f"a{TITLE}b"], workers=1, case_transform="caseops")
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.decode(stream[1:].tolist()).split(" ")[0] == f"{TITLE}the"
    ids = set(stream.tolist())
    assert {4, 5, 6, 7} <= ids                      # TITLE, ALLCAPS, CAPNEXT, ESC
    assert all(sp.decode([i]) == c for i, c in zip(range(4, 8), caseops.CONTROLS))


def test_trained_caseops_tokenizer_has_the_records_layout(embedded_corpus):
    docs = list(iter_jsonl(embedded_corpus / "train.jsonl"))[:300]
    model = train_model(docs, 512, "caseops")
    check_layout(model, 512, "trained", "caseops")
    ours = spm.SentencePieceProcessor(model_proto=model)
    records = spm.SentencePieceProcessor(model_proto=CASEOPS_MODEL.read_bytes())
    for i in range(264):
        assert ours.id_to_piece(i) == records.id_to_piece(i)
        assert ours.is_byte(i) == records.is_byte(i) and ours.is_control(i) == records.is_control(i)
    # Trained on transformed text: no uppercase ASCII piece is needed any more.
    pieces = [ours.id_to_piece(i) for i in range(264, 512)]
    assert not any(any("A" <= c <= "Z" for c in p) for p in pieces)


def test_byte_tables_refuse_a_caseops_tokenizer():
    with pytest.raises(DataError, match="never from byte tables"):
        build_byte_tables(CASEOPS_MODEL, 8192)


def test_case_transform_param_is_validated():
    base = {"source": "train", "model_path": "", "vocab_size": 1024, "max_train_docs": 0,
            "case_transform": "caseops"}
    assert from_params(TokenizerConfig, {"tokenizer": base}, "tokenizer").case_transform == "caseops"
    for bad, key in [({"case_transform": "lower"}, "tokenizer.case_transform"),
                     ({"vocab_size": 264}, "tokenizer.vocab_size")]:   # 4 + 4 + 256 leaves no room
        with pytest.raises(ParamError) as err:
            from_params(TokenizerConfig, {"tokenizer": {**base, **bad}}, "tokenizer")
        assert err.value.key == key
    assert from_params(TokenizerConfig, {"tokenizer": {**base, "case_transform": "none", "vocab_size": 264}},
                       "tokenizer").vocab_size == 264


def test_char_original_bytes_counts_markers_zero_and_escaped_literals_in_full():
    text = f"{TITLE}a{ESC}{TITLE}é{ESC}{ESC}😀"
    assert caseops.char_original_bytes(text).tolist() == [0, 1, 0, 3, 2, 0, 3, 4]
    assert caseops.char_original_bytes(text, caseops=False).tolist() == [3, 1, 3, 3, 2, 3, 3, 4]
    assert np.array_equal(caseops.piece_original_bytes(text, [(0, 2), (2, 4), (4, 8)]), [1, 3, 9])


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
@pytest.mark.parametrize("transform", ["none", "caseops"])
def test_sp8192_trains_on_the_embedded_corpus(embedded_corpus, transform):
    """The challenge's vocabulary at the challenge's trainer settings (3.1 s here for 'none')."""
    docs = list(iter_jsonl(embedded_corpus / "train.jsonl"))
    model = train_model(docs, 8192, transform)
    check_layout(model, 8192, "sp8192", transform)
    assert case_transform_of(model) == transform
