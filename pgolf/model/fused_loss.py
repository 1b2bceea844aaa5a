"""Soft-capped cross-entropy of the output layer, chunked over rows (``model.fused_loss``).

Per row i with hidden state ``x_i`` and target ``t_i`` (the loss of
pgolf.model.gpt, docs/RECIPE.md §2):

    l = x_i Wᵀ,  z = c·tanh(l / c)  (c = logit_softcap; z = l when c = 0),
    nll_i = logsumexp(z) − z[t_i],
    ∂nll_i/∂l_j = (softmax(z)_j − [j = t_i]) · (1 − (z_j / c)²).

The plain path materialises the logits of the whole micro-batch in fp32
(48×2048 rows × 1024 at the record shape) and autograd keeps them for the
backward. Here the rows go through in chunks of ``CHUNK_ROWS``: the forward
keeps only the per-row ``logsumexp`` (fp32, one per row); the backward
recomputes each chunk's logits with one matmul and turns them into the
logit gradient in one pass, then accumulates ``grad x = G W`` and ``grad W
+= Gᵀ x`` chunk by chunk. The logits of a chunk are the matmul's output
in the compute dtype (bf16 under autocast, as the plain path's before its
fp32 cast); the soft-cap, softmax and loss are computed in fp32.

On CUDA with Triton the row work (forward: loss and logsumexp; backward:
the logit gradient) is one Triton kernel per chunk, one program per row;
elsewhere the same formulas run as torch ops (the reference the kernels are
tested against). The op is a ``torch.library.custom_op`` with a fake and an
autograd formula, so it compiles without a graph break. It returns the
per-row losses: the mean (training) and per-token NLL (evaluation) are
taken outside.
"""
from __future__ import annotations

import torch

from pgolf.model import triton_support
from pgolf.model.triton_support import triton, tl

__all__ = ["softcap_token_nll", "CHUNK_ROWS"]

CHUNK_ROWS = 16384  # rows per chunk: 16384 × 1024 bf16 logits = 32 MiB at the record shape


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return cap * torch.tanh(z / cap) if cap > 0 else z


def rows_forward_reference(logits: torch.Tensor, targets: torch.Tensor, cap: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V], targets [n] → (nll [n], logsumexp [n]) in fp32 (fp64 stays fp64)."""
    z = _softcap(logits, cap)
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(1, targets[:, None]).squeeze(1), lse


def rows_backward_reference(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                            grad_rows: torch.Tensor, cap: float) -> torch.Tensor:
    """∂(Σ grad_rows_i · nll_i)/∂logits, [n, V] in the logits' dtype."""
    z = _softcap(logits, cap)
    grad = torch.exp(z - lse[:, None])
    grad[torch.arange(len(targets), device=z.device), targets] -= 1.0
    if cap > 0:
        grad = grad * (1.0 - (z / cap).square())
    return (grad * grad_rows[:, None].to(grad.dtype)).to(logits.dtype)


