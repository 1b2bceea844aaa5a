"""The three data stages together: round trip, manifests, determinism, challenge
import, clean failures through the real entry points, and the DVC wiring."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import yaml

import stages.shards
import stages.tokenizer
from tests.helpers import REPO, run_data_stages, tiny_data_params
from pgolf.data.corpus import iter_jsonl
from pgolf.errors import DataError
from pgolf.data.shards import file_sha256, list_shards, load_split, read_shard, write_shard

BOS = 1


def docs_of(stream: np.ndarray) -> list[list[int]]:
    """Split a token stream at its BOS tokens (each document starts with one)."""
    starts = np.flatnonzero(stream == BOS)
    assert starts.size and starts[0] == 0
    return [stream[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [stream.size])]


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_documents_to_shards_and_back(tiny_data, split):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "data/tokenizer/tokenizer.model"))
    texts = list(iter_jsonl(tiny_data / f"data/corpus/{split}.jsonl"))
    decoded = [sp.decode(ids) for ids in docs_of(load_split(tiny_data / "data/shards", split, 512))]
    assert len(decoded) == len(texts)  # BOS count = document count
    assert decoded == [sp.normalize(t).replace("\u2581", " ") for t in texts]


def test_manifest_matches_the_files(tiny_data):
    out = tiny_data / "data/shards"
    manifest = json.loads((out / "manifest.json").read_text())
    meta = json.loads((tiny_data / "data/tokenizer/meta.json").read_text())
    assert manifest["tokenizer_sha256"] == meta["sha256"] == file_sha256(
        tiny_data / "data/tokenizer/tokenizer.model")
    assert manifest["vocab_size"] == meta["vocab_size"] == 512
    for split in ("train", "val"):
        files = manifest["splits"][split]["files"]
        assert [f["name"] for f in files] == [p.name for p in list_shards(out, split)]
        for f in files:
            tokens = read_shard(out / f["name"], 512)
            assert (f["tokens"], f["bytes"], f["sha256"], f["documents"]) == (
                tokens.size, (out / f["name"]).stat().st_size, file_sha256(out / f["name"]),
                int((tokens == BOS).sum()))
        n_docs = sum(1 for _ in iter_jsonl(tiny_data / f"data/corpus/{split}.jsonl"))
        assert manifest["splits"][split]["documents"] == n_docs
    assert all(f["tokens"] == 60_000 for f in manifest["splits"]["train"]["files"][:-1])


def outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "data").rglob("*")) if p.is_file() and "metrics" not in p.parts}


def test_two_runs_are_byte_identical_whatever_the_worker_count(tmp_path):
    params = tiny_data_params(corpus={"max_sources": 12, "val_docs": 10}, tokenizer={"vocab_size": 320},
                              shards={"tokens_per_shard": 20_000})
    run_data_stages(params, tmp_path / "a")
    params["shards"]["workers"] = 2
    run_data_stages(params, tmp_path / "b")
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) >= 8
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_challenge_shards_are_imported_validated(tiny_data, tmp_path):
    challenge = tmp_path / "challenge"
    challenge.mkdir()
    for path in sorted((tiny_data / "data/shards").glob("*.bin")):
        shutil.copy(path, challenge / f"fineweb_{path.name}")
    root = tmp_path / "run"
    shutil.copytree(tiny_data / "data/tokenizer", root / "data/tokenizer")
    params = tiny_data_params(shards={"source": "challenge", "challenge_dir": str(challenge)})
    manifest = stages.shards.run(params, root)
    ours = json.loads((tiny_data / "data/shards/manifest.json").read_text())
    assert manifest["splits"] == ours["splits"]
    # one id past the vocabulary: the stage fails and leaves the previous shards untouched
    bad = challenge / "fineweb_val_000000.bin"
    write_shard(bad, np.array([BOS, 5, 512], dtype=np.uint16))
    before = outputs(root)
    with pytest.raises(DataError, match=r"fineweb_val_000000.bin: token id 512 at position 2"):
        stages.shards.run(params, root)
    assert outputs(root) == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["metrics", "shards", "tokenizer"]


def test_tokenizer_stage_accepts_the_challenge_model_and_checks_its_vocab(sp8192_model_path, tmp_path):
    params = tiny_data_params(tokenizer={"source": "file", "model_path": str(sp8192_model_path),
                                         "vocab_size": 8192})
    meta = stages.tokenizer.run(params, tmp_path)
    assert (tmp_path / "data/tokenizer/tokenizer.model").read_bytes() == sp8192_model_path.read_bytes()
    assert meta["vocab_size"] == 8192 and meta["source"] == "file"
    params["tokenizer"]["vocab_size"] = 1024
    with pytest.raises(DataError, match="vocab size 8192 != tokenizer.vocab_size 1024"):
        stages.tokenizer.run(params, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_entry_point_fails_with_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text" "c"}\n{"text": "d"}\n')
    params = tiny_data_params(corpus={"source": "jsonl", "path": str(bad), "val_docs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage("corpus", tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {bad}: line 3: invalid JSON (Expecting ':' delimiter at column 9)"]
    assert not (tmp_path / "data").exists() or not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


def dvc(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_dvc_wiring_reruns_tokenizer_and_shards_but_not_corpus(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("stages", "pgolf", "requirements", "data/challenge"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params.update(tiny_data_params())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(["init", "-q"], tmp_path)
    dvc(["repro", "shards"], tmp_path)
    assert len(list((tmp_path / "data/shards").glob("train_*.bin"))) == 3
    assert json.loads(dvc(["status", "--json", "shards"], tmp_path)) == {}

    params["tokenizer"]["vocab_size"] = 400
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # DVC sees the params change on tokenizer only; shards goes stale once the
    # tokenizer's output changes, and corpus never does.
    # (and on the params stage, which checks the whole file first: stages/params.py)
    assert json.loads(dvc(["status", "--json", "--with-deps", "shards"], tmp_path)) == {
        "params": [{"changed deps": {"params.yaml": {"tokenizer": "modified"}}}],
        "tokenizer": [{"changed deps": {"params.yaml": {"tokenizer.vocab_size": "modified"}}}]}
    dry = dvc(["repro", "--dry", "shards"], tmp_path)
    assert "Running stage 'tokenizer'" in dry and "Stage 'corpus' didn't change" in dry
    dvc(["repro", "tokenizer"], tmp_path)
    assert json.loads(dvc(["status", "--json", "--with-deps", "shards"], tmp_path)) == {
        "shards": [{"changed deps": {"data/tokenizer/tokenizer.model": "modified"}}]}
    log = dvc(["repro", "shards"], tmp_path)
    assert "Running stage 'shards'" in log and "Stage 'corpus' didn't change" in log
    manifest = json.loads((tmp_path / "data/shards/manifest.json").read_text())
    assert manifest["vocab_size"] == 400
