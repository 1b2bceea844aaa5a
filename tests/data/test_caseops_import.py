"""Importing the challenge's CaseOps export (shards + val byte sidecar + tokenizer)
with the docs/FRONTIER.md §1.5 checks, on small synthetic exports in the challenge's format."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import stages.shards
from pgolf.data.bpb import SidecarBytes, load_byte_source
from pgolf.data.challenge_import import document_digests
from pgolf.data.shards import BOS_ID, load_sidecar, load_split, write_shard
from pgolf.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASEOPS_MODEL = FIXTURES / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
PLAIN_MODEL = FIXTURES / "fineweb_8192_bpe.model"
VOCAB = 8192


def random_docs(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.integers(4, VOCAB, size=int(rng.integers(1, 60))).astype(np.uint16) for _ in range(count)]


def stream_of(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.concatenate([[BOS_ID], d]).astype(np.uint16) for d in docs])


def write_files(folder: Path, stem: str, stream: np.ndarray, file_tokens: int) -> None:
    for index, start in enumerate(range(0, stream.size, file_tokens)):
        write_shard(folder / f"fineweb_{stem}_{index:06d}.bin", stream[start:start + file_tokens])


def sidecar_of(stream: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = rng.integers(0, 6, size=stream.size).astype(np.uint16)
    counts[stream == BOS_ID] = 0
    return counts


def make_export(folder: Path, train: list[np.ndarray], val: list[np.ndarray], train_file_tokens: int,
                val_file_tokens: int, seed: int = 0) -> np.ndarray:
    """Write a challenge-format export; return the val sidecar it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, "train", stream_of(train), train_file_tokens)
    val_stream = stream_of(val)
    write_files(folder, "val", val_stream, val_file_tokens)
    sidecar = sidecar_of(val_stream, np.random.default_rng(seed))
    write_files(folder, "val_bytes", sidecar, val_file_tokens)
    return sidecar


def import_into(root: Path, export: Path, model: Path = CASEOPS_MODEL, **shards) -> dict:
    (root / "data" / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, root / "data" / "tokenizer" / "tokenizer.model")
    params = {"shards": {"source": "challenge", "challenge_dir": str(export), "link": False,
                         "tokens_per_shard": 100, "workers": 1, "max_shared_val_docs": 0, **shards}}
    return stages.shards.run(params, root)


@pytest.fixture()
def docs():
    rng = np.random.default_rng(7)
    return random_docs(rng, 300), random_docs(rng, 50)


def test_a_clean_caseops_export_is_imported_with_its_sidecar(docs, tmp_path):
    train, val = docs
    sidecar = make_export(tmp_path / "export", train, val, train_file_tokens=2000, val_file_tokens=1000)
    manifest = import_into(tmp_path, tmp_path / "export", link=True)
    shards = tmp_path / "data" / "shards"
    assert np.array_equal(load_sidecar(shards), sidecar)
    assert np.array_equal(load_split(shards, "val"), stream_of(val))
    assert np.array_equal(load_split(shards, "train"), stream_of(train))
    assert (shards / "val_bytes_000001.bin").stat().st_ino == \
        (tmp_path / "export" / "fineweb_val_bytes_000001.bin").stat().st_ino
    checks = manifest["checks"]
    assert checks["val_docs"] == 50 and checks["train_docs"] == 300 and checks["val_docs_in_train"] == 0
    assert checks["train_files"] == len(list((tmp_path / "export").glob("fineweb_train_*")))
    assert manifest["case_transform"] == "caseops"
    assert manifest["val_byte_sidecar"]["entries"] == sidecar.size
    source = load_byte_source(shards, tmp_path / "data/tokenizer/tokenizer.model", VOCAB)
    assert isinstance(source, SidecarBytes) and np.array_equal(source.per_token, sidecar)
    metrics = json.loads((tmp_path / "data" / "metrics" / "shards.json").read_text())
    assert metrics["val_bytes"] == int(sidecar.sum()) and metrics["val_docs"] == 50


