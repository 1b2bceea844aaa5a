"""Choosing the final weights: live, EMA or tight SWA, by loss on held-out training data.

The records load EMA unconditionally (and collect SWA without using it);
PR #960 applies SWA whenever it has snapshots. Neither is right at every run
length: EMA ruins short runs, SWA needs a warmdown. Here all candidates are
scored on a held-out slice of the *training* stream (never validation data,
so the choice is legal) and the lowest loss wins, unless ``final_weights``
forces one. All losses are recorded either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgolf.distributed import DistContext, all_reduce_sum_, shard_range
from pgolf.errors import PgolfError
from pgolf.precision import autocast

CANDIDATES = ("live", "ema", "swa")


@torch.no_grad()
def holdout_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext,
                 batch_seqs: int) -> float:
    """Mean next-token loss (nats) over the held-out sequences ``x, y [n, T]``.

    Ranks split the sequences into contiguous shares and sum (nll, tokens) in
    float64, so the figure does not depend on the number of ranks beyond
    summation order.
    """
    was_training = model.training
    model.eval()
    start, end = shard_range(x.shape[0], ctx.rank, ctx.world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for i in range(start, end, batch_seqs):
        xb = x[i:min(i + batch_seqs, end)].to(ctx.device)
        yb = y[i:min(i + batch_seqs, end)].to(ctx.device)
        with autocast(ctx.device):
            loss = model(xb, yb)
        totals[0] += loss.double() * yb.numel()
        totals[1] += yb.numel()
    all_reduce_sum_(totals)
    model.train(was_training)
    return float(totals[0] / totals[1])


@dataclass(frozen=True)
class Choice:
    name: str                       # "live" | "ema" | "swa"
    losses: dict[str, float | None]  # held-out loss per candidate; None = candidate absent
    reason: str


def choose_weights(losses: dict[str, float | None], forced: str) -> Choice:
    """Pick the candidate with the lowest held-out loss, or the ``forced`` one.

    ``forced`` is ``best_holdout`` or a candidate name. Ties go to the simpler
    candidate (live before EMA before SWA).
    """
    present = {k: v for k, v in losses.items() if v is not None and math.isfinite(v)}
    summary = ", ".join(f"{k} {v:.5f}" if v is not None else f"{k} n/a" for k, v in losses.items())
    if forced != "best_holdout":
        if forced not in present:
            raise PgolfError(f"params.yaml: train.final_weights: '{forced}' weights are absent or non-finite "
                             f"(held-out losses: {summary})")
        return Choice(forced, dict(losses), f"forced by train.final_weights (held-out losses: {summary})")
    if not present:
        raise PgolfError(f"train: no candidate weights have a finite held-out loss ({summary})")
    best = min((k for k in CANDIDATES if k in present), key=lambda k: present[k])
    return Choice(best, dict(losses), f"lowest held-out training-slice loss ({summary})")
