"""The val byte sidecar (docs/FRONTIER.md §1.4): written by the shards stage under a CaseOps
tokenizer, aligned 1:1 with the val tokens, summing exactly to the original
documents' UTF-8 bytes, and charged by both evals instead of the byte tables."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import stages.corpus
from pgolf.data import caseops
from pgolf.data.bpb import (ByteTables, SidecarBytes, build_byte_tables, load_byte_source, stream_bytes,
                            target_bytes)
from pgolf.config import to_dict
from pgolf.data.corpus import iter_jsonl
from pgolf.data.shards import (BOS_ID, SIDECAR, list_shards, load_sidecar, load_split, read_shard,
                               write_shard, write_val_with_sidecar)
from pgolf.data.tokenizer import DocumentEncoder, encode_documents
from pgolf.errors import DataError
from pgolf.eval.sliding import EvalSlidingConfig, score_nonoverlapping, score_sliding_windows
from pgolf.eval.ttt import EvalTTTConfig, run_ttt

from tests.helpers import run_data_stages, tiny_data_params
from tests.helpers.eval_lm import TILT_OFF

REPO = Path(__file__).resolve().parents[2]
CASEOPS_MODEL = REPO / "tests" / "fixtures" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
def run_data(root: Path, **tokenizer) -> Path:
    """The tiny test pipeline's data stages (30 speeches, 40 val docs, vocab 512) under CaseOps, with
    shard files small enough that the val split spans three of them."""
    run_data_stages(tiny_data_params(tokenizer={"case_transform": "caseops", **tokenizer},
                                     shards={"tokens_per_shard": 20_000}), root)
    return root


def utf8_bytes(path: Path) -> int:
    return sum(len(doc.encode("utf-8")) for doc in iter_jsonl(path))


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory) -> Path:
    return run_data(tmp_path_factory.mktemp("caseops"))


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory) -> Path:
    return run_data(tmp_path_factory.mktemp("plain"), case_transform="none")


def test_sidecar_is_aligned_and_sums_to_the_original_bytes(caseops_data):
    shards = caseops_data / "data" / "shards"
    val_files, side_files = list_shards(shards, "val"), list_shards(shards, SIDECAR)
    assert len(val_files) == len(side_files) == 3
    for v, s in zip(val_files, side_files):
        header = np.fromfile(s, dtype="<i4", count=256)
        assert header[:3].tolist() == [20240520, 1, read_shard(v).size] and not header[3:].any()
        assert s.stat().st_size == 1024 + 2 * read_shard(v).size
    tokens, sidecar = load_split(shards, "val"), load_sidecar(shards)
    assert sidecar.dtype == np.uint16 and sidecar.shape == tokens.shape
    assert not sidecar[tokens == BOS_ID].any() and not sidecar[(tokens >= 4) & (tokens < 8)].any()
    original = utf8_bytes(caseops_data / "data" / "corpus" / "val.jsonl")
    assert int(sidecar.sum(dtype=np.int64)) == original
    metrics = json.loads((caseops_data / "data" / "metrics" / "shards.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert metrics["val_bytes"] == original and manifest["case_transform"] == "caseops"
    assert manifest["val_byte_sidecar"]["entries"] == tokens.size
    assert np.count_nonzero(tokens == 4) > 100          # TITLE markers really are in the stream


def test_transform_off_writes_no_sidecar_and_keeps_the_table_bytes(plain_data):
    shards = plain_data / "data" / "shards"
    assert load_sidecar(shards) is None and not list(shards.glob(f"{SIDECAR}_*"))
    manifest = json.loads((shards / "manifest.json").read_text())
    assert "case_transform" not in manifest and "val_byte_sidecar" not in manifest
    tables = build_byte_tables(plain_data / "data" / "tokenizer" / "tokenizer.model", 512)
    assert isinstance(load_byte_source(shards, plain_data / "data/tokenizer/tokenizer.model", 512), ByteTables)
    metrics = json.loads((plain_data / "data" / "metrics" / "shards.json").read_text())
    assert metrics["val_bytes"] == stream_bytes(tables, load_split(shards, "val"))


def reference_token_bytes(transformed: str, offsets) -> list[int]:
    """Per token, original bytes of its span, walking the text with an escape flag."""
    weights, escaped = [], False
    for ch in transformed:
        if escaped:
            weights.append(len(ch.encode("utf-8")))
            escaped = False
        elif ch == caseops.ESC:
            weights.append(0)
            escaped = True
        else:
            weights.append(0 if ch in caseops.CONTROLS else len(ch.encode("utf-8")))
    return [sum(weights[a:b]) for a, b in offsets]


@pytest.mark.parametrize("doc", [
    "The NASA Launch of iPhone by OpenAI",
    "  Hello  World\n\nFOO-bar ① 漢字 😀 end  ",
    f"literal {caseops.TITLE}X{caseops.ESC}{caseops.ESC} controls ÀB",
    "Ⅻ ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ  tabs\tand\u00a0nbsp",
])
def test_per_token_bytes_match_a_slow_reference_with_the_records_tokenizer(doc):
    import sentencepiece as spm
    model = CASEOPS_MODEL.read_bytes()
    with DocumentEncoder(model, 1, "caseops") as encoder:
        [(tokens, counts)] = list(encoder.encode_with_bytes([doc]))
    transformed = caseops.encode(doc)
    mapped = spm.SentencePieceProcessor(model_proto=model).encode(transformed, return_type="offset_mapping")
    assert tokens.tolist() == [BOS_ID, *mapped["ids"]]
    assert counts.tolist() == [0, *reference_token_bytes(transformed, mapped["offsets"])]
    # SentencePiece drops leading/trailing whitespace; everything else is charged at original length.
    assert int(counts.sum()) == len(doc.strip().encode("utf-8"))


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_whole_embedded_val_split_with_the_records_tokenizer(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    stages.corpus.run({"corpus": params["corpus"]}, tmp_path)
    docs = list(iter_jsonl(tmp_path / "data" / "corpus" / "val.jsonl"))
    model = CASEOPS_MODEL.read_bytes()
    with DocumentEncoder(model, 2, "caseops") as encoder:
        val, side = write_val_with_sidecar(encoder.encode_with_bytes(docs), tmp_path / "out", 100_000)
    sidecar = load_sidecar(tmp_path / "out")
    assert int(sidecar.sum(dtype=np.int64)) == sum(len(d.encode("utf-8")) for d in docs)
    tokens = load_split(tmp_path / "out", "val")
    assert np.array_equal(tokens, encode_documents(model, docs, 1, "caseops"))
    assert [i.tokens for i in val] == [i.tokens for i in side] and len(val) >= 2


class CausalBigramLM(nn.Module):
    """A positive "NLL" per (input, target) pair: causal, cheap, trainable (for TTT)."""

    def __init__(self, vocab: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=gen))

    def token_nll(self, ids, targets):
        return nn.functional.softplus(self.table[ids, targets]).float()


def table_sidecar(tables: ByteTables, stream: np.ndarray) -> SidecarBytes:
    """The tables' per-target bytes stored by position, as a sidecar would."""
    ids = torch.from_numpy(stream.astype(np.int64))
    per_target = target_bytes(tables, ids[:-1], ids[1:]).numpy()
    return SidecarBytes(np.concatenate([[0], per_target]).astype(np.uint16))


