"""The composite optimizer the training loop calls: parallel Muon + AdamW, averaged and clipped.

Parameter roles (docs/RECIPE.md §3.1), given by the caller as ``name → role``:

* ``bank``: 3-D stacks of block matrices → Muon (:mod:`pgolf.train.muon`), sharded
  across ranks along the leading dimension;
* ``embed``: token-embedding tables → AdamW at ``embed_lr``;
* ``scalar``: everything else (gains, mixes, gates, small projections) →
  AdamW at ``scalar_lr``.

One :meth:`PgolfOptimizer.step`:

1. Start the reduce-scatter (average) of every bank gradient, largest first,
   and the all-reduce (average) of all other gradients, concatenated.
2. Compute the global L2 norm of the AVERAGED gradient and clip to
   ``grad_clip_norm``. R549 clips each rank's local gradient before any
   communication (docs/RECIPE.md §6.8), so its result depends on how the batch is
   split across ranks. Clipping the average makes N ranks × A accumulation
   steps equal 1 rank × N·A steps (tested). Squares are summed in float64,
   which makes the norm independent of how the sum is grouped across ranks.
3. Muon: momentum + Newton–Schulz on this rank's bank slices, then launch the
   all-gathers of the orthogonalised updates; AdamW steps while they are in
   flight; apply the gathered bank updates.

``step`` may overwrite ``.grad`` tensors (averaged, clipped in place); call
``zero_grad`` before the next backward. A parameter without a gradient is
treated as having a zero gradient, so weight decay still applies and every
rank takes part in the same collectives.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import torch
import torch.distributed as dist
from torch import nn

from pgolf.config import check
from pgolf.distributed import DistContext
from pgolf.errors import DataError
from pgolf.model.layout import ROLES
from pgolf.train.muon import ORTHOGONALIZERS, POLAR_EXPRESS_COEFFS, ShardedBank
from pgolf.train.schedule import momentum_warmup

STATE_VERSION = 1
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class OptimConfig:
    """Section ``optim`` of params.yaml: optimizer groups, clipping and weight averaging."""
    muon_lr: float
    muon_momentum: float
    muon_momentum_warmup_start: float
    muon_momentum_warmup_steps: int
    muon_wd: float
    ns_steps: int
    embed_lr: float
    scalar_lr: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    adam_wd: float
    grad_clip_norm: float        # 0 = no clipping (the norm is still measured)
    ema_decay: float             # read by the training loop (pgolf.train.averaging.EMA)
    swa_lr_scale_threshold: float  # snapshot while lr_scale < this; 0 = no SWA
    swa_every: int
    swa_on_cpu: bool             # keep the SWA sum in host memory
    # Frontier Muon (docs/FRONTIER.md §3.2); the defaults are today's Muon.
    muon_orthogonalizer: Literal["ns5", "polar_express"] = "ns5"
    muon_row_norm: bool = False  # MuonEq-R: row-normalise the Nesterov direction first
    embed_wd: float = -1.0       # AdamW WD of the embed group; < 0 = adam_wd (F1855: 0.085 vs scalar 0.02)

    def __post_init__(self) -> None:
        for key in ("muon_lr", "embed_lr", "scalar_lr", "muon_wd", "adam_wd", "grad_clip_norm"):
            value = getattr(self, key)
            check(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")
        for key in ("muon_momentum", "muon_momentum_warmup_start", "adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, key)
            check(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
        check(self.muon_momentum_warmup_steps >= 0, "muon_momentum_warmup_steps",
              f"must be >= 0, got {self.muon_momentum_warmup_steps}")
        check(1 <= self.ns_steps <= 20, "ns_steps", f"must be in 1..20, got {self.ns_steps}")
        check(self.muon_orthogonalizer in ORTHOGONALIZERS, "muon_orthogonalizer",
              f"must be one of {list(ORTHOGONALIZERS)}, got {self.muon_orthogonalizer!r}")
        check(self.muon_orthogonalizer != "polar_express" or self.ns_steps == len(POLAR_EXPRESS_COEFFS),
              "ns_steps", f"polar_express has exactly {len(POLAR_EXPRESS_COEFFS)} steps; set ns_steps to that")
        check(math.isfinite(self.embed_wd), "embed_wd", f"must be finite, got {self.embed_wd}")
        check(0.0 < self.adam_eps < 1.0, "adam_eps", f"must be in (0, 1), got {self.adam_eps}")
        check(0.0 <= self.swa_lr_scale_threshold <= 1.0, "swa_lr_scale_threshold",
              f"must be in [0, 1], got {self.swa_lr_scale_threshold}")
        check(self.swa_every >= 1, "swa_every", f"must be >= 1, got {self.swa_every}")


def _split_by_role(named_params: Iterable[tuple[str, nn.Parameter]],
                   roles: Mapping[str, str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in ROLES}
    seen = set()
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if name not in roles:
            raise ValueError(f"parameter '{name}' has no optimizer role (expected one of {ROLES})")
        if roles[name] not in ROLES:
            raise ValueError(f"parameter '{name}' has unknown role '{roles[name]}' (expected one of {ROLES})")
        groups[roles[name]].append((name, param))
        seen.add(name)
    unknown = sorted(set(roles) - seen)
    if unknown:
        raise ValueError(f"roles name parameters the model does not train: {unknown[:5]}")
    return groups


class PgolfOptimizer:
    """Muon on the banks, AdamW on the rest; one class for 1 or N ranks."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], roles: Mapping[str, str],
                 cfg: OptimConfig, ctx: DistContext | None = None):
        self.cfg = cfg
        self.rank = ctx.rank if ctx is not None else 0
        self.world_size = ctx.world_size if ctx is not None else 1
        if self.world_size > 1 and not dist.is_initialized():
            raise RuntimeError("world_size > 1 but torch.distributed is not initialised")
        groups = _split_by_role(named_params, roles)
        # Largest first, so the biggest reduction is in flight longest (docs/RECIPE.md §3.2).
        banks = sorted(groups["bank"], key=lambda item: -item[1].numel())
        self.banks = [ShardedBank(name, p, self.rank, self.world_size) for name, p in banks]
        self.dense = [p for role in ("embed", "scalar") for _, p in groups[role]]
        self._base_lrs = {"embed": cfg.embed_lr, "scalar": cfg.scalar_lr}
        wds = {"embed": cfg.embed_wd if cfg.embed_wd >= 0 else cfg.adam_wd, "scalar": cfg.adam_wd}
        adam_groups = [{"params": [p for _, p in groups[role]], "lr": self._base_lrs[role], "role": role,
                        "weight_decay": wds[role]}
                       for role in ("embed", "scalar") if groups[role]]
        self.adamw: torch.optim.AdamW | None = None
        if adam_groups:
            on_cuda = all(p.is_cuda for p in self.dense)
            self.adamw = torch.optim.AdamW(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.adam_wd,
                                           fused=True if on_cuda else None)
        self._all_params = [b.param for b in self.banks] + self.dense
        if not self._all_params:
            raise ValueError("no trainable parameters were given to the optimizer")

    def zero_grad(self) -> None:
        for p in self._all_params:
            p.grad = None

    def _dense_grads(self) -> list[torch.Tensor]:
        for p in self.dense:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.dense]

    def _launch_dense_reduce(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, dist.Work] | None:
        if self.world_size == 1 or not grads:
            return None
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        return flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)

    def _finish_dense_reduce(self, grads: list[torch.Tensor],
                             pending: tuple[torch.Tensor, dist.Work] | None) -> None:
        if pending is None:
            return
        flat, work = pending
        work.wait()
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _clip_coef(self, bank_shards: list[torch.Tensor], dense_grads: list[torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(global norm of the averaged gradient, clip factor), both 0-d on ``device``."""
        def sq_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for t in tensors:
                total += torch.linalg.vector_norm(t, dtype=torch.float64).square()
            return total
        bank_sq = sq_sum(bank_shards)
        if self.world_size > 1 and bank_shards:
            dist.all_reduce(bank_sq, op=dist.ReduceOp.SUM)  # shards are disjoint; dense grads are replicated
        norm = (bank_sq + sq_sum(dense_grads)).sqrt()
        if self.cfg.grad_clip_norm > 0:
            coef = torch.clamp(self.cfg.grad_clip_norm / (norm + CLIP_EPS), max=1.0)
        else:
            coef = torch.ones((), dtype=torch.float64, device=device)
        return norm, coef.float()

    @torch.no_grad()
    def step(self, lr_scale: float, step: int) -> dict[str, float]:
        """Average, clip and apply one update with every LR = base × ``lr_scale``.

        Returns the pre-clip global grad norm, the clip factor, the LRs and the
        Muon momentum used. Reading the norm synchronises with the device once.
        """
        if not (math.isfinite(lr_scale) and lr_scale >= 0):
            raise ValueError(f"lr_scale must be a finite number >= 0, got {lr_scale}")
        cfg = self.cfg
        for bank in self.banks:
            bank.launch_grad_reduce()
        dense_grads = self._dense_grads()
        self._finish_dense_reduce(dense_grads, self._launch_dense_reduce(dense_grads))
        bank_shards = [bank.finish_grad_reduce() for bank in self.banks]

        device = self._all_params[0].device
        norm, coef = self._clip_coef(bank_shards, dense_grads, device)
        momentum = momentum_warmup(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                   cfg.muon_momentum_warmup_steps)
        lrs = {"muon": cfg.muon_lr * lr_scale}
        lrs.update({role: base * lr_scale for role, base in self._base_lrs.items()})

        for bank in self.banks:
            bank.launch_update(coef, momentum, cfg.ns_steps, cfg.muon_orthogonalizer, cfg.muon_row_norm)
        if self.adamw is not None:
            for g in dense_grads:
                g.mul_(coef)
            for group in self.adamw.param_groups:
                group["lr"] = lrs[group["role"]]
            self.adamw.step()
        for bank in self.banks:
            bank.apply_update(lrs["muon"], cfg.muon_wd)
        return {"grad_norm": float(norm), "clip_coef": float(coef), "muon_momentum": momentum,
                "lr_muon": lrs["muon"], "lr_embed": lrs["embed"], "lr_scalar": lrs["scalar"]}

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state, the same on every rank. Collective: call on all ranks.

        Bank momentum is gathered to whole-bank tensors on the CPU, so a
        resume state loads at any world size.
        """
        return {"version": STATE_VERSION,
                "muon_momentum": {b.name: b.full_momentum().cpu() for b in self.banks},
                # Deep copies: torch's AdamW hands out (and loads) its live state tensors.
                "adamw": copy.deepcopy(self.adamw.state_dict()) if self.adamw is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"optimizer state version {state.get('version')!r}, expected {STATE_VERSION}")
        momentum = state["muon_momentum"]
        names = sorted(b.name for b in self.banks)
        if sorted(momentum) != names:
            raise DataError(f"optimizer state has Muon banks {sorted(momentum)}, the model has {names}")
        if (state["adamw"] is None) != (self.adamw is None):
            raise DataError("optimizer state and model disagree on whether there are AdamW parameters")
        for bank in self.banks:
            try:
                bank.load_full_momentum(momentum[bank.name])
            except ValueError as exc:
                raise DataError(f"optimizer state: {exc}") from None
        if self.adamw is not None:
            self.adamw.load_state_dict(copy.deepcopy(state["adamw"]))
