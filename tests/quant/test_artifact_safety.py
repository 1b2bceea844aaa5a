"""Files the pipeline writes and reads back, under hostile or repeated use (issue 18).

* Same inputs, same bytes: checkpoints, weight averages and Hessians
  (``torch.save`` used to record its random temporary file name in the zip).
* Non-finite weights are refused when quantising and when reading an artifact;
  metrics JSON never holds NaN/Inf; ``pgolf inspect`` flags them.
* A crafted ``.ptz`` (decompression bomb) is refused within a small memory ceiling.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import link_data, tiny_train_params

from pgolf.model.checkpoint import save_checkpoint
from pgolf.model.gpt import GPT, ModelConfig
from pgolf.quant.hessians import HessianSet, save_hessians

CFG = ModelConfig(
    vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
    mlp_leaky_slope=0.5, tie_embeddings=True, logit_softcap=30.0, tok_emb_init_std=0.005,
    ln_scale=True, unet_skips=True, resid_mix=True, rope_dims=4, rope_base=10000.0, qk_norm=True,
    qk_gain_init=1.5, xsa_layers=(1,), ve_layers=(1,), ve_dim=8, smear_gate=True,
    bigram_buckets=16, bigram_dim=8, vrl=True, attention_backend="auto", residual_dtype="autocast")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- item 10: deterministic tensor files -----------------------------------------------

def test_same_tensors_saved_to_different_paths_have_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    a, b = tmp_path / "a" / "model.pt", tmp_path / "bb" / "other_name.pt"
    save_checkpoint(a, CFG, state, {"step": 3})
    save_checkpoint(b, CFG, state, {"step": 3})
    assert sha256(a) == sha256(b)
    hs = HessianSet(hessians={"blocks.0.attn.qkv": torch.eye(4)}, num_tokens=10, num_sequences=2)
    save_hessians(tmp_path / "h1.pt", hs)
    save_hessians(tmp_path / "dir" / "hessians.pt", hs)
    assert sha256(tmp_path / "h1.pt") == sha256(tmp_path / "dir" / "hessians.pt")
    from pgolf.io import save_tensor_file
    payload = {"weights": {"live": {"w": torch.ones(3)}}, "chosen": "live"}
    save_tensor_file(tmp_path / "x.pt", payload)
    save_tensor_file(tmp_path / "y.pt", payload)
    assert sha256(tmp_path / "x.pt") == sha256(tmp_path / "y.pt")
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.usefixtures("one_thread")
def test_two_tiny_training_runs_write_byte_identical_checkpoints(tmp_path, tiny_data):
    import stages.train
    params = tiny_train_params(train={"max_steps": 6, "warmdown_steps": 3, "log_every": 3})
    hashes = []
    for run in ("run1", "run2"):
        root = link_data(tmp_path / run, tiny_data)
        stages.train.run(params, root)
        hashes.append({name: sha256(root / "artifacts/train" / name) for name in ("model.pt", "averages.pt")})
    assert hashes[0] == hashes[1]
