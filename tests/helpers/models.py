"""Tiny real models and the files the model stages leave: a perturbed GPT, Hessian and
quantize settings, a hessians → quantize run directory, a ``.ptz`` artifact, an eval root."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import yaml

from tests.helpers import REPO, link_data, tiny_model_config

# vocab 64, 3 layers, VRL, value embeddings and XSA on: the model of the
# Hessian, quantize, artifact and inspect tests.
TINY_GPT = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                tok_emb_init_std=0.02, xsa_layers=[2], ve_layers=[1, 2], bigram_buckets=32, bigram_dim=8)


def tiny_model(seed: int = 0, **over):
    """A tiny GPT (TINY_GPT, with ``over`` on top) with every parameter perturbed (the zero-initialised
    O/down banks too)."""
    from pgolf.model.gpt import GPT
    torch.manual_seed(seed)
    model = GPT(tiny_model_config(**{**TINY_GPT, **over}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


FRONTIER_BOS, FRONTIER_VOCAB = 1, 64


def frontier_config(**over):
    """6 layers, recurrence (8 visits), two lanes, gates, document-local attention: every forward path."""
    from pgolf.model.config import ModelConfig
    values = dict(vocab_size=FRONTIER_VOCAB, num_layers=6, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
                  mlp_leaky_slope=0.5, tie_embeddings=True, logit_softcap=30.0, tok_emb_init_std=0.005,
                  ln_scale=True, unet_skips=True, resid_mix=True, rope_dims=4, rope_base=10000.0, qk_norm=True,
                  qk_gain_init=5.0, xsa_layers=tuple(range(6)), ve_layers=(), ve_dim=0, smear_gate=False,
                  bigram_buckets=0, bigram_dim=0, vrl=False, attention_backend="auto", residual_dtype="float32",
                  skip_gates=True, recur_start=2, recur_end=3, recur_loops=1, parallel_start_layer=4,
                  attn_gate_window=4, attn_gate_scale=0.5, input_smear_window=4, input_smear_bos_mask=True,
                  doc_attention=True, doc_attention_impl="dense", bos_id=FRONTIER_BOS)
    values.update(over)
    return ModelConfig(**values)


def random_float64(cfg, seed: int = 0, std: float = 0.4):
    """Float64 GPT of ``cfg`` with every parameter drawn N(0, std²) (zero-initialised gates would hide mistakes)."""
    from pgolf.model.gpt import GPT
    torch.manual_seed(seed)
    model = GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model.eval()


def hessian_config(**over):
    from pgolf.quant.hessians import HessiansConfig
    base = dict(source="train", seq_len=16, train_batches=2, train_batch_seqs=3, ar_num_seqs=5,
                ar_batch_seqs=2, ar_temperature=0.8, seed=1)
    return HessiansConfig(**{**base, **over})


# The hessians, quantize and size sections for a run on tiny_model().
QUANT_PARAMS = {
    "launch": {"nproc_per_node": 1, "device": "cpu"},
    "hessians": {"source": "train", "seq_len": 16, "train_batches": 2, "train_batch_seqs": 4,
                 "ar_num_seqs": 4, "ar_batch_seqs": 2, "ar_temperature": 0.8, "seed": 0,
                 "head": False, "activation_rms": False, "forward_seqs": 0},
    "quantize": {"method": "gptq", "damp": 0.01, "block_size": 16, "act_order": True,
                 "clip_candidates": [0.999, 1.0], "clip_metric": "weight_mse", "attn_bits": 6,
                 "mlp_bits": 6, "embed_bits": 8, "embed_clip_quantile": 0.9999, "passthrough_numel": 256,
                 "compressor": "zstd", "zstd_level": 10, "lzma_preset": 6, "prune": False,
                 "prune_margin_bytes": 0, "fit_to_limit": False,
                 "fit_min_bits": 5, "clip": "search", "sdclip_k_attn": 13.0, "sdclip_k_mlp": 11.5,
                 "sdclip_k_embed": 14.0, "embed_method": "rtn", "gate_int8": False, "awq_top_k": 0,
                 "awq_group_size": 64, "lqer_top_k": 0, "lqer_rank": 4, "lqer_group": 64,
                 "compression": "plain"},
    "size": {"enforce": True},
}


def quant_params(**sections) -> dict:
    """A fresh copy of QUANT_PARAMS with ``section={key: value}`` overrides."""
    p = copy.deepcopy(QUANT_PARAMS)
    for section, values in sections.items():
        p[section].update(values)
    return p


def write_quant_root(root: Path) -> Path:
    """A run directory: the project's code (linked), a tiny checkpoint, train shards, a poisoned val shard."""
    from pgolf.data.shards import write_shard
    from pgolf.model.checkpoint import save_checkpoint
    for name in ("pgolf", "stages"):
        (root / name).symlink_to(REPO / name)
    model = tiny_model()
    save_checkpoint(root / "artifacts/train/model.pt", model.cfg, model.state_dict(),
                    {"qat": {"enabled": True, "bits": 5, "from_step": 3}})
    g = np.random.default_rng(0)
    shards = root / "data/shards"
    shards.mkdir(parents=True)
    for i in range(2):
        write_shard(shards / f"train_{i:06d}.bin", g.integers(0, 64, 100).astype(np.uint16))
    (shards / "val_000000.bin").write_bytes(b"reading this file would fail the test")
    (root / "params.yaml").write_text(yaml.safe_dump(QUANT_PARAMS))
    write_placeholder_bundle(root)
    return root