if triton is not None:
    @triton.jit
    def _softcap_of(l, cap, SOFTCAP: tl.constexpr):
        if SOFTCAP:
            # tanh(a) = 1 − 2/(e^{2a} + 1): exact at both tails (e^{2a} → inf gives 1, → 0 gives −1).
            return cap * (1.0 - 2.0 / (tl.exp(2.0 * l / cap) + 1.0))
        return l

    @triton.jit
    def _rows_kernel(logits_ptr, targets_ptr, lse_ptr, nll_ptr, grad_rows_ptr, grad_ptr, V, stride_row, cap,
                     SOFTCAP: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One row. Forward: online max/sum over V in BLOCK_V pieces → lse, nll. Backward: the
        logit gradient from the saved lse, written in the logits' dtype."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        if BACKWARD:
            lse = tl.load(lse_ptr + row)
            g = tl.load(grad_rows_ptr + row).to(tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                z = _softcap_of(tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
                d = tl.exp(z - lse) - tl.where(start + cols == target, 1.0, 0.0)
                if SOFTCAP:
                    d = d * (1.0 - (z / cap) * (z / cap))
                tl.store(grad_ptr + row * stride_row + start + cols, (d * g).to(grad_ptr.dtype.element_ty),
                         mask=mask)
        else:
            # A finite floor, not −inf: lanes without a column yet then add exp(−inf − floor) = 0
            # instead of computing −inf − (−inf).
            run_max = tl.full((BLOCK_V,), -1.0e30, tl.float32)
            run_sum = tl.zeros((BLOCK_V,), tl.float32)
            z_target = tl.zeros((BLOCK_V,), tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                z = _softcap_of(tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
                z = tl.where(mask, z, float("-inf"))
                new_max = tl.maximum(run_max, z)
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
                run_max = new_max
                z_target += tl.where(start + cols == target, z, 0.0)
            row_max = tl.max(run_max, 0)
            lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), 0))
            tl.store(lse_ptr + row, lse)
            tl.store(nll_ptr + row, lse - tl.sum(z_target, 0))


def _rows_triton(logits, targets, cap, lse=None, grad_rows=None):
    n, V = logits.shape
    block = min(triton.next_power_of_2(V), 4096)
    backward = lse is not None
    if backward:
        grad = torch.empty_like(logits)
        nll = None
        _rows_kernel[(n,)](logits, targets, lse, grad, grad_rows, grad, V, logits.stride(0), float(cap),
                           SOFTCAP=cap > 0, BACKWARD=True, BLOCK_V=block)
        return grad
    lse = torch.empty(n, device=logits.device, dtype=torch.float32)
    nll = torch.empty_like(lse)
    _rows_kernel[(n,)](logits, targets, lse, nll, lse, logits, V, logits.stride(0), float(cap),
                       SOFTCAP=cap > 0, BACKWARD=False, BLOCK_V=block)
    return nll, lse


def _rows_forward(logits, targets, cap):
    if triton_support.available(logits) and logits.dtype != torch.float64:
        return _rows_triton(logits, targets, cap)
    return rows_forward_reference(logits, targets, cap)


def _rows_backward(logits, targets, lse, grad_rows, cap):
    if triton_support.available(logits) and logits.dtype != torch.float64:
        return _rows_triton(logits, targets, cap, lse, grad_rows)
    return rows_backward_reference(logits, targets, lse, grad_rows, cap)


def _chunks(n: int, chunk_rows: int):
    return [(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
def _softcap_ce_op(x2: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, chunk_rows: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [N], logsumexp [N]), fp32 (fp64 for fp64 inputs); x2 [N, D], weight [V, D], targets [N]."""
    acc_dtype = torch.promote_types(x2.dtype, torch.float32)
    nll = torch.empty(x2.shape[0], device=x2.device, dtype=acc_dtype)
    lse = torch.empty_like(nll)
    for s, e in _chunks(x2.shape[0], chunk_rows):
        nll[s:e], lse[s:e] = _rows_forward(x2[s:e] @ weight.t(), targets[s:e], cap)
    return nll, lse


@_softcap_ce_op.register_fake
def _(x2, weight, targets, cap, chunk_rows):
    acc_dtype = torch.promote_types(x2.dtype, torch.float32)
    return x2.new_empty(x2.shape[0], dtype=acc_dtype), x2.new_empty(x2.shape[0], dtype=acc_dtype)


@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward_op(grad_nll: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            lse: torch.Tensor, cap: float, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x2 in x2's dtype, grad weight in the weight's dtype, accumulated in fp32 over chunks)."""
    grad_x = torch.empty_like(x2)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
    for s, e in _chunks(x2.shape[0], chunk_rows):
        g = _rows_backward(x2[s:e] @ weight.t(), targets[s:e], lse[s:e], grad_nll[s:e], cap)
        grad_x[s:e] = g @ weight
        grad_w += (g.t() @ x2[s:e]).to(grad_w.dtype)
    return grad_x, grad_w.to(weight.dtype)


@_softcap_ce_backward_op.register_fake
def _(grad_nll, x2, weight, targets, lse, cap, chunk_rows):
    return torch.empty_like(x2), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x2, weight, targets, cap, chunk_rows = inputs
    ctx.save_for_backward(x2, weight, targets, output[1])
    ctx.cap, ctx.chunk_rows = cap, chunk_rows


def _backward(ctx, grad_nll, grad_lse_unused):
    x2, weight, targets, lse = ctx.saved_tensors
    grad_x, grad_w = _softcap_ce_backward_op(grad_nll.contiguous(), x2, weight, targets, lse, ctx.cap,
                                             ctx.chunk_rows)
    return grad_x, grad_w, None, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


def softcap_token_nll(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                      chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-position NLL (fp32, fp64 for fp64 inputs) of hidden states x [..., D] under output matrix
    weight [V, D] and the soft-cap ``cap`` (0 = none); shape of ``targets``.

    x and weight are cast to the autocast dtype when autocast is on (what ``F.linear`` does), else
    to x's dtype.
    """
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    nll, _ = _softcap_ce_op(x2, weight.to(dtype).contiguous(), targets.reshape(-1).contiguous(), float(cap),
                            int(chunk_rows))
    return nll.view(targets.shape)