def leaky_export(folder: Path, docs, train_file_tokens: int) -> None:
    """Issue #2127: train made by a prep that kept only the first 10 of the 50 val
    documents as val, so val documents 10-49 are also in train."""
    train, val = docs
    make_export(folder, val[10:] + train, val, train_file_tokens, val_file_tokens=10**6)


def test_the_2127_leak_is_caught_by_the_file_sizes(docs, tmp_path):
    val_tokens = stream_of(docs[1]).size
    leaky_export(tmp_path / "export", docs, train_file_tokens=val_tokens // 5)   # 10x smaller files
    with pytest.raises(DataError, match=r"different exports \(the issue #2127"):
        import_into(tmp_path, tmp_path / "export")
    assert not (tmp_path / "data" / "shards").exists()          # nothing half-written


def test_the_2127_leak_is_caught_by_document_hashes(docs, tmp_path):
    leaky_export(tmp_path / "export", docs, train_file_tokens=10**6)   # file sizes look clean
    with pytest.raises(DataError, match="40 of 50 distinct val documents also occur in train"):
        import_into(tmp_path, tmp_path / "export")
    manifest = import_into(tmp_path, tmp_path / "export", max_shared_val_docs=40)
    assert manifest["checks"]["val_docs_in_train"] == 40


def test_caseops_tokenizer_needs_an_aligned_sidecar(docs, tmp_path):
    export = tmp_path / "export"
    sidecar = make_export(export, *docs, train_file_tokens=2000, val_file_tokens=10**6)
    side_file = export / "fineweb_val_bytes_000000.bin"
    write_shard(side_file, np.roll(sidecar, 1))                       # shifted by one token
    with pytest.raises(DataError, match="BOS positions of fineweb_val_000000.bin carry bytes"):
        import_into(tmp_path, export)
    write_shard(side_file, sidecar[:-1])
    with pytest.raises(DataError, match=f"{sidecar.size - 1:,} entries for the {sidecar.size:,} tokens"):
        import_into(tmp_path, export)
    side_file.unlink()
    with pytest.raises(DataError, match="no fineweb_val_bytes_NNNNNN.bin shards"):
        import_into(tmp_path, export)


def test_plain_tokenizer_import_ignores_a_sidecar(docs, tmp_path):
    make_export(tmp_path / "export", *docs, train_file_tokens=2000, val_file_tokens=10**6)
    manifest = import_into(tmp_path, tmp_path / "export", model=PLAIN_MODEL)
    assert "val_byte_sidecar" not in manifest and load_sidecar(tmp_path / "data" / "shards") is None
    assert manifest["checks"]["val_docs_in_train"] == 0


def test_an_export_without_bos_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "export"
    folder.mkdir()
    write_shard(folder / "fineweb_train_000000.bin", rng.integers(4, VOCAB, 500).astype(np.uint16))
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(4, VOCAB, 100).astype(np.uint16))
    with pytest.raises(DataError, match="does not start with BOS"):
        import_into(tmp_path, folder, model=PLAIN_MODEL)


def reference_digests(stream: np.ndarray) -> list[bytes]:
    bos = np.flatnonzero(stream == BOS_ID).tolist() + [stream.size]
    docs = [stream[a + 1:b] for a, b in zip(bos[:-1], bos[1:])]
    return [hashlib.blake2b(d.tobytes(), digest_size=16).digest() for d in docs if d.size]


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 10**6])
def test_document_digests_do_not_depend_on_chunking(chunk):
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 30) + [np.zeros(0, np.uint16)] + random_docs(rng, 5)   # one empty document
    stream = stream_of(docs)
    chunks = [stream[i:i + chunk] for i in range(0, stream.size, chunk)]
    got = list(document_digests(chunks, "s"))
    assert got == reference_digests(stream) and len(got) == 35