def write_placeholder_bundle(root: Path, size: int = 54_321) -> None:
    """The bundle stage's outputs that size_check and quantize read: a file of ``size`` bytes and its reserve (= size)."""
    import json

    from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
    (root / BUNDLE).parent.mkdir(parents=True, exist_ok=True)
    (root / BUNDLE).write_bytes(b"#" * size)
    (root / BUNDLE_RESERVE).write_text(json.dumps({"reserved_bytes": size}))


def rtn_config():
    """Round to nearest, 6-bit attention / 5-bit MLP, LZMA 6: a fast real quantisation."""
    from pgolf.quant.policy import QuantizeConfig
    return QuantizeConfig(
        method="rtn", damp=0.01, block_size=8, act_order=True, clip_candidates=(0.99, 1.0),
        clip_metric="weight_mse", attn_bits=6, mlp_bits=5, embed_bits=8, embed_clip_quantile=0.9999,
        passthrough_numel=64, compressor="lzma", zstd_level=3, lzma_preset=6, prune=False,
        prune_margin_bytes=0)


def write_tiny_artifact(path: Path, with_report: bool = True):
    """A real round-to-nearest .ptz of the tiny model (and the quantize stage's report.json beside it)."""
    from pgolf.io import write_json_atomic
    from pgolf.model.gpt import unbank_state_dict
    from pgolf.quant.artifact import write_artifact
    from pgolf.quant.policy import quantize_state_dict
    model = tiny_model()
    result = quantize_state_dict(unbank_state_dict(model.state_dict(), model.cfg), {}, 0, rtn_config(),
                                 torch.device("cpu"))
    write_artifact(path, result.tensors, model.cfg.to_dict(), {"quantize": {"method": "rtn", "lzma_preset": 6}},
                   "lzma", 6)
    if with_report:
        write_json_atomic(path.parent / "report.json", result.report)
    return model


def write_eval_root(root: Path, data_root: Path, model_params: dict, seed: int = 0) -> torch.nn.Module:
    """A random-init GPT stored losslessly (fp32 passthrough) as ``root/artifacts/quant/model.ptz``,
    with ``root/data`` linked to a finished data run; returns the model."""
    from pgolf.config import from_params
    from pgolf.model.gpt import GPT, ModelConfig, unbank_state_dict
    from pgolf.quant.artifact import StoredTensor, write_artifact

    torch.manual_seed(seed)
    cfg = from_params(ModelConfig, {"model": model_params}, "model")
    model = GPT(cfg)
    with torch.no_grad():   # O and MLP-down start at zero; give every path some signal
        model.qo_bank[cfg.num_layers:].normal_(std=0.05)
        model.mlp_down_bank.normal_(std=0.05)
    tensors = [StoredTensor(name, tuple(t.shape), "float32", "passthrough", raw=t.detach().float())
               for name, t in sorted(unbank_state_dict(model.state_dict(), cfg).items())]
    write_artifact(root / "artifacts/quant/model.ptz", tensors, cfg.to_dict(), {}, "zstd", 1)
    link_data(root, data_root)
    return model.eval()
