"""The Hessian file (``artifacts/hessians/hessians.pt``) and its key naming.

One raw second moment ``H = Σ xᵀx`` per block-matrix input, keyed
``blocks.{i}.{hessian}`` as :data:`pgolf.model.layout.BLOCK_MATRICES` names
them: Q, K and V read one input, stored once under ``blocks.{i}.attn.qkv``;
the others under their module name (``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``). With ``hessians.head`` also
the input of the output projection (the final norm's output, which the tied
embedding multiplies) under :data:`HEAD_HESSIAN_KEY`. The file is a
tensors-only ``torch.save`` of ``{"hessians": {key: float32 [d, d]},
"num_tokens": int64, "num_sequences": int64}``: raw sums, no averaging, no
damping (the solver damps exactly once). Under depth recurrence a reused
layer's sum covers every visit. With ``hessians.activation_rms`` the file also
holds ``"act_rms": {key: float32 [d]}``, the RMS of each input channel over
every row that went into that key's sum (AWQ-lite, docs/FRONTIER.md §4.5). The collector that writes it is pgolf/quant/hessians.py; this
module stays apart from it (and from the data loader it draws batches from),
so the quantize stage that reads the file does not depend on the loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.errors import DataError
from pgolf.io import load_tensor_file, save_tensor_file
from pgolf.model.layout import block_module, block_weight, hessian_key


HEAD_HESSIAN_KEY = "head"  # the output projection's input (the tied embedding's Hessian)


@dataclass(frozen=True)
class HessianSet:
    """Raw second moments keyed as in the module docstring, plus what they cover."""

    hessians: dict[str, torch.Tensor]
    num_tokens: int
    num_sequences: int
    act_rms: dict[str, torch.Tensor] = field(default_factory=dict)  # empty unless collected


def hessian_key_for_module(module_name: str) -> str | None:
    """``blocks.3.attn.c_k`` → ``blocks.3.attn.qkv``; None for modules without one."""
    found = block_module(module_name)
    return None if found is None else hessian_key(*found)


def hessian_key_for_weight(weight_name: str) -> str | None:
    """``blocks.3.attn.c_k.weight`` → ``blocks.3.attn.qkv`` (unbanked weight names)."""
    found = block_weight(weight_name)
    return None if found is None else hessian_key(*found)


def save_hessians(path: str | Path, hs: HessianSet) -> None:
    data = {"hessians": hs.hessians, "num_tokens": torch.tensor(hs.num_tokens),
            "num_sequences": torch.tensor(hs.num_sequences)}
    if hs.act_rms:  # absent otherwise, so files without it stay byte-identical
        data["act_rms"] = hs.act_rms
    save_tensor_file(path, data)


def load_hessians(path: str | Path) -> HessianSet:
    """Tensors-only load (``weights_only=True``); DataError naming the file on any mismatch."""
    path = Path(path)
    data = load_tensor_file(path, "Hessian file", "run the hessians stage")
    if not (isinstance(data, dict) and isinstance(data.get("hessians"), dict)
            and isinstance(data.get("num_tokens"), torch.Tensor)):
        raise DataError(f"{path}: not a Hessian file (expected hessians/num_tokens/num_sequences)")
    for key, h in data["hessians"].items():
        if not (isinstance(h, torch.Tensor) and h.dim() == 2 and h.shape[0] == h.shape[1]):
            raise DataError(f"{path}: Hessian {key!r} is not a square matrix")
    act_rms = data.get("act_rms", {})
    if not isinstance(act_rms, dict):
        raise DataError(f"{path}: act_rms is not a mapping of tensors")
    for key, rms in act_rms.items():
        h = data["hessians"].get(key)
        if not (isinstance(rms, torch.Tensor) and h is not None and tuple(rms.shape) == (h.shape[0],)):
            raise DataError(f"{path}: act_rms {key!r} does not match a Hessian of the file")
    return HessianSet(hessians=data["hessians"], num_tokens=int(data["num_tokens"]),
                      num_sequences=int(data.get("num_sequences", torch.tensor(0))), act_rms=act_rms)
