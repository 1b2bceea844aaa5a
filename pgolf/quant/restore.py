"""The model an artifact encodes: a ``GPT`` rebuilt with dequantised weights.

The ``.ptz`` format (pgolf/quant/artifact.py) knows nothing of the model; this
module joins the two: the artifact's model config builds the ``GPT``, and its
dequantised, unbanked state dict is banked again (pgolf/model/layout.py).
Every eval stage scores this model, never the training weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pgolf.errors import DataError, ParamError
from pgolf.model.checkpoint import Checkpoint, build_model
from pgolf.model.gpt import GPT, ModelConfig, rebank_state_dict
from pgolf.quant.artifact import dequantize, read_artifact


def load_dequantized_model(path: str | Path, device: str | torch.device) -> GPT:
    """Rebuild the ``GPT`` stored in ``path`` (config from the artifact) with
    dequantised weights, in eval mode on ``device``."""
    artifact = read_artifact(path)
    try:
        cfg = ModelConfig.from_dict(artifact.model_config)
    except ParamError as exc:
        raise DataError(f"{path}: bad model_config: {exc.key}: {exc.message}") from None
    try:
        state = rebank_state_dict(dequantize(artifact), cfg)
        model = build_model(Checkpoint(model_config=cfg, state_dict=state, meta=artifact.meta), device)
    except (KeyError, RuntimeError) as exc:
        raise DataError(f"{path}: artifact does not match its model config "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval()
