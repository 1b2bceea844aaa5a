"""Routing: which class each tensor of the unbanked state dict belongs to, and its grid.

First matching rule wins (docs/RECIPE.md §4.1, docs/FRONTIER.md §4.1):

1. with ``quantize.gate_int8``: attention gates (``blocks.{i}.attn.attn_gate_w``,
   pgolf/model/attention.py) of 32..8192 values → class ``gate``: int8 per row,
   ``s = max|row|/127`` (fp16), round to nearest;
2. not floating point, or ``numel <= passthrough_numel`` → ``passthrough`` (floats as fp16);
3. block matrices (pgolf/model/layout.py) → ``attn`` / ``mlp`` at ``attn_bits`` / ``mlp_bits``;
4. anything else → ``embed`` at ``embed_bits``: round to nearest with the
   ``embed_clip_quantile`` clip, except the *tied* token embedding when
   ``quantize.embed_method`` is ``gptq``: it is the output projection too, so
   it goes through GPTQ like a block matrix, with the Hessian of the output
   projection's input (the final norm's output, key
   :data:`pgolf.quant.hessian_file.HEAD_HESSIAN_KEY`).

Block matrices and a GPTQ embedding are "solved" tensors (``solved_bits``);
pgolf/quant/policy.py runs them through pgolf/quant/gptq.py.
"""
from __future__ import annotations

from typing import Mapping

import torch

from pgolf.model.layout import block_weight
from pgolf.quant.hessian_file import HEAD_HESSIAN_KEY, hessian_key_for_weight
from pgolf.quant.quant_config import QuantizeConfig

GATE_SUFFIX = ".attn_gate_w"  # pgolf/model/attention.py's SparseAttnGate parameter
GATE_NUMEL = (32, 8192)  # the records' size window for int8 gates (docs/FRONTIER.md §4.1)
GATE_BITS = 8
TIED_EMBEDDING = "tok_emb.weight"
OUTPUT_WEIGHT = "lm_head.weight"  # present only when the output matrix is untied


def tensor_class(name: str, tensor: torch.Tensor, cfg: QuantizeConfig) -> str:
    """``gate``, ``passthrough``, ``attn``, ``mlp`` or ``embed`` (module docstring's rules)."""
    if (cfg.gate_int8 and name.endswith(GATE_SUFFIX) and tensor.is_floating_point()
            and GATE_NUMEL[0] <= tensor.numel() <= GATE_NUMEL[1]):
        return "gate"
    if not tensor.is_floating_point() or tensor.numel() <= cfg.passthrough_numel:
        return "passthrough"
    found = block_weight(name)
    if found is not None and tensor.dim() == 2:
        return found[1].cls
    return "embed"


def solved_embedding(name: str, state: Mapping[str, torch.Tensor], cfg: QuantizeConfig) -> bool:
    """True for the tied token embedding when ``embed_method`` is ``gptq`` (rule 4)."""
    return (cfg.embed_method == "gptq" and name == TIED_EMBEDDING
            and OUTPUT_WEIGHT not in state and state[name].dim() == 2)


def solved_bits(state: Mapping[str, torch.Tensor], cfg: QuantizeConfig) -> dict[str, int]:
    """Every tensor GPTQ (or the block matrices' RTN) quantises, with its bit width."""
    class_bits = {**cfg.grid_bits.by_class(), "embed": cfg.embed_bits}
    out = {}
    for name in sorted(state):
        cls = tensor_class(name, state[name], cfg)
        if cls in ("attn", "mlp") or (cls == "embed" and solved_embedding(name, state, cfg)):
            out[name] = class_bits[cls]
    return out


def hessian_key_of(name: str) -> str | None:
    """The Hessian a solved tensor reads: its block input, or the output projection's input."""
    return HEAD_HESSIAN_KEY if name == TIED_EMBEDDING else hessian_key_for_weight(name)


def sdclip_k(cfg: QuantizeConfig, cls: str) -> float:
    """SDClip's k of a class (``quantize.sdclip_k_{attn,mlp,embed}``)."""
    return {"attn": cfg.sdclip_k_attn, "mlp": cfg.sdclip_k_mlp, "embed": cfg.sdclip_k_embed}[cls]
