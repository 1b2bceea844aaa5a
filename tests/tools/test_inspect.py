"""`pgolf inspect`: every artifact kind recognised by content, key facts right, clean one-line errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.quant.artifact import FORMAT_VERSION, HEADER_BYTES, read_artifact
from pgolf.model.checkpoint import save_checkpoint
from pgolf.tools.cli import main
from pgolf.quant.hessian_file import HessianSet, save_hessians
from pgolf.io import write_json_atomic
from pgolf.data.shards import write_shard
from pgolf.submission.size import report_dict, size_report
from pgolf.train.resume import mark_finished
from tests.helpers.models import tiny_model, write_tiny_artifact

REPO = Path(__file__).resolve().parents[2]

def inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(capsys, *args: str) -> dict:
    code, out, err = inspect(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


# --- data files --------------------------------------------------------------------

def test_corpus_jsonl(tiny_data, capsys):
    path = tiny_data / "data/corpus/val.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    facts = inspect_json(capsys, path)
    assert facts["kind"] == "corpus_jsonl"
    assert facts["documents"] == len(texts) == 40
    assert facts["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert facts["doc_bytes_max"] == max(len(t.encode("utf-8")) for t in texts)
    assert texts[0].startswith(facts["first_doc_preview"])
    code, out, _ = inspect(capsys, path)
    assert code == 0 and "corpus documents (JSONL)" in out and "documents: 40," in out
    assert json.dumps(texts[0][:40])[:-1] in out  # the preview, escaped on one line


def test_tokenizer_model(tiny_data, capsys):
    path = tiny_data / "data/tokenizer/tokenizer.model"
    facts = inspect_json(capsys, path)
    assert facts["kind"] == "tokenizer" and facts["vocab_size"] == 512
    assert facts["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert facts["byte_fallback"] == {"pieces": 256, "first_id": 4, "last_id": 259, "contiguous": True}
    assert facts["challenge_layout"] is True and facts["layout_problem"] is None
    assert facts["piece_counts"]["normal"] == 512 - 4 - 256
    assert facts["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    code, out, _ = inspect(capsys, path)
    assert "vocab size: 512" in out and "byte fallback: 256 pieces, ids 4..259" in out
    assert "challenge layout (0-3 specials, 4-259 <0x00>..<0xFF>): yes" in out


def test_tokenizer_recognised_under_any_name(sp8192_model_path, tmp_path, capsys):
    renamed = tmp_path / "weights.bin"
    shutil.copyfile(sp8192_model_path, renamed)
    facts = inspect_json(capsys, renamed)
    assert facts["kind"] == "tokenizer" and facts["vocab_size"] == 8192 and facts["challenge_layout"]


def test_shard_header_counts_and_decoded_slice(tiny_data, capsys):
    path = tiny_data / "data/shards/val_000000.bin"
    tokenizer = tiny_data / "data/tokenizer/tokenizer.model"
    body = np.fromfile(path, dtype="<u2", offset=1024)
    facts = inspect_json(capsys, path, "--tokenizer", tokenizer, "--count", 30)
    assert facts["kind"] == "shard" and facts["num_tokens"] == body.size
    assert facts["documents"] == int((body == 1).sum()) == 40 and facts["max_id"] == int(body.max())
    assert facts["slice"]["ids"] == body[:30].tolist()
    # The slice starts at the first document's BOS; its text is the start of that
    # document as the tokenizer normalises it.
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    first_doc = json.loads((tiny_data / "data/corpus/val.jsonl").open(encoding="utf-8").readline())["text"]
    text = facts["slice"]["text"]
    assert text.startswith("<s>") and len(text) > 40
    assert sp.decode(sp.encode(first_doc)).startswith(text.removeprefix("<s>"))

    later = inspect_json(capsys, path, "--tokenizer", tokenizer, "--offset", 100, "--count", 7)
    assert later["slice"]["ids"] == body[100:107].tolist()
    assert later["slice"]["text"] == sp.decode(body[100:107].tolist())
    code, out, _ = inspect(capsys, path, "--tokenizer", tokenizer, "--count", 5)
    assert f"header: magic 20240520, version 1, {body.size:,} tokens" in out
    assert "tokens [0, 5): " + " ".join(map(str, body[:5])) in out and 'text (<s> = BOS): "<s>' in out


def test_shard_slice_bos_marks_every_document_boundary(tmp_path, tiny_data, capsys):
    tokenizer = tiny_data / "data/tokenizer/tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = [1, *sp.encode("Peace and war"), 1, *sp.encode("Congress")]
    write_shard(tmp_path / "s.bin", np.array(ids, dtype=np.uint16))
    facts = inspect_json(capsys, tmp_path / "s.bin", "--tokenizer", tokenizer)
    assert facts["slice"]["text"] == "<s>Peace and war<s>Congress" and facts["documents"] == 2


def test_shard_without_tokenizer_shows_ids_and_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/tokenizer/tokenizer.model here
    write_shard(tmp_path / "s.bin", np.array([1, 7, 9], dtype=np.uint16))
    facts = inspect_json(capsys, "s.bin")
    assert facts["slice"]["ids"] == [1, 7, 9] and facts["slice"]["text"] is None
    assert "pass --tokenizer" in facts["slice"]["note"]


def test_shard_directory_totals_match_the_manifest(tiny_data, capsys):
    facts = inspect_json(capsys, tiny_data / "data/shards")
    manifest = json.loads((tiny_data / "data/shards/manifest.json").read_text())
    for split in ("train", "val"):
        want = manifest["splits"][split]
        got = facts["shard_splits"][split]
        assert (got["files"], got["tokens"], got["documents"]) == (len(want["files"]), want["tokens"], want["documents"])
    assert {f["kind"] for f in facts["files"]} == {"shard", "shards_manifest"}
    assert facts["errors"] == [] and facts["skipped"] == []
    listed = {f["path"]: f for f in facts["files"]}
    assert listed[str(tiny_data / "data/shards/manifest.json")]["data"] == manifest


# --- model files -------------------------------------------------------------------

def test_checkpoint_parameter_table_and_meta(tmp_path, capsys):
    model = tiny_model()
    meta = {"weights": "ema", "weights_reason": "lowest held-out loss", "steps": 40, "tokens": 20480,
            "holdout_loss": {"live": 4.25, "ema": 4.125, "swa": None}, "swa_count": 3, "seed": 7,
            "stopped_by": "max_steps", "qat": {"enabled": True, "bits": 6, "from_step": 30}}
    path = tmp_path / "anything.pt"
    save_checkpoint(path, model.cfg, model.state_dict(), meta)
    facts = inspect_json(capsys, path)
    assert facts["kind"] == "checkpoint" and facts["model_config"] == model.cfg.to_dict()
    state = model.state_dict()
    assert facts["num_parameters"] == sum(t.numel() for t in state.values())
    table = {p["name"]: p for p in facts["parameters"]}
    assert set(table) == set(state)
    for name, t in state.items():
        reference = float(np.sqrt((t.detach().numpy().astype(np.float64) ** 2).sum()))
        assert table[name]["norm"] == pytest.approx(reference, rel=1e-12, abs=1e-300)
        assert table[name]["shape"] == list(t.shape) and table[name]["dtype"] == "float32"
    assert facts["weights"] == "ema" and facts["holdout_loss"] == meta["holdout_loss"]
    code, out, _ = inspect(capsys, path)
    assert "weights: ema (lowest held-out loss)" in out
    assert "held-out loss (nats): live 4.25, ema 4.125, swa n/a" in out
    assert "late QAT 6 bits from step 30" in out and "qo_bank" in out


def _spd(eigenvalues: np.ndarray, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigenvalues.size,) * 2))
    return torch.from_numpy(q @ np.diag(eigenvalues) @ q.T).float()


def test_hessian_trace_and_condition_number_match_a_float64_reference(tmp_path, capsys):
    eig = np.geomspace(1.0, 1000.0, 24)
    well = _spd(eig, 0)
    singular = _spd(np.linspace(0.5, 8.0, 16), 1).double()
    singular[3, :] = 0  # an input that never fired: zero row/column, so H is singular
    singular[:, 3] = 0
    hs = {"blocks.10.mlp.fc": well, "blocks.2.attn.qkv": singular.float()}
    save_hessians(tmp_path / "h.pt", HessianSet(hessians=hs, num_tokens=4096, num_sequences=16))
    facts = inspect_json(capsys, tmp_path / "h.pt")
    assert facts["kind"] == "hessians" and facts["num_tokens"] == 4096 and facts["num_sequences"] == 16
    assert list(facts["matrices"]) == ["blocks.2.attn.qkv", "blocks.10.mlp.fc"]  # natural order
    stored = well.numpy().astype(np.float64)  # float32 as saved, then float64 maths
    ref = np.linalg.eigvalsh(stored)
    row = facts["matrices"]["blocks.10.mlp.fc"]
    assert row["size"] == 24 and row["dead_columns"] == 0
    assert row["trace"] == pytest.approx(np.trace(stored), rel=1e-12)
    assert row["eig_min"] == pytest.approx(ref[0], rel=1e-9)
    assert row["condition_number"] == pytest.approx(ref[-1] / ref[0], rel=1e-9)
    assert row["condition_number"] == pytest.approx(1000.0, rel=1e-3)  # the spectrum it was built with
    bad = facts["matrices"]["blocks.2.attn.qkv"]
    assert bad["dead_columns"] == 1 and bad["eig_min"] == pytest.approx(0.0, abs=1e-5)
    code, out, _ = inspect(capsys, tmp_path / "h.pt")
    assert "2 matrices from 16 sequences / 4,096 tokens" in out and "dead cols" in out


def test_quantized_artifact_with_and_without_report(tmp_path, capsys):
    path = tmp_path / "quant" / "model.ptz"
    path.parent.mkdir()
    model = write_tiny_artifact(path)
    art = read_artifact(path)
    facts = inspect_json(capsys, path)
    assert facts["kind"] == "quantized_artifact"
    assert (facts["format_version"], facts["compressor"]) == (FORMAT_VERSION, "lzma")
    assert facts["file_bytes"] == path.stat().st_size
    assert facts["num_parameters"] == sum(t.numel() for t in model.state_dict().values())
    rows = {r["name"]: r for r in facts["tensors"]}
    report = {r["name"]: r for r in json.loads((path.parent / "report.json").read_text())}
    for t, in_file in zip(art.tensors, art.frame_bytes):
        assert rows[t.name]["bits"] == t.bits and rows[t.name]["stored_bytes"] == t.stored_bytes()
        assert rows[t.name]["weight_mse"] == report[t.name]["weight_mse"]
        assert rows[t.name]["file_bytes"] == in_file
    assert HEADER_BYTES + facts["index_frame_bytes"] + sum(g["file_bytes"] for g in facts["by_storage"].values()) \
        == facts["file_bytes"]
    assert rows["blocks.0.mlp.fc.weight"]["bits"] == 5 and rows["blocks.0.attn.c_q.weight"]["bits"] == 6
    assert rows["tok_emb.weight"]["bits"] == 8
    assert facts["by_storage"]["int5"]["tensors"] == 6  # fc and proj of 3 layers
    code, out, _ = inspect(capsys, path)
    assert f"format version {FORMAT_VERSION}, compressor lzma level 6" in out and "weight mse" in out
    assert "in file" in out and "index frame" in out

    alone = tmp_path / "elsewhere.bin"
    shutil.copyfile(path, alone)
    facts = inspect_json(capsys, alone)
    assert facts["report"] is None and all(r["weight_mse"] is None for r in facts["tensors"])


def test_train_averages_and_resume_marker(tmp_path, capsys):
    state = {k: v.detach().clone() for k, v in tiny_model().state_dict().items()}
    torch.save({"format": "pgolf-train-averages", "version": 1, "chosen": "swa",
                "holdout_loss": {"live": 4.0, "ema": 3.9, "swa": 3.8}, "swa_count": 5, "ema_updates": 40,
                "weights": {"live": state, "ema": state, "swa": None}}, tmp_path / "a.pt")
    facts = inspect_json(capsys, tmp_path / "a.pt")
    numel = sum(t.numel() for t in state.values())
    assert facts["kind"] == "train_averages" and facts["chosen"] == "swa"
    assert facts["candidate_numel"] == {"live": numel, "ema": numel, "swa": None}
    mark_finished(tmp_path / "state.pt", "abc123", 40)
    facts = inspect_json(capsys, tmp_path / "state.pt")
    assert facts["kind"] == "resume_state" and facts["finished"] is True and facts["step"] == 40


# --- reports -----------------------------------------------------------------------

def test_reports_are_recognised_by_keys_not_names(tmp_path, capsys):
    write_tiny_artifact(tmp_path / "model.ptz", with_report=False)
    (tmp_path / "code.py").write_text("x = 1\n")
    size = report_dict(size_report(tmp_path / "model.ptz", tmp_path, files=["code.py"]))
    sliding = {"val_loss": 2.5, "val_bpb": 1.23456789, "scored_tokens": 4096, "bytes": 12000, "seconds": 1.5,
               "tokens_per_s": 2730.7, "windows": 64, "nonoverlap_val_loss": 2.6, "nonoverlap_val_bpb": 1.28,
               "nonoverlap_seconds": 0.2, "world_size": 1, "device": "cpu", "size_warning": False}
    ttt = {**{k: sliding[k] for k in ("scored_tokens", "bytes", "seconds", "windows", "world_size")},
           "val_loss": 2.45, "val_bpb": 1.2, "chunks": 4, "train_steps": 9, "sliding_val_bpb": 1.23456789,
           "gain_vs_sliding": 0.03456789, "tokens_per_s": 100.0, "device": "cpu", "size_warning": False}
    chunks = [{"chunk": 0, "running_bpb": 1.3, "chunk_bpb": 1.3}, {"chunk": 1, "running_bpb": 1.25, "chunk_bpb": 1.2}]
    expected = {"a.json": (size, "size_report", f"= {size['total_bytes']:,} of 16,000,000 bytes: fits"),
                "b.json": (sliding, "eval_sliding_metrics", "val_bpb 1.23456789, val_loss 2.500000 nats"),
                "c.json": (ttt, "eval_ttt_metrics", "gain_vs_sliding: 0.0345679"),
                "d.json": (chunks, "ttt_chunks", "best chunk: 1 at 1.2 bpb")}
    for name, (data, kind, phrase) in expected.items():
        write_json_atomic(tmp_path / name, data)
        facts = inspect_json(capsys, tmp_path / name)
        assert facts["kind"] == kind
        code, out, _ = inspect(capsys, tmp_path / name)
        assert phrase in out, out
    assert inspect_json(capsys, tmp_path / "a.json")["data"] == size


def test_train_log(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("train: 25,170 parameters, world 1, grad accum 2, 512 tokens/step, device cpu, compile False; "
                   "no resume state\n"
                   "step 1/40 loss 6.2000 lr_scale 1.000 grad_norm 1.000 tok/s 9,000 train_time 0.1s swa 0\n"
                   "step 40/40 loss 4.1234 lr_scale 0.000 grad_norm 0.300 tok/s 9,500 train_time 2.5s swa 5\n"
                   "final weights: swa (lowest held-out loss; 5 SWA snapshots)\n")
    facts = inspect_json(capsys, log)
    assert facts["kind"] == "train_log" and facts["step_lines"] == 2 and facts["last_step"] == 40
    assert facts["last_loss"] == 4.1234 and facts["final_weights"].startswith("swa")


# --- errors ------------------------------------------------------------------------

def _bad_files(tmp_path: Path, tiny_data: Path) -> dict[str, Path]:
    files = {}
    files["unknown"] = tmp_path / "notes.txt"
    files["unknown"].write_text("just some notes\n")
    shard = (tiny_data / "data/shards/val_000000.bin").read_bytes()
    files["truncated_shard"] = tmp_path / "val_000000.bin"
    files["truncated_shard"].write_bytes(shard[:len(shard) // 2])
    write_tiny_artifact(tmp_path / "good.ptz", with_report=False)
    blob = bytearray((tmp_path / "good.ptz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    files["corrupted_ptz"] = tmp_path / "model.ptz"
    files["corrupted_ptz"].write_bytes(bytes(blob))
    files["random_bytes"] = tmp_path / "random.bin"
    files["random_bytes"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["truncated_torch"] = tmp_path / "model.pt"
    torch.save({"format": "pgolf-checkpoint", "x": torch.zeros(1000)}, tmp_path / "full.pt")
    files["truncated_torch"].write_bytes((tmp_path / "full.pt").read_bytes()[:900])
    files["foreign_torch"] = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, files["foreign_torch"])
    files["unknown_json"] = tmp_path / "metrics.json"
    files["unknown_json"].write_text('{"accuracy": 0.9}')
    files["bad_jsonl"] = tmp_path / "train.jsonl"
    files["bad_jsonl"].write_text('{"text": "fine"}\n{"text": 5}\n')
    return files


@pytest.mark.parametrize("case", ["unknown", "truncated_shard", "corrupted_ptz", "random_bytes",
                                  "truncated_torch", "foreign_torch", "unknown_json", "bad_jsonl"])
def test_bad_file_gives_one_error_line_and_exit_1(case, tmp_path, tiny_data, capsys):
    path = _bad_files(tmp_path, tiny_data)[case]
    for extra in ([], ["--json"]):
        code, out, err = inspect(capsys, path, *extra)
        assert code == 1 and out == ""
        assert err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


def test_bad_arguments_are_one_line_errors(tiny_data, tmp_path, capsys):
    shard = tiny_data / "data/shards/val_000000.bin"
    code, _, err = inspect(capsys, shard, "--offset", 10**9)
    assert code == 1 and "past the end" in err and err.count("\n") == 1
    code, _, err = inspect(capsys, shard, "--tokenizer", tmp_path / "missing.model")
    assert code == 1 and err == f"error: {tmp_path / 'missing.model'}: tokenizer model not found\n"
    code, _, err = inspect(capsys, tmp_path / "nothing-here")
    assert code == 1 and err == f"error: {tmp_path / 'nothing-here'}: no such file or directory\n"


def test_directory_lists_skipped_files_and_reports_corrupt_ones(tiny_data, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_data / "data/shards", folder)
    (folder / "README").write_text("hand-written notes\n")
    (folder / "live.json").write_text('{"step": 3, "train_loss": 4.5}')  # another tool's JSON: skipped
    (folder / ".manifest.json.123.tmp").write_text("half")  # a leftover temp file: hidden, ignored
    data = (folder / "train_000002.bin").read_bytes()
    (folder / "train_000002.bin").write_bytes(data[:-2])
    code, out, err = inspect(capsys, folder)
    assert code == 1
    assert err == (f"error: {folder / 'train_000002.bin'}: file is {len(data) - 2} bytes but its header says "
                   f"{(len(data) - 1024) // 2} tokens ({len(data)} bytes)\n")
    assert f"skipped (not a pgolf artifact): {folder / 'README'}" in out
    assert f"skipped (not a pgolf artifact): {folder / 'live.json'}" in out
    assert "train_000001.bin: token shard" in out and ".tmp" not in out


@pytest.mark.slow
def test_module_entry_point_exit_code(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run([sys.executable, "-m", "pgolf", "inspect", str(junk)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: {junk}: unrecognised file (no pgolf artifact magic, JSON keys or log lines)\n"
