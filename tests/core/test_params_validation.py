"""params.yaml is checked up front: a bad value fails naming its key, and every key is read.

Each case loads the project's params.yaml, changes one value and builds the
config that reads it (or runs the stage where the check needs files). The
dvc.yaml tests run every stage on a recording view of params.yaml in an
empty folder: a stage reads all its params before touching files, so the
keys it looked up are exactly its params, to compare with its ``params:``.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import yaml
from tests.helpers import link_data, tiny_train_params

import stages.train
from pgolf.config import from_params
from pgolf.data.corpus import CorpusConfig
from pgolf.errors import DataError, ParamError, PgolfError
from pgolf.eval.sliding import EvalSlidingConfig
from pgolf.quant.hessians import HessiansConfig
from pgolf.model.config import ModelConfig
from pgolf.train.optim import OptimConfig
from pgolf.quant.policy import QuantizeConfig
from pgolf.data.shards import ShardsConfig
from pgolf.submission.budget import BudgetConfig
from pgolf.submission.driver import BundleConfig
from pgolf.submission.size import SizeConfig
from pgolf.data.tokenizer import TokenizerConfig
from pgolf.train.config import TrainConfig
from pgolf.train.run import check_shards, check_vocab
from pgolf.eval.ttt import EvalTTTConfig
from pgolf.pipeline.launch import LaunchConfig

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {"launch": LaunchConfig, "corpus": CorpusConfig, "tokenizer": TokenizerConfig, "shards": ShardsConfig,
            "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig,
            "eval_sliding": EvalSlidingConfig, "eval_ttt": EvalTTTConfig, "hessians": HessiansConfig,
            "quantize": QuantizeConfig, "size": SizeConfig, "bundle": BundleConfig,
            "budget": BudgetConfig}


def project_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def build(section: str, p: Mapping) -> Any:
    """What a stage builds from ``section``."""
    return from_params(SECTIONS[section], p, section)


def changed(key: str, value: Any) -> dict:
    p = project_params()
    section, leaf = key.split(".")
    p[section][leaf] = value
    return p


def assert_names(key: str, p: Mapping) -> None:
    with pytest.raises(ParamError) as err:
        build(key.split(".")[0], p)
    assert err.value.key == key and str(err.value).startswith(f"params.yaml: {key}: ")


def test_the_project_params_build():
    """Control for the cases below: the file as it is passes every check."""
    p = project_params()
    assert set(p) == set(SECTIONS)
    for section in p:
        build(section, p)


@pytest.mark.parametrize("key,value", [
    ("optim.muon_lr", -1), ("optim.embed_lr", -0.5), ("optim.scalar_lr", float("nan")),
    ("eval_ttt.lr", -1), ("eval_ttt.lr", float("inf")),
    ("quantize.attn_bits", 9), ("quantize.mlp_bits", 1), ("quantize.embed_bits", 9),
    ("eval_sliding.stride", 0), ("tokenizer.vocab_size", 100), ("hessians.seq_len", 0),
    ("launch.nproc_per_node", 0), ("launch.nproc_per_node", -2),
])
def test_out_of_range_values_name_their_key(key, value):
    assert_names(key, changed(key, value))


def test_stride_longer_than_the_window_names_the_stride():
    seq_len = project_params()["eval_sliding"]["seq_len"]
    assert_names("eval_sliding.stride", changed("eval_sliding.stride", seq_len + 1))
    build("eval_sliding", changed("eval_sliding.stride", seq_len))  # equal is allowed: no overlap


def test_nproc_per_node_is_a_count_or_gpu():
    assert build("launch", changed("launch.nproc_per_node", "gpu")).nproc_per_node == "gpu"
    assert build("launch", changed("launch.nproc_per_node", 8)).nproc_per_node == 8


@pytest.mark.parametrize("key,value", [
    ("launch.device", "gpu"), ("launch.device", 0), ("launch.nproc_per_node", "cpu"),
    ("launch.nproc_per_node", True), ("launch.nproc_per_node", 1.0), ("corpus.val_docs", 1.5), ("corpus.source", "web"),
    ("tokenizer.vocab_size", True), ("shards.link", "no"), ("model.tie_embeddings", "yes"),
    ("model.xsa_layers", 2), ("model.mlp_mult", "3"), ("optim.muon_lr", "0.025"),
    ("train.max_steps", "300"), ("train.final_weights", "best"), ("eval_sliding.compile", 1),
    ("eval_ttt.optimizer", "adam"), ("hessians.source", 1), ("quantize.clip_candidates", 0.999),
    ("quantize.compressor", "gzip"), ("size.enforce", "true"), ("model.doc_attention_impl", "bogus"),
])
def test_wrong_types_name_their_key(key, value):
    assert_names(key, changed(key, value))


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_an_unknown_key_in_any_section_is_named(section):
    p = project_params()
    p[section]["learning_rate_typo"] = 1
    assert_names(f"{section}.learning_rate_typo", p)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_missing_key_is_named(section):
    p = project_params()
    leaf = sorted(p[section])[0]
    del p[section][leaf]
    assert_names(f"{section}.{leaf}", p)


# ----------------------------------------------- checks that need the data files
def test_model_vocab_must_equal_the_tokenizers(tmp_path, tiny_data):
    root = link_data(tmp_path, tiny_data)
    meta = root / "data/tokenizer/meta.json"
    check_vocab(meta, from_params(ModelConfig, tiny_train_params(), "model"))  # control: 512
    with pytest.raises(ParamError) as err:
        stages.train.run(tiny_train_params(model={"vocab_size": 1024}), root)
    assert err.value.key == "model.vocab_size" and "tokenizer's 512" in str(err.value)
    assert not (root / "artifacts/train/model.pt").exists()


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 1024, "shards have vocab_size 1024, the tokenizer"),
    ("tokenizer_sha256", "0" * 64, "shards were cut by another tokenizer"),
])
def test_shards_must_come_from_the_tokenizer(tmp_path, tiny_data, field, value, message):
    """The train stage reads both the shards and the tokenizer's meta: a stale shard set is refused."""
    root = tmp_path
    shutil.copytree(tiny_data / "data/shards", root / "data/shards")
    shutil.copytree(tiny_data / "data/tokenizer", root / "data/tokenizer")
    manifest_path = root / "data/shards/manifest.json"
    check_shards(manifest_path, root / "data/tokenizer/meta.json")  # control: as built
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(f"{manifest_path}: {message}")):
        stages.train.run(tiny_train_params(), root)
    assert not (root / "artifacts/train/model.pt").exists()


