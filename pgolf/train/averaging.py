"""Weight averages kept alongside training: a warmed-up EMA and tight SWA.

EMA. The records keep ``ema ← 0.997·ema + 0.003·w`` from the initial weights
and load it unconditionally. Its memory is about 330 steps, so on a short run
the average is dominated by early, untrained weights (PR #549's script run for
314 steps: 1.1325 bpb live, 3.2247 with EMA). Here update ``t`` (0-based) uses
the effective decay ``min(decay, (1 + t) / (10 + t))``: the first update keeps
only 10% of the initial weights, and the averaging window grows with the run
(about the last 10% of steps) until it reaches the configured decay (at
t ≈ 3000 for 0.997). Zero-initialised bias correction was not chosen: it
removes the initial weights but still averages uniformly over the whole early
run, which is the part that hurts.

Tight SWA (docs/RECIPE.md §3.4): equal-weight snapshots taken late in the warmdown
(the training loop decides when; ``maybe_add`` encodes the records' rule),
summed in fp32 and averaged as ``sum / count`` cast back to each parameter's
dtype.

Both track ``model.named_parameters()`` of the module they are given (pass the
uncompiled module so names carry no ``_orig_mod.`` prefix).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pgolf.errors import DataError

# The format tag of artifacts/train/averages.pt, the candidates the train stage writes.
AVERAGES_FORMAT = "pgolf-train-averages"

EMA_WARMUP_OFFSET = 10.0


def ema_effective_decay(decay: float, num_updates: int) -> float:
    """Decay used by update number ``num_updates`` (0-based)."""
    return min(decay, (1.0 + num_updates) / (EMA_WARMUP_OFFSET + num_updates))


def _check_names_and_shapes(kind: str, expected: dict[str, torch.Tensor], given: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise DataError(f"{kind} state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise DataError(f"{kind} state: '{name}' has shape {tuple(given[name].shape)}, "
                            f"expected {tuple(tensor.shape)}")


class EMA:
    """fp32 warmed-up exponential moving average of a model's parameters."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()}
        self._dtypes = {name: p.dtype for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the current weights; call once after every optimizer step."""
        weight = 1.0 - ema_effective_decay(self.decay, self.num_updates)
        params = dict(model.named_parameters())
        shadows = list(self.shadow.values())
        currents = [params[name].detach().float() for name in self.shadow]
        torch._foreach_lerp_(shadows, currents, weight)  # ema += (1 − d)·(w − ema)
        self.num_updates += 1

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The average, cast to each parameter's dtype (new tensors)."""
        return {name: t.to(self._dtypes[name], copy=True) for name, t in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, t in self.shadow.items():
            params[name].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_names_and_shapes("EMA", self.shadow, state["shadow"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)


class SWA:
    """Equal-weight average of parameter snapshots, summed in fp32.

    ``on_cpu`` keeps the running sum in host memory (the records' choice,
    saving one fp32 model copy on the GPU); otherwise it lives next to each
    parameter.
    """

    def __init__(self, model: nn.Module, lr_scale_threshold: float, every: int, on_cpu: bool = False):
        if not 0.0 <= lr_scale_threshold <= 1.0:
            raise ValueError(f"SWA lr_scale_threshold must be in [0, 1], got {lr_scale_threshold}")
        if every < 1:
            raise ValueError(f"SWA every must be >= 1, got {every}")
        self.lr_scale_threshold = lr_scale_threshold
        self.every = every
        self.count = 0
        self.sum: dict[str, torch.Tensor] = {
            name: torch.zeros(p.shape, dtype=torch.float32, device="cpu" if on_cpu else p.device)
            for name, p in model.named_parameters()}
        self._dtypes = {name: p.dtype for name, p in model.named_parameters()}

    def should_add(self, lr_scale: float, step: int) -> bool:
        """The records' rule: late in the warmdown (scale < threshold) and every ``every`` steps."""
        return lr_scale < self.lr_scale_threshold and step % self.every == 0

    def maybe_add(self, model: nn.Module, lr_scale: float, step: int) -> bool:
        """Add a snapshot when :meth:`should_add`; returns whether one was added."""
        if not self.should_add(lr_scale, step):
            return False
        self.add(model)
        return True

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, total in self.sum.items():
            total.add_(params[name].detach().to(device=total.device, dtype=torch.float32))
        self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        """``sum / count`` cast to each parameter's dtype."""
        if self.count == 0:
            raise ValueError("SWA has no snapshots to average")
        return {name: (total / self.count).to(self._dtypes[name]) for name, total in self.sum.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": {k: v.clone() for k, v in self.sum.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_names_and_shapes("SWA", self.sum, state["sum"])
        self.count = int(state["count"])
        for name, t in state["sum"].items():
            self.sum[name].copy_(t)
