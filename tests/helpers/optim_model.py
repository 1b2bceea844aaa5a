"""A tiny banked model and its training steps for the optimizer tests.

Banks with leading dims 4 and 3 (padding to 4 is exercised at 2 ranks), tall
and wide; shared by tests/train/test_optim.py, tests/train/test_muon.py and
their torchrun worker tests/pipeline/dist_optim_worker.py.
"""
from __future__ import annotations

import torch
from torch import nn

from pgolf.tools.profiles import compose
from pgolf.train.optim import OptimConfig, PgolfOptimizer

VOCAB, DIM, HIDDEN = 24, 8, 16
BATCH, SEQ = 8, 6
STEPS, STEPS_BEFORE_RESUME = 6, 3


class TinyBankedModel(nn.Module):
    """Banks with leading dims 4 and 3 (padding to 4 is exercised at 2 ranks), tall and wide."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok_emb = nn.Parameter(torch.randn(VOCAB, DIM, generator=g) * 0.5)
        self.up_bank = nn.Parameter(torch.randn(4, HIDDEN, DIM, generator=g) / DIM ** 0.5)
        self.down_bank = nn.Parameter(torch.randn(3, DIM, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.gains = nn.Parameter(torch.ones(3))
        self.head = nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.1)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb[ids]
        for i in range(3):
            h = h + self.gains[i] * torch.relu(h @ self.up_bank[i].T) @ self.down_bank[i].T
        logits = torch.tanh(h @ self.up_bank[3].T) @ self.head.T
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


ROLES = {"tok_emb": "embed", "up_bank": "bank", "down_bank": "bank", "gains": "scalar", "head": "scalar"}


def tiny_config(**overrides: float) -> OptimConfig:
    """The cpu profile's optim section, with faster LRs and warm-up for a few steps, then overrides."""
    values = {**compose("cpu")["optim"],
              "muon_lr": 0.05, "muon_momentum": 0.95, "muon_momentum_warmup_start": 0.85,
              "muon_momentum_warmup_steps": 4, "embed_lr": 0.05, "scalar_lr": 0.03, "swa_every": 50}
    values.update(overrides)
    return OptimConfig(**values)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def lr_scale(step: int) -> float:
    return 1.0 if step < 3 else (STEPS - step) / 3  # a warmdown, so several LR values are used


def train_steps(model: nn.Module, opt: PgolfOptimizer, steps: range, rank: int, world_size: int) -> list[dict]:
    """Each step: the batch split into 2 halves, taken as ranks (world 2) or micro-batches (world 1)."""
    accum = 2 // world_size
    stats = []
    for step in steps:
        ids, targets = batch(step)
        opt.zero_grad()
        for micro in range(accum):
            part = rank * accum + micro
            rows = slice(part * BATCH // 2, (part + 1) * BATCH // 2)
            (model(ids[rows], targets[rows]) / accum).backward()
        stats.append(opt.step(lr_scale(step), step))
    return stats


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}
