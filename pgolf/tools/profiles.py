"""Profiles: params.yaml composed from conf/ exactly as `dvc exp run -S profile=<name>` does.

conf/config.yaml holds the CPU default (with comments) and conf/profile/*.yaml
the overlays (record: 8 GPUs; gpu1: one GPU; gpu_smoke: a short GPU check);
conf/model/*.yaml the records' model sections, named after their PRs (r549,
r960, r1019), which a profile takes with ``defaults: [/model: r960]`` and
tests and benchmarks load with ``model_preset``.
DVC's Hydra integration (`.dvc/config`: hydra.enabled) writes params.yaml from
that composition on every `dvc exp run`; `pgolf params --profile NAME` writes
the same file for a plain `dvc repro`. The committed params.yaml is the
composition of the default profile (tests/tools/test_profiles.py checks it).
"""
from __future__ import annotations

import copy
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


def _load_with_defaults(conf: Path, group: str, name: str, load_entry) -> dict:
    """``conf/<group>/<name>.yaml`` merged over its ``defaults`` list, in Hydra's order:
    each entry where it stands, the file's own keys at ``_self_`` (at the end if absent)."""
    path = conf / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        raise ParamError(group, f"unknown {group} {name!r} (known: {', '.join(known)})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults = data.pop("defaults", None) or []
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out: dict = {}
    for entry in defaults:
        _merge(out, copy.deepcopy(data) if entry == "_self_" else load_entry(entry))
    return out


def model_preset(name: str, conf: Path = CONF_DIR) -> dict[str, Any]:
    """The complete ``model`` section of a record, ``conf/model/<name>.yaml`` (r549, r960, r1019)."""
    def parent(entry: Any) -> dict:
        if not isinstance(entry, str):
            raise ParamError(f"conf/model/{name}.yaml", f"defaults entry {entry!r} must name another model")
        return model_preset(entry, conf)
    return _load_with_defaults(conf, "model", name, parent)


def _load_overlay(conf: Path, name: str) -> dict:
    """A profile: parent profiles by name, and ``/model: <preset>`` for a record's model section."""
    def parent(entry: Any) -> dict:
        if isinstance(entry, str):
            return _load_overlay(conf, entry)
        if isinstance(entry, dict) and list(entry) == ["/model"]:
            return {"model": model_preset(entry["/model"], conf)}
        raise ParamError(f"conf/profile/{name}.yaml", f"defaults entry {entry!r}: a profile or /model: <preset>")
    return _load_with_defaults(conf, "profile", name, parent)


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


def known_profiles(conf: Path = CONF_DIR) -> list[str]:
    """The names of conf/profile/*.yaml, sorted."""
    return sorted(p.stem for p in (conf / "profile").glob("*.yaml"))


def validate(params: dict) -> None:
    """The params stage's checks (pgolf/pipeline/params_check.py); ParamError on the first bad key."""
    from pgolf.pipeline.params_check import check_params
    check_params(params)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, one-line lists: the layout of a hand-written params.yaml."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write_params(path: str | Path, params: dict, profile: str) -> None:
    body = yaml.dump(params, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    text = HEADER.format(profile=profile) + body
    write_text_atomic(path, text)
