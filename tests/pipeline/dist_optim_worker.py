"""2-rank parallel Muon vs 1 rank with 2 accumulation steps (run by tests/train/test_optim.py).

    torchrun --standalone --nproc_per_node=2 tests/pipeline/dist_optim_worker.py OUT.pt

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
lives in tests/helpers/optim_model.py, shared with the test.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pgolf.distributed import DistContext, init_distributed
from pgolf.train.optim import PgolfOptimizer
from tests.helpers.optim_model import (ROLES, STEPS, STEPS_BEFORE_RESUME, TinyBankedModel, params_of,
                                       tiny_config, train_steps)


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