# ------------------------------------------------------------- dvc.yaml params
def leaf_keys(node: Mapping, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        keys |= leaf_keys(value, f"{prefix}{name}.") if isinstance(value, Mapping) else {prefix + name}
    return keys


# The params stage (stages/params.py) depends on the whole file; every other stage on its leaf keys.
WHOLE_FILE_STAGE = "params"


def listed_params(stage: dict) -> set[str]:
    entries = stage.get("params", [])
    if entries == [{"params.yaml": None}]:  # `- params.yaml:`, the whole file
        return leaf_keys(project_params())
    assert all(isinstance(e, str) for e in entries), "params must be listed as leaf keys"
    return set(entries)


def test_every_params_key_is_listed_by_some_stage():
    stages = dvc_stages()
    assert stages[WHOLE_FILE_STAGE]["params"] == [{"params.yaml": None}]
    listed = set().union(*(listed_params(s) for name, s in stages.items() if name != WHOLE_FILE_STAGE))
    assert listed == leaf_keys(project_params())


class ReadRecorder(Mapping):
    """params.yaml as read-only nested mappings that note every leaf value looked up."""

    def __init__(self, data: Mapping, seen: set[str], prefix: str = ""):
        self._data, self._seen, self._prefix = data, seen, prefix

    def __getitem__(self, name: str) -> Any:
        value = self._data[name]
        if isinstance(value, Mapping):
            return ReadRecorder(value, self._seen, f"{self._prefix}{name}.")
        self._seen.add(self._prefix + name)
        return copy.deepcopy(value)

    def __contains__(self, name: object) -> bool:  # a membership test reads no value
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_the_recorder_sees_exactly_the_fields_a_config_reads():
    """Control for the test below: building one section's config reads all of its keys, no others."""
    seen: set[str] = set()
    from_params(QuantizeConfig, ReadRecorder(project_params(), seen), "quantize")
    assert seen == {f"quantize.{k}" for k in project_params()["quantize"]}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "bundle" else n  # builds the bundle
                                  for n in sorted(dvc_stages())])
def test_each_stage_lists_exactly_the_params_it_reads(name, tmp_path):
    stage = dvc_stages()[name]
    seen: set[str] = set()
    try:
        importlib.import_module(f"stages.{name}").run(ReadRecorder(project_params(), seen), tmp_path)
    except PgolfError:
        pass  # an empty folder: the stage stops at its first input file, after reading its params
    from_cmd = set(re.findall(r"\$\{([^}]+)\}", stage["cmd"]))  # e.g. torchrun's launch.nproc_per_node
    assert seen | from_cmd == listed_params(stage)
