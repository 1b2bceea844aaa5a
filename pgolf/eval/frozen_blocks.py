"""Test-time training with the first ``eval_ttt.freeze_blocks`` blocks fixed (pgolf/eval/ttt.py's chunked TTT)."""
from __future__ import annotations

import torch

from pgolf.errors import ParamError
from pgolf.model.layout import block_index


def block_count(model: torch.nn.Module) -> int:
    """Number of ``blocks.{i}`` modules."""
    indices = {i for name, _ in model.named_modules() if (i := block_index(name)) is not None}
    return max(indices) + 1 if indices else 0


class FrozenBlocks:
    """Keeps the first ``n`` blocks fixed during TTT.

    Parameters named ``blocks.{i}.…`` with i < n stop requiring grad. A bank
    (a parameter named ``*_bank`` whose leading dimension is L or 2L, layer i
    at slices [i] and [L+i]) stays trainable, and a gradient hook zeroes the
    frozen layers' slices, so they add nothing to the clip norm or momentum;
    after each step those slices are copied back, undoing weight decay.
    """

    def __init__(self, model: torch.nn.Module, count: int):
        layers = block_count(model)
        if count > layers:
            raise ParamError("eval_ttt.freeze_blocks", f"{count} exceeds the model's {layers} blocks")
        self.trainable: list[torch.nn.Parameter] = []
        self._unfrozen: list[torch.nn.Parameter] = []
        self._hooks = []
        self._pinned: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            block = block_index(name)
            if count and block is not None and block < count:
                param.requires_grad_(False)
                self._unfrozen.append(param)
                continue
            if count and name.rsplit(".", 1)[-1].endswith("_bank"):
                rows = self._frozen_rows(name, param, layers, count)
                mask = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
                mask[rows] = True
                mask = mask.view(-1, *([1] * (param.ndim - 1)))
                self._hooks.append(param.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))
                self._pinned.append((param, rows, param.detach()[rows].clone()))
            self.trainable.append(param)

    @staticmethod
    def _frozen_rows(name: str, param: torch.Tensor, layers: int, count: int) -> torch.Tensor:
        first = list(range(count))
        if param.shape[0] == layers:
            rows = first
        elif param.shape[0] == 2 * layers:
            rows = first + [layers + i for i in first]
        else:
            raise ValueError(f"bank {name} has leading dimension {param.shape[0]}, "
                             f"expected {layers} or {2 * layers} layers' slices")
        return torch.tensor(rows, dtype=torch.long, device=param.device)

    @torch.no_grad()
    def restore_(self) -> None:
        for param, rows, saved in self._pinned:
            param[rows] = saved

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for param in self._unfrozen:
            param.requires_grad_(True)
