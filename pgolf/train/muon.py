"""Muon for the banked block matrices: Newton–Schulz orthogonalisation and the sharded step.

Muon replaces each matrix's (Nesterov) momentum with its nearest semi-
orthogonal matrix, computed approximately by a few Newton–Schulz iterations,
so every direction in the update moves at a similar rate.

The banks are 3-D parameters ``[n, rows, cols]`` (a stack of ``n`` matrices).
Under several ranks each bank is split along its leading dimension
("parallel Muon", docs/RECIPE.md §3.2): gradients are reduce-scattered (averaged),
each rank keeps the momentum of its own slice, orthogonalises only that
slice, and the orthogonalised updates are all-gathered so every rank applies
the identical full update. One rank is the same code with no communication.

Two orthogonalisers share one iteration ``A = X·Xᵀ; X ← a·X + (b·A + c·A²)·X``
on the Frobenius-normalised matrix (wide orientation):

* ``ns5``: the records' fixed quintic (a, b, c) repeated ``ns_steps`` times;
* ``polar_express``: five different (a, b, c) tuples, one per step
  (docs/FRONTIER.md §3.2, the "Polar Express" coefficients), each chosen to push
  the singular values towards 1 faster than repeating one polynomial.

Optionally (``row_norm``, "MuonEq-R", docs/FRONTIER.md §3.2) every row of the
Nesterov direction is divided by its L2 norm (fp32, clamped at 1e-7) before
orthogonalising, so no output unit dominates the polar factor.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

# Quintic Newton–Schulz coefficients (a, b, c) of the records (docs/RECIPE.md §3.1).
# They are chosen for the steepest growth of small singular values, not for
# convergence to exactly 1: after 5 steps singular values land in roughly
# [0.68, 1.13] instead of at 1, which Muon does not mind and which costs far
# fewer iterations than a convergent polynomial.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# Polar Express: one (a, b, c) per step, in order (docs/FRONTIER.md §3.2, F1855's Muon).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHOGONALIZERS = ("ns5", "polar_express")
ROW_NORM_EPS = 1e-7

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; 2.9 only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def polynomial_orthogonalize(grad: torch.Tensor, coeffs, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate orthogonal polar factor ``U Vᵀ`` of each matrix in ``grad [..., rows, cols]``.

    ``coeffs`` is the sequence of (a, b, c), one per step. Every matrix is
    divided by its Frobenius norm (+1e-7, so singular values start ≤ 1 and a
    zero matrix stays zero), iterated in the wide orientation (transposed when
    rows > cols, so ``X Xᵀ`` is the small Gram matrix), and all leading
    dimensions run as one batched matmul. Computed and returned in ``dtype``
    (bf16 by default, as the records do); cast as needed.
    """
    if grad.ndim < 2:
        raise ValueError(f"orthogonalisation needs a [..., rows, cols] tensor, got shape {tuple(grad.shape)}")
    rows, cols = grad.shape[-2:]
    x = grad.reshape(-1, rows, cols).to(dtype)
    tall = rows > cols
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for a, b, c in coeffs:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, poly, x, beta=a)                     # a·X + (b·A + c·A²)·X
    if tall:
        x = x.mT
    return x.reshape(grad.shape)


