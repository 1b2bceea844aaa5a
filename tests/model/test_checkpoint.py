"""Checkpoint save/load: exact round trip, and one clear DataError per kind of bad file."""
from __future__ import annotations

import pytest
import torch

from pgolf.model import checkpoint as ckpt_mod
from pgolf.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from pgolf.errors import DataError
from pgolf.model.gpt import GPT
from tests.helpers import tiny_model_config

CFG = tiny_model_config(vocab_size=64, num_layers=3, num_heads=4, num_kv_heads=2, rope_dims=4,
                        rope_base=22082.0, xsa_layers=[2], ve_layers=[1, 2], bigram_buckets=16, bigram_dim=8,
                        attention_backend="cudnn")


def trained_like_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_round_trip_is_exact(tmp_path):
    model = trained_like_model()
    meta = {"step": 300, "val_loss": 3.25, "tags": ["ema", None], "nested": {"ok": True}}
    path = tmp_path / "model.pt"
    save_checkpoint(path, CFG, model.state_dict(), meta)
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == CFG
    assert ckpt.meta == meta
    assert set(ckpt.state_dict) == set(model.state_dict())
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())
    rebuilt = build_model(ckpt, "cpu")
    assert not rebuilt.qat_enabled and rebuilt.qat_bits is None
    ids = torch.randint(0, CFG.vocab_size, (2, 7))
    assert torch.equal(rebuilt.forward_logits(ids), model.forward_logits(ids))
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_file_layout_is_plain_data(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, CFG, GPT(CFG).state_dict(), {})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "pgolf-checkpoint" and payload["version"] == 1
    assert payload["model_config"]["xsa_layers"] == [2]
    assert set(payload) == {"format", "version", "model_config", "state_dict", "meta"}


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_corrupt_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_checkpoint(good, CFG, GPT(CFG).state_dict(), {})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(cut)


def _payload(**changes):
    payload = {"format": "pgolf-checkpoint", "version": 1, "model_config": CFG.to_dict(),
               "state_dict": GPT(CFG).state_dict(), "meta": {}}
    payload.update(changes)
    return payload


@pytest.mark.parametrize("changes,message", [
    ({"format": "something-else"}, "not a pgolf-checkpoint file"),
    ({"version": 2}, "checkpoint version 2, expected 1"),
    ({"meta": [1, 2]}, "'meta' missing or not a dict"),
    ({"model_config": {**CFG.to_dict(), "num_heads": 5}}, r"bad model_config: model_config\.model_dim"),
    ({"model_config": {**CFG.to_dict(), "rope": 1}}, r"bad model_config: model_config\.rope: unknown key"),
])
def test_wrong_format_version_or_config(tmp_path, changes, message):
    path = tmp_path / "bad.pt"
    torch.save(_payload(**changes), path)
    with pytest.raises(DataError, match=f"bad.pt: {message}"):
        load_checkpoint(path)


def test_state_dict_must_match_the_config(tmp_path):
    path = tmp_path / "bad.pt"
    sd = GPT(CFG).state_dict()
    sd["kv_bank"] = sd["kv_bank"][:, :8]
    torch.save(_payload(state_dict=sd), path)
    with pytest.raises(DataError, match=r"bad.pt: state_dict\['kv_bank'\] has shape"):
        load_checkpoint(path)
    sd = GPT(CFG).state_dict()
    del sd["smear.gate"]
    torch.save(_payload(state_dict=sd), path)
    with pytest.raises(DataError, match=r"missing \['smear.gate'\]"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="does not match model_config"):
        save_checkpoint(tmp_path / "never.pt", CFG, sd, {})
    assert not (tmp_path / "never.pt").exists()


def test_non_json_meta_is_rejected_before_writing(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "m.pt", CFG, GPT(CFG).state_dict(), {"t": torch.zeros(1)})
    assert not (tmp_path / "m.pt").exists()


def test_failed_write_leaves_old_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, CFG, GPT(CFG).state_dict(), {"step": 1})
    before = path.read_bytes()

    def exploding_save(obj, f):
        f.write(b"partial")  # checkpoints are saved through an open file (fixed bytes, issue 18.10)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", exploding_save)
    with pytest.raises(OSError):
        save_checkpoint(path, CFG, GPT(CFG).state_dict(), {"step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
