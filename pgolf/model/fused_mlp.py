"""The LeakyReLU(s)² MLP with its activation fused into the matmul epilogues (``model.fused_mlp``).

``y = act(x W_upᵀ) W_downᵀ`` with ``act(u) = leaky_relu(u, s)²``. The plain
path (pgolf.model.block.MLP) runs four memory passes over the hidden
activation per layer and micro-step beyond the matmuls themselves: the up
matmul writes ``u``, an elementwise kernel reads ``u`` and writes ``h =
act(u)``, the backward's ``grad_h = g W_down`` is written and then read
again with ``u`` by the kernel that writes ``grad_u``. Here two Triton
matmuls do that work in their epilogues, from the fp32 accumulator:

- forward, ``[u, h] = epilogue(x W_upᵀ)``: writes ``u`` (saved for backward)
  and ``h`` (the down matmul's input) in one pass; ``h`` is not saved;
- backward, ``[grad_u, h] = epilogue(g W_down, u)``: reads the saved ``u``
  once and writes ``grad_u = (g W_down) ⊙ act'(u)`` and the recomputed ``h``
  (for ``grad W_down = gᵀ h``), so ``grad_h`` never reaches memory;
- the other four products (``y = h W_downᵀ``, ``grad x = grad_u W_up``,
  ``grad W_up = grad_uᵀ x``, ``grad W_down = gᵀ h``) stay with cuBLAS.

``act'(u) = 2·leaky(u)·(1 if u ≥ 0 else s)``. Saved for the backward per layer:
``x`` and ``u`` (bf16 under autocast), not ``h`` (recomputed in the backward
epilogue), so peak memory does not grow.

The op is a ``torch.library.custom_op`` with a registered fake and autograd
formula, so ``torch.compile(fullgraph=True)`` keeps it as one opaque node
without a graph break. It computes in the dtype its inputs are given: the
caller casts to the autocast dtype (the op's backward runs outside autocast).
Without CUDA or Triton (CPU) the same custom op runs the plain torch formula
below, the reference the Triton kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.model import triton_support
from pgolf.model.triton_support import triton, tl

__all__ = ["fused_mlp", "mlp_reference", "up_act", "down_grad_act"]


def _act_and_slope(u: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaky(u), d leaky/du) in u's dtype."""
    return F.leaky_relu(u, negative_slope=slope), torch.where(u >= 0, 1.0, slope).to(u.dtype)


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """The plain formula: ``leaky_relu(x W_upᵀ, slope)² W_downᵀ``."""
    return F.linear(F.leaky_relu(F.linear(x, w_up), negative_slope=slope).square(), w_down)


