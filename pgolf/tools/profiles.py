"""Profiles: params.yaml composed from conf/ exactly as `dvc exp run -S profile=<name>` does.

conf/config.yaml holds the CPU default (with comments) and conf/profile/*.yaml
the overlays (record: 8 GPUs; gpu1: one GPU; gpu_smoke: a short GPU check).
DVC's Hydra integration (`.dvc/config`: hydra.enabled) writes params.yaml from
that composition on every `dvc exp run`; `pgolf params --profile NAME` writes
the same file for a plain `dvc repro`. The committed params.yaml is the
composition of the default profile (tests/test_profiles.py checks it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pgolf.errors import ParamError
from pgolf.io import write_text_atomic

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HEADER = ("# GENERATED from conf/config.yaml + conf/profile/{profile}.yaml (`pgolf params --profile {profile}`,\n"
          "# or DVC's Hydra composition on `dvc exp run`). Edit conf/, not this file; comments live there.\n")


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _load_overlay(conf: Path, name: str) -> dict:
    path = conf / "profile" / f"{name}.yaml"
    if not path.is_file():
        raise ParamError("profile", f"unknown profile {name!r} (known: {', '.join(known_profiles(conf))})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: dict = {}
    for parent in data.pop("defaults", None) or []:
        _merge(out, _load_overlay(conf, parent))
    return _merge(out, data)


def compose(profile: str = "cpu", overrides: list[str] | None = None, conf: Path = CONF_DIR) -> dict[str, Any]:
    """conf/config.yaml, then the profile overlay (and its parents), then ``key=value`` overrides.

    The same deep merge Hydra performs for these flat `@package _global_`
    overlays; written out so GPU images without hydra-core can compose too.
    """
    base = yaml.safe_load((conf / "config.yaml").read_text(encoding="utf-8"))
    base.pop("defaults", None)
    _merge(base, _load_overlay(conf, profile))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ParamError(item, "override must look like key=value")
        node = base
        *path, leaf = key.split(".")
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ParamError(key, "no such section")
            node = node[part]
        if leaf not in node:
            raise ParamError(key, "unknown key")
        node[leaf] = yaml.safe_load(raw)
    return base


# The dataclass each section of params.yaml builds (module, class); `pgolf params`
# builds them all before writing, so a bad --set never reaches the file.
SECTION_CONFIGS = {
    "corpus": ("pgolf.data.corpus", "CorpusConfig"),
    "tokenizer": ("pgolf.data.tokenizer", "TokenizerConfig"),
    "shards": ("pgolf.data.shards", "ShardsConfig"),
    "model": ("pgolf.model.config", "ModelConfig"),
    "optim": ("pgolf.train.optim", "OptimConfig"),
    "train": ("pgolf.train.config", "TrainConfig"),
    "eval_sliding": ("pgolf.eval.sliding", "SlidingConfig"),
    "eval_ttt": ("pgolf.eval.ttt", "TTTConfig"),
    "hessians": ("pgolf.quant.hessians", "HessianConfig"),
    "quantize": ("pgolf.quant.policy", "QuantizeConfig"),
    "size": ("pgolf.submission.size", "SizeConfig"),
}


def known_profiles(conf: Path = CONF_DIR) -> list[str]:
    """The names of conf/profile/*.yaml, sorted."""
    return sorted(p.stem for p in (conf / "profile").glob("*.yaml"))


def validate(params: dict) -> None:
    """Build every section's config (the checks each stage makes at start); ParamError on the first bad key."""
    import importlib

    from pgolf.config import from_params
    for section, (module, name) in SECTION_CONFIGS.items():
        from_params(getattr(importlib.import_module(module), name), params, section)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, one-line lists: the layout of a hand-written params.yaml."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write_params(path: str | Path, params: dict, profile: str) -> None:
    body = yaml.dump(params, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    text = HEADER.format(profile=profile) + body
    write_text_atomic(path, text)
