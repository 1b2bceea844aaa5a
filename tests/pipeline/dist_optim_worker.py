"""2-rank parallel Muon vs 1 rank with 2 accumulation steps (run by tests/test_optim.py).

    torchrun --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT.pt

(with the repository root on PYTHONPATH). Each rank takes its half of one
fixed batch per step; the distributed run stops after ``STEPS_BEFORE_RESUME``
steps, saves the (gathered) optimizer state, rebuilds the optimizer from it
and continues, so the sharded load path is exercised too. Afterwards rank 0
alone repeats the run as one process whose two micro-batches are the two
ranks' halves (each loss scaled by 1/2), and continues a third run from the
distributed state at the resume point (a resume at another world size). It
also checks that the clip acts on the averaged gradient: hand-made rank
gradients whose own norms exceed the clip but whose average does not.

Everything the test compares is saved to OUT.pt by rank 0. The tiny model
lives here so that the test and the worker share one definition.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from pgolf.distributed import DistContext, init_distributed
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
    values = dict(muon_lr=0.05, muon_momentum=0.95, muon_momentum_warmup_start=0.85,
                  muon_momentum_warmup_steps=4, muon_wd=0.04, ns_steps=5, embed_lr=0.05, scalar_lr=0.03,
                  adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, adam_wd=0.04, grad_clip_norm=0.3,
                  ema_decay=0.997, swa_lr_scale_threshold=0.2, swa_every=50, swa_on_cpu=False)
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


def averaged_clip_check(ctx: DistContext) -> dict[str, torch.Tensor]:
    """Rank grads ±big + small: each rank's norm is far above the clip, the average is below."""
    model = TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, tiny_config(grad_clip_norm=1.0), ctx)
    g = torch.Generator().manual_seed(7)
    small = {n: torch.randn(p.shape, generator=g) * 0.01 for n, p in model.named_parameters()}
    big = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    sign = 1.0 if ctx.rank == 0 else -1.0
    for n, p in model.named_parameters():
        p.grad = small[n] + sign * big[n]
    stats = opt.step(1.0, 0)
    state = opt.state_dict()
    return {"grad_norm": torch.tensor(stats["grad_norm"], dtype=torch.float64),
            "clip_coef": torch.tensor(stats["clip_coef"]),
            "up_momentum": state["muon_momentum"]["up_bank"],
            "tok_exp_avg": state["adamw"]["state"][0]["exp_avg"],
            "small_up": small["up_bank"], "small_tok": small["tok_emb"]}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                           int(os.environ["LOCAL_RANK"]), "cpu")
    assert ctx.world_size == 2, "run with --nproc_per_node=2"
    cfg = tiny_config()

    model = TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, cfg, ctx)
    dist_stats = train_steps(model, opt, range(STEPS_BEFORE_RESUME), ctx.rank, 2)
    resume_state = opt.state_dict()
    resume_params = params_of(model)
    opt = PgolfOptimizer(model.named_parameters(), ROLES, cfg, ctx)
    opt.load_state_dict(resume_state)
    dist_stats += train_steps(model, opt, range(STEPS_BEFORE_RESUME, STEPS), ctx.rank, 2)
    dist_params = params_of(model)
    dist_final_state = opt.state_dict()
    clip = averaged_clip_check(ctx)

    if ctx.rank == 0:
        single = TinyBankedModel()
        single_opt = PgolfOptimizer(single.named_parameters(), ROLES, cfg, None)
        single_stats = train_steps(single, single_opt, range(STEPS), 0, 1)

        resumed = TinyBankedModel()
        with torch.no_grad():
            for name, p in resumed.named_parameters():
                p.copy_(resume_params[name])
        resumed_opt = PgolfOptimizer(resumed.named_parameters(), ROLES, cfg, None)
        resumed_opt.load_state_dict(resume_state)
        train_steps(resumed, resumed_opt, range(STEPS_BEFORE_RESUME, STEPS), 0, 1)

        torch.save({"dist_params": dist_params, "single_params": params_of(single),
                    "resumed_single_params": params_of(resumed),
                    "dist_momentum": dist_final_state["muon_momentum"],
                    "single_momentum": single_opt.state_dict()["muon_momentum"],
                    "dist_grad_norms": torch.tensor([s["grad_norm"] for s in dist_stats], dtype=torch.float64),
                    "single_grad_norms": torch.tensor([s["grad_norm"] for s in single_stats],
                                                      dtype=torch.float64),
                    "clip": clip}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