@pytest.mark.slow  # > 1 s: kept out of the fast lane
def test_evals_with_a_sidecar_equal_evals_with_tables_when_the_transform_is_off(plain_data):
    stream = load_split(plain_data / "data" / "shards", "val")[:2001]
    tables = build_byte_tables(plain_data / "data" / "tokenizer" / "tokenizer.model", 512)
    sidecar = table_sidecar(tables, np.asarray(stream))
    assert stream_bytes(sidecar, stream) == stream_bytes(tables, stream)
    tokens = torch.from_numpy(np.asarray(stream, dtype=np.int64))
    windows = EvalSlidingConfig(seq_len=64, stride=16, batch_windows=5, trim_to_seq_len=False, compile=False)
    ttt = EvalTTTConfig(chunk_tokens=500, epochs=1, optimizer="sgd", lr=0.05, lr_schedule="cosine", momentum=0.9,
                    beta2=0.999, weight_decay=0.0, freeze_blocks=0, grad_clip=1.0, batch_seqs=4)
    results = {}
    for name, source in (("tables", tables), ("sidecar", sidecar)):
        results[name] = (score_sliding_windows(CausalBigramLM(512), tokens, source, windows).sums,
                         score_nonoverlapping(CausalBigramLM(512), tokens, source, windows).sums,
                         run_ttt(CausalBigramLM(512), tokens, source, windows, ttt).sums)
    assert results["tables"] == results["sidecar"]
    assert results["tables"][0].byte_sum == stream_bytes(tables, stream) > 0
    assert all(math.isfinite(s.val_bpb) for s in results["tables"])