def newton_schulz5(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The records' quintic Newton–Schulz: :data:`NS_COEFFS` repeated ``steps`` times."""
    return polynomial_orthogonalize(grad, (NS_COEFFS,) * steps, dtype)


def polar_express(grad: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Polar Express: the five :data:`POLAR_EXPRESS_COEFFS` steps, in order."""
    return polynomial_orthogonalize(grad, POLAR_EXPRESS_COEFFS, dtype)


def orthogonalize(u: torch.Tensor, method: str, ns_steps: int) -> torch.Tensor:
    """``method`` ∈ :data:`ORTHOGONALIZERS`; ``ns_steps`` is read by ``ns5`` only."""
    if method == "ns5":
        return newton_schulz5(u, ns_steps)
    if method == "polar_express":
        return polar_express(u)
    raise ValueError(f"unknown orthogonaliser {method!r} (expected one of {ORTHOGONALIZERS})")


def row_normalize(u: torch.Tensor) -> torch.Tensor:
    """MuonEq-R: each row of each matrix divided by its fp32 L2 norm, clamped at 1e-7."""
    norms = torch.linalg.vector_norm(u.float(), dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
    return (u.float() / norms).to(u.dtype)


def shape_scale(rows: int, cols: int) -> float:
    """√max(1, rows/cols): keeps the per-element update size of tall matrices comparable."""
    return math.sqrt(max(1.0, rows / cols))


def muon_direction(grad: torch.Tensor, momentum_buf: torch.Tensor, momentum: float,
                   ns_steps: int, method: str = "ns5", row_norm: bool = False) -> torch.Tensor:
    """Nesterov momentum, then orthogonalisation; updates ``momentum_buf`` in place.

    ``buf ← μ·buf + g``; ``u = g + μ·buf``; with ``row_norm`` each row of u is
    divided by its L2 norm; returns ``orthogonalize(u)`` (bf16).
    """
    momentum_buf.mul_(momentum).add_(grad)
    u = grad.add(momentum_buf, alpha=momentum)
    if row_norm:
        u = row_normalize(u)
    return orthogonalize(u, method, ns_steps)


def apply_muon_update(param: torch.Tensor, direction: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``W ← W·(1 − lr·wd) − lr·√max(1, rows/cols)·O`` (decoupled weight decay)."""
    rows, cols = param.shape[-2:]
    param.mul_(1.0 - lr * weight_decay)
    param.add_(direction, alpha=-lr * shape_scale(rows, cols))


class ShardedBank:
    """This rank's share of one bank's Muon work: gradient slice, momentum slice, update.

    The leading dimension ``n`` is zero-padded to ``per_rank × world_size`` and
    rank r owns rows ``[r·per_rank, (r+1)·per_rank)`` of the padded stack.
    Padding rows have zero gradient, zero momentum and a zero orthogonalised
    update (NS maps 0 to 0), and are dropped before the update is applied.

    The calls of one step, in order, on every rank: ``launch_grad_reduce``,
    ``finish_grad_reduce``, ``launch_update``, ``apply_update``.
    """

    def __init__(self, name: str, param: torch.nn.Parameter, rank: int, world_size: int):
        if param.ndim != 3:
            raise ValueError(f"bank '{name}' must be 3-D [n, rows, cols], got shape {tuple(param.shape)}")
        self.name = name
        self.param = param
        self.rank = rank
        self.world_size = world_size
        self.n = param.shape[0]
        self.per_rank = -(-self.n // world_size)
        self.padded_n = self.per_rank * world_size
        self.momentum = torch.zeros((self.per_rank, *param.shape[1:]), dtype=torch.float32, device=param.device)
        self._grad_shard: torch.Tensor | None = None
        self._direction: torch.Tensor | None = None
        self._work: dist.Work | None = None

    def _padded(self, full: torch.Tensor) -> torch.Tensor:
        if self.padded_n == self.n:
            return full.contiguous()
        out = full.new_zeros((self.padded_n, *full.shape[1:]))
        out[: self.n].copy_(full)
        return out

    def launch_grad_reduce(self) -> None:
        """Start averaging the gradient onto this rank's slice (asynchronously)."""
        grad = self.param.grad
        if grad is None:
            grad = torch.zeros_like(self.param)
        grad = grad.float()
        if self.world_size == 1:
            self._grad_shard = grad
            return
        self._grad_shard = grad.new_empty(self.momentum.shape)
        self._work = _reduce_scatter_single(self._grad_shard, self._padded(grad),
                                            op=dist.ReduceOp.SUM, async_op=True)

    def finish_grad_reduce(self) -> torch.Tensor:
        """Wait for the reduction; returns this rank's slice of the AVERAGED gradient."""
        assert self._grad_shard is not None, "launch_grad_reduce was not called"
        if self._work is not None:
            self._work.wait()
            self._work = None
            self._grad_shard.div_(self.world_size)
        return self._grad_shard

    def launch_update(self, clip_coef: torch.Tensor, momentum: float, ns_steps: int,
                      method: str = "ns5", row_norm: bool = False) -> None:
        """Clip, momentum, orthogonalisation on the local slice; start gathering the full update."""
        assert self._grad_shard is not None, "finish_grad_reduce was not called"
        self._grad_shard.mul_(clip_coef)
        direction = muon_direction(self._grad_shard, self.momentum, momentum, ns_steps, method, row_norm)
        self._grad_shard = None
        if self.world_size == 1:
            self._direction = direction
            return
        self._direction = direction.new_empty((self.padded_n, *direction.shape[1:]))
        self._work = _all_gather_single(self._direction, direction.contiguous(), async_op=True)

    def apply_update(self, lr: float, weight_decay: float) -> None:
        assert self._direction is not None, "launch_update was not called"
        if self._work is not None:
            self._work.wait()
            self._work = None
        apply_muon_update(self.param.data, self._direction[: self.n], lr, weight_decay)
        self._direction = None

    def full_momentum(self) -> torch.Tensor:
        """The whole bank's momentum ``[n, rows, cols]`` (collective when world_size > 1)."""
        if self.world_size == 1:
            return self.momentum.clone()
        full = self.momentum.new_empty((self.padded_n, *self.momentum.shape[1:]))
        _all_gather_single(full, self.momentum)
        return full[: self.n].clone()

    def load_full_momentum(self, full: torch.Tensor) -> None:
        """Take this rank's slice of a whole-bank momentum (saved at any world size)."""
        if tuple(full.shape) != tuple(self.param.shape):
            raise ValueError(f"bank '{self.name}' momentum has shape {tuple(full.shape)}, "
                             f"expected {tuple(self.param.shape)}")
        padded = self._padded(full.to(device=self.momentum.device, dtype=torch.float32))
        start = self.rank * self.per_rank
        self.momentum.copy_(padded[start:start + self.per_rank])
