"""Training checkpoints: weights plus the ModelConfig that built them.

File layout (``torch.save`` of plain data, loadable with ``weights_only=True``)::

    {"format": "pgolf-checkpoint", "version": 1,
     "model_config": {...ModelConfig.to_dict()...},
     "state_dict": {name: tensor (banked names, as GPT.state_dict())},
     "meta": {...JSON-able run facts...}}

Later stages rebuild the model from the file alone, never from params.yaml.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pgolf.errors import DataError, ParamError
from pgolf.io import load_tensor_file, save_tensor_file
from pgolf.model.gpt import GPT, ModelConfig

FORMAT = "pgolf-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig, where: str) -> None:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise DataError(f"{where}: state_dict does not match model_config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, shape in expected.items():
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise DataError(f"{where}: state_dict[{name!r}] is not a tensor")
        if tuple(tensor.shape) != shape:
            raise DataError(f"{where}: state_dict[{name!r}] has shape {tuple(tensor.shape)}, "
                            f"model_config implies {shape}")


def save_checkpoint(path: str | Path, cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                    meta: Mapping[str, Any]) -> None:
    """Write the checkpoint atomically; tensors are detached and moved to CPU.

    ``meta`` must be JSON-serialisable (numbers, strings, bools, lists, dicts).
    """
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {exc}") from None
    _check_state_dict(state_dict, cfg, str(path))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": cfg.to_dict(),
        "state_dict": {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()},
        "meta": dict(meta),
    }
    save_tensor_file(path, payload)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; any problem is a DataError naming the file."""
    path = Path(path)
    payload = load_tensor_file(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {payload.get('version')!r}, expected {VERSION}")
    for key, kind in (("model_config", dict), ("state_dict", dict), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise DataError(f"{path}: '{key}' missing or not a {kind.__name__}")
    try:
        cfg = ModelConfig.from_dict(payload["model_config"])
    except ParamError as exc:
        raise DataError(f"{path}: bad model_config: {exc.key}: {exc.message}") from None
    _check_state_dict(payload["state_dict"], cfg, str(path))
    return Checkpoint(model_config=cfg, state_dict=payload["state_dict"], meta=payload["meta"])


def build_model(ckpt: Checkpoint, device: str | torch.device) -> GPT:
    """A GPT with the checkpoint's config and weights on ``device`` (training mode)."""
    with torch.device("meta"):
        model = GPT(ckpt.model_config)
    model = model.to_empty(device=device)
    model.reset_buffers()
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model