# ------------------------------------------------------------------ Triton kernels
if triton is not None:
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                              num_stages=stages, num_warps=warps)
                for bm, bn, bk, stages, warps in ((128, 128, 64, 4, 8), (128, 256, 64, 3, 8),
                                                  (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                                  (256, 128, 64, 3, 8))]

    @triton.jit
    def _matmul_act_kernel(a_ptr, b_ptr, u_ptr, out_ptr, grad_ptr, M, N, K,
                           stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, slope,
                           BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """acc = A[M,K] B[K,N] (fp32). Forward: u ← acc, out ← act(acc). Backward (u given):
        grad ← acc ⊙ act'(u), out ← act(u). All outputs [M, N] with strides (stride_cm, stride_cn)."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * grid_n)  # grouped order: neighbouring programs share A rows in L2
        first_m = group * GROUP_M
        size_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pid_n = (pid % (GROUP_M * grid_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_ty = out_ptr.dtype.element_ty
        if BACKWARD:
            u = tl.load(u_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
            d_leaky = tl.where(u >= 0, 1.0, slope)
            leaky = u * d_leaky
            tl.store(grad_ptr + c_offs, (acc * 2.0 * leaky * d_leaky).to(out_ty), mask=c_mask)
            tl.store(out_ptr + c_offs, (leaky * leaky).to(out_ty), mask=c_mask)
        else:
            leaky = acc * tl.where(acc >= 0, 1.0, slope)
            tl.store(u_ptr + c_offs, acc.to(out_ty), mask=c_mask)
            tl.store(out_ptr + c_offs, (leaky * leaky).to(out_ty), mask=c_mask)

    # Autotuned on CUDA (the first call per shape times each config); the interpreter has no timer.
    _matmul_act_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "BACKWARD"])(_matmul_act_kernel)
    _INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


def _launch(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, out: torch.Tensor, grad: torch.Tensor,
            slope: float, backward: bool) -> None:
    """A [M, K] (any strides) times B [K, N] (any strides) into contiguous [M, N] outputs."""
    M, K = a.shape
    N = b.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, u, out, grad, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), slope)
    if a.device.type == "cuda":
        _matmul_act_tuned[grid](*args, BACKWARD=backward)
    else:
        _matmul_act_kernel[grid](*args, BACKWARD=backward, **_INTERPRETER_CONFIG)


def up_act(x2: torch.Tensor, w_up: torch.Tensor, slope: float, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, D], w_up [H, D] → (u = x2 W_upᵀ, h = act(u)), both [M, H] in x2's dtype."""
    if not use_triton:
        u = F.linear(x2, w_up)
        return u, F.leaky_relu(u, negative_slope=slope).square()
    M, H = x2.shape[0], w_up.shape[0]
    u = torch.empty(M, H, device=x2.device, dtype=x2.dtype)
    h = torch.empty_like(u)
    _launch(x2, w_up.t(), u, h, h, slope, backward=False)
    return u, h


def down_grad_act(g2: torch.Tensor, w_down: torch.Tensor, u: torch.Tensor, slope: float,
                  use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """g2 [M, D] = grad y, w_down [D, H], u [M, H] → (grad_u = (g2 W_down) ⊙ act'(u), h = act(u))."""
    if not use_triton:
        leaky, d_leaky = _act_and_slope(u, slope)
        return (g2 @ w_down) * (2 * leaky * d_leaky), leaky.square()
    grad_u = torch.empty_like(u)
    h = torch.empty_like(u)
    _launch(g2, w_down, u, h, grad_u, slope, backward=True)
    return grad_u, h


def _use_triton(t: torch.Tensor) -> bool:
    return triton_support.available(t)


# ------------------------------------------------------------------ the custom op
@torch.library.custom_op("pgolf::fused_mlp", mutates_args=())
def _fused_mlp_op(x2: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, D], u [M, H]); u is returned only to be saved for backward."""
    u, h = up_act(x2, w_up, slope, _use_triton(x2))
    return F.linear(h, w_down), u


@_fused_mlp_op.register_fake
def _(x2, w_up, w_down, slope):
    return x2.new_empty(x2.shape[0], w_down.shape[0]), x2.new_empty(x2.shape[0], w_up.shape[0])


@torch.library.custom_op("pgolf::fused_mlp_backward", mutates_args=())
def _fused_mlp_backward_op(grad_y: torch.Tensor, x2: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           u: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x2, grad W_up, grad W_down)."""
    grad_y = grad_y.contiguous()
    grad_u, h = down_grad_act(grad_y, w_down, u, slope, _use_triton(grad_y))
    return grad_u @ w_up, grad_u.t() @ x2, grad_y.t() @ h


@_fused_mlp_backward_op.register_fake
def _(grad_y, x2, w_up, w_down, u, slope):
    return torch.empty_like(x2), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output):
    x2, w_up, w_down, slope = inputs
    ctx.save_for_backward(x2, w_up, w_down, output[1])
    ctx.slope = slope


def _backward(ctx, grad_y, grad_u_unused):
    x2, w_up, w_down, u = ctx.saved_tensors
    grad_x, grad_up, grad_down = _fused_mlp_backward_op(grad_y, x2, w_up, w_down, u, ctx.slope)
    return grad_x, grad_up, grad_down, None


_fused_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """``mlp_reference`` through the fused op: x [..., D], w_up [H, D], w_down [D, H] → [..., D].

    Inputs are cast to the autocast dtype when autocast is on (what ``F.linear`` would do), else
    to x's dtype; the result has that dtype.
    """
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    y, _ = _fused_mlp_op(x2, w_up.to(dtype).contiguous(), w_down.to(dtype).contiguous(), float(slope))
    return y.view(*x.shape[:-1], w_down.shape[0])
