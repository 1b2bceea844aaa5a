"""Model state bookkeeping: optimizer roles of parameters, banked ↔ unbanked state dicts.

Roles (docs/RECIPE.md §3.1) and block-matrix names come from the one table in
:mod:`pgolf.model.layout`; :mod:`pgolf.model.gpt` re-exports these functions.
"""
from __future__ import annotations

import torch
from torch import nn

from pgolf.model.config import ModelConfig
from pgolf.model.layout import (BANK_NAMES, EMBEDDING_PARAMS, ROLE_BANK, ROLE_EMBEDDING, ROLE_SCALAR, ROLES,
                                bank_layout)


def param_roles(model: nn.Module) -> dict[str, str]:
    """Optimizer role of every parameter name (docs/RECIPE.md §3.1).

    ``bank``: the four 3-D banks (Muon). ``embed``: token-indexed tables
    (tok_emb, bigram and value-embedding tables, and an untied lm_head).
    ``scalar``: everything else, including the bigram and VE projections.
    """
    roles = {}
    for name, _ in model.named_parameters():
        if name in BANK_NAMES:
            roles[name] = ROLE_BANK
        elif name in EMBEDDING_PARAMS:
            roles[name] = ROLE_EMBEDDING
        else:
            roles[name] = ROLE_SCALAR
    return roles


def param_groups_by_role(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs per role; the groups partition ``model.parameters()``."""
    roles = param_roles(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in ROLES}
    for name, param in model.named_parameters():
        groups[roles[name]].append((name, param))
    seen = {id(p) for pairs in groups.values() for _, p in pairs}
    total = sum(len(pairs) for pairs in groups.values())
    assert total == len(seen) == len(list(model.parameters())), "parameter roles must partition the model"
    return groups


def unbank_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Split the banks into per-layer 2-D tensors with conventional names.

    Each slice is cloned, so saving the result does not drag the whole bank's
    storage along. Tensors other than the banks keep their names.
    """
    missing = [name for name in BANK_NAMES if name not in sd]
    if missing:
        raise KeyError(f"state dict has no {missing[0]}")
    out = {name: t for name, t in sd.items() if name not in BANK_NAMES}
    for name, (bank, index) in bank_layout(cfg.num_layers).items():
        out[name] = sd[bank][index].clone()
    return out


def rebank_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`unbank_state_dict` (exact)."""
    layout = bank_layout(cfg.num_layers)
    missing = [name for name in layout if name not in sd]
    if missing:
        raise KeyError(f"state dict has no {missing[0]}")
    slices: dict[str, dict[int, torch.Tensor]] = {name: {} for name in BANK_NAMES}
    for name, (bank, index) in layout.items():
        slices[bank][index] = sd[name]
    out = {name: t for name, t in sd.items() if name not in layout}
    for bank, by_index in slices.items():
        out[bank] = torch.stack([by_index[i] for i in range(len(by_index))])
    return out
