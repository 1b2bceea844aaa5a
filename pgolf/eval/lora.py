"""Batched per-document LoRA adapters and their row-masked AdamW (docs/FRONTIER.md §5.2 item 4, 5).

A batch of up to ``rows`` documents each owns its own adapters. For every
visit slot of the model (17 with the F1855 recurrence: one set per *virtual*
layer) and every enabled target, row i holds ``A_i`` [r, in] and ``B_i``
[out, r]; the adapter adds ``(x·A_iᵀ)·B_iᵀ · α/r`` to row i of the target's
output:

====== =========================== ======================================
target input                       added to
====== =========================== ======================================
q k v  the normalised block input  the q / k / v projection
o      the normalised block input  the attention output, before attn_scale
mlp    the normalised MLP input    the MLP output, before mlp_scale
head   the final hidden state      the logits, before the soft-cap
====== =========================== ======================================

Initialisation: ``A ~ U(±1/√in)``, ``B = 0`` (so a fresh adapter is the
identity). A forward over ``k`` rows of input uses adapter rows ``0..k-1``
(the running documents are a prefix because a batch is ordered by length,
longest first; the padded forward adds rows that score nothing).

:class:`RowAdamW` is AdamW (decoupled weight decay, bias correction) applied
row by row: a step updates only the first ``count`` rows (in place; the rest
is untouched), and each row keeps its own step count, so every document's adapters follow exactly the AdamW
trajectory they would have alone (the float64 reference in the tests uses
``torch.optim.AdamW`` on one document at a time).
"""
from __future__ import annotations

import math

import torch

from pgolf.eval.ttt import LORA_TARGETS
from pgolf.model.attention import HEAD_SLOT


def target_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every adapter target of a GPT."""
    cfg = model.cfg
    d = cfg.model_dim
    return {"q": (d, d), "k": (d, cfg.kv_dim), "v": (d, cfg.kv_dim), "o": (d, d), "mlp": (d, d),
            "head": (d, cfg.vocab_size)}


def visit_slots(model: torch.nn.Module) -> int:
    """Virtual layers of the model as it runs now (recurrence on: every visit gets its own adapters)."""
    encoder, decoder = model.visits()
    return len(encoder) + len(decoder)


class BatchedLoRA:
    """Per-document adapters of ``rows`` documents; call as the model's ``adapters`` (pgolf.model.attention)."""

    def __init__(self, model: torch.nn.Module, rows: int, rank: int, alpha: float, targets: tuple[str, ...],
                 device: torch.device, dtype: torch.dtype = torch.float32):
        unknown = set(targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known {list(LORA_TARGETS)}")
        self.rows, self.rank, self.scale = rows, rank, alpha / rank
        shapes = target_shapes(model)
        slots = [s for s in range(visit_slots(model))]
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for target in targets:
            fan_in, fan_out = shapes[target]
            for slot in ([HEAD_SLOT] if target == "head" else slots):
                self.a[slot, target] = torch.zeros(rows, rank, fan_in, device=device, dtype=dtype,
                                                   requires_grad=True)
                self.b[slot, target] = torch.zeros(rows, fan_out, rank, device=device, dtype=dtype,
                                                   requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [t for key in self.a for t in (self.a[key], self.b[key])]

    @torch.no_grad()
    def reset_a(self, generator: torch.Generator) -> None:
        """A ~ U(±1/√in) for every row, drawn in a fixed order from ``generator`` (on the CPU)."""
        for a in self.a.values():
            bound = 1.0 / math.sqrt(a.shape[-1])
            fresh = torch.rand(a.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
            a.copy_(fresh.to(a.dtype))

    @torch.no_grad()
    def zero_b(self) -> None:
        for b in self.b.values():
            b.zero_()

    def __call__(self, slot: int, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """Delta for rows ``0..k-1``: x [k, T, in] → [k, T, out]; None for a disabled target.

        k is read off ``x`` (not stored), so a compiled forward with a dynamic row count keeps one graph."""
        a = self.a.get((slot, target))
        if a is None:
            return None
        k = x.shape[0]
        low = torch.bmm(x, a[:k].transpose(1, 2).to(x.dtype))
        return torch.bmm(low, self.b[slot, target][:k].transpose(1, 2).to(x.dtype)) * self.scale


class RowAdamW:
    """AdamW over [rows, ...] tensors where each step updates only masked rows (module docstring)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        self.params, self.lr, self.betas, self.eps, self.weight_decay = params, lr, betas, eps, weight_decay
        rows = params[0].shape[0] if params else 0
        self.steps = torch.zeros(rows, dtype=torch.int64, device=params[0].device if params else "cpu")
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def reset(self) -> None:
        self.steps.zero_()
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m.zero_()
            v.zero_()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, count: int) -> None:
        """One AdamW step on rows ``0..count-1`` (the documents still training are a prefix of the batch);
        the other rows keep their weights, moments and step counts."""
        if count <= 0:
            return
        beta1, beta2 = self.betas
        self.steps[:count] += 1
        t = self.steps[:count].double()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            g, w, m, v = p.grad[:count], p.detach()[:count], m[:count], v[:count]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = (self.lr / (1 - beta1 ** t)).to(p.dtype).view(shape)
            bc2_sqrt = (1 - beta2 ** t).sqrt().to(p.dtype).view(shape)
            w.mul_(1 - self.lr * self.weight_decay)
            w.sub_(step_size * (m / (v.sqrt() / bc2_sqrt).add_(self.eps)))

    @torch.no_grad()
    def step_rows(self, stepping: torch.Tensor) -> None:
        """``step`` on the rows where ``stepping`` [rows] is True, as whole-tensor ops kept by ``where``: no
        row count in any shape, so one compiled graph serves every chunk (pgolf/eval/lora_forward.py). Eager,
        a stepping row gets exactly ``step``'s arithmetic; the other rows are untouched."""
        beta1, beta2 = self.betas
        self.steps.add_(stepping.to(self.steps.dtype))
        t = self.steps.double().clamp(min=1)   # rows never stepped: any finite value, discarded below
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            keep = stepping.view(shape)
            g, w = p.grad, p.detach()
            m_new = m.lerp(g, 1 - beta1)
            v_new = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = (self.lr / (1 - beta1 ** t)).to(p.dtype).view(shape)
            bc2_sqrt = (1 - beta2 ** t).sqrt().to(p.dtype).view(shape)
            w_new = w.mul(1 - self.lr * self.weight_decay)
            w_new.sub_(step_size * (m_new / (v_new.sqrt() / bc2_sqrt).add_(self.eps)))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))
            w.copy_(torch.where(keep, w_new, w))