def test_evals_charge_the_sidecar_not_the_tables_under_caseops(caseops_data):
    shards = caseops_data / "data" / "shards"
    source = load_byte_source(shards, caseops_data / "data/tokenizer/tokenizer.model", 512)
    assert isinstance(source, SidecarBytes)
    tokens = torch.from_numpy(load_split(shards, "val").astype(np.int64))
    windows = EvalSlidingConfig(seq_len=128, stride=64, batch_windows=8, trim_to_seq_len=False, compile=False)
    sums = score_sliding_windows(CausalBigramLM(512), tokens, source, windows).sums
    original = utf8_bytes(caseops_data / "data" / "corpus" / "val.jsonl")
    assert sums.byte_sum == original and sums.scored_tokens == tokens.numel() - 1
    trimmed = dict(windows.__dict__, trim_to_seq_len=True)
    from pgolf.eval.sliding import prepare_tokens
    cut = prepare_tokens(load_split(shards, "val"), 128, True, torch.device("cpu"), "val")
    part = score_sliding_windows(CausalBigramLM(512), cut, source, EvalSlidingConfig(**trimmed)).sums
    assert part.byte_sum == int(load_sidecar(shards)[1:cut.numel()].sum(dtype=np.int64))


def test_missing_or_misaligned_sidecar_is_refused(caseops_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(caseops_data / "data" / "shards", shards)
    tokenizer = caseops_data / "data" / "tokenizer" / "tokenizer.model"
    short = np.asarray(read_shard(shards / "val_bytes_000001.bin"))[:-1]
    write_shard(shards / "val_bytes_000001.bin", short)
    with pytest.raises(DataError, match="val_bytes_000001.bin: not aligned with val_000001.bin"):
        load_byte_source(shards, tokenizer, 512)
    (shards / "val_bytes_000002.bin").unlink()
    with pytest.raises(DataError, match="2 val_bytes files for 3 val shards"):
        load_sidecar(shards)
    for path in shards.glob(f"{SIDECAR}_*.bin"):
        path.unlink()
    with pytest.raises(DataError, match="CaseOps tokenizer.*never from byte tables"):
        load_byte_source(shards, tokenizer, 512)
    with pytest.raises(ValueError, match="pass target_positions"):
        target_bytes(SidecarBytes(np.zeros(4, np.uint16)), torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long))


def write_random_artifact(root: Path) -> None:
    """A random-init GPT (vocab 512, tiny widths) stored losslessly as the quantize stage would."""
    from pgolf.config import from_params
    from pgolf.model.gpt import GPT, ModelConfig, unbank_state_dict
    from pgolf.quant.artifact import StoredTensor, write_artifact

    model_params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["model"]
    model_params.update(vocab_size=512, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                        rope_dims=8, xsa_layers=[1], ve_layers=[1], ve_dim=8, bigram_buckets=64, bigram_dim=16)
    cfg = from_params(ModelConfig, {"model": model_params}, "model")
    torch.manual_seed(0)
    model = GPT(cfg)
    tensors = [StoredTensor(name, tuple(t.shape), "float32", "passthrough", raw=t.detach().float())
               for name, t in sorted(unbank_state_dict(model.state_dict(), cfg).items())]
    write_artifact(root / "artifacts/quant/model.ptz", tensors, cfg.to_dict(), {}, "zstd", 1)


@pytest.mark.slow
def test_both_eval_stages_charge_the_sidecar(caseops_data, tmp_path):
    import stages.eval_sliding
    import stages.eval_ttt

    write_random_artifact(tmp_path)
    for sub in ("data/shards", "data/tokenizer"):
        (tmp_path / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub).symlink_to(caseops_data / sub, target_is_directory=True)
    params = {"launch": {"nproc_per_node": 1, "device": "cpu"},
              "eval_sliding": {"seq_len": 128, "stride": 128, "batch_windows": 64, "trim_to_seq_len": True,
                               "compile": False, **TILT_OFF},
              # one chunk: TTT scores everything and never trains (fast; the byte path is the same)
              "eval_ttt": to_dict(EvalTTTConfig(**{"chunk_tokens": 65536, "epochs": 1, "optimizer": "sgd", "lr": 0.001,
                           "lr_schedule": "cosine", "momentum": 0.9, "beta2": 0.999, "weight_decay": 0.0,
                           "freeze_blocks": 0, "grad_clip": 1.0, "batch_seqs": 32, **TILT_OFF}))}
    sidecar = load_sidecar(caseops_data / "data" / "shards")
    targets = (sidecar.size - 1) // 128 * 128
    expected = int(sidecar[1:targets + 1].sum(dtype=np.int64))
    sliding = stages.eval_sliding.run(params, tmp_path)
    ttt = stages.eval_ttt.run(params, tmp_path)
    assert sliding["scored_tokens"] == ttt["scored_tokens"] == targets
    assert sliding["bytes"] == ttt["bytes"] == expected
