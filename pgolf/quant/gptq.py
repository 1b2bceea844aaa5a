"""Full-Hessian GPTQ on the shared per-row grid (docs/RECIPE.md §4.3), batched.

One call quantises a *batch* of same-shape matrices (e.g. the 11 layers' Q
projections), each with its own Hessian, for several clip candidates at once:
the Cholesky factor depends only on H, so every candidate's scales reuse it,
and stacking layers and candidates keeps the per-column Python loop count at
the number of columns rather than columns × layers × candidates.

Order of operations for each matrix W (rows × cols) with raw input second
moment H = Σ xᵀx (never damped by the caller):

1. dead columns (diag H = 0): set that diagonal entry to 1 and zero W's column;
2. damping ``H += λ·mean(diag H)·I`` — the only place damping is applied;
3. optional act-order: permute columns by descending diag H;
4. ``U`` = upper Cholesky factor of H⁻¹ (Cholesky → cholesky_inverse →
   Cholesky, upper), in float64; if it fails, retry once with 10·λ (again from
   the raw H), then fall back to round-to-nearest — each fallback is reported;
5. blocked column sweep: ``q_j = clamp(round(w_j / s), ±qmax)``,
   ``e_j = (w_j − q_j s) / U_jj``, ``W[:, j+1:] −= e_j ⊗ U[j, j+1:]``, with the
   update to columns after the block applied as one matmul per block.

AWQ-lite (docs/FRONTIER.md §4.5): columns marked ``protect`` are rounded on a
second, finer int8 grid (``scales_hi``, clamp ±127) inside the same sweep,
their error fed forward like any other column's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.quant.grid import PROTECTED_BITS, qmax_for_bits, quantize_to_grid

# Fallback codes, one per matrix in a batch.
FALLBACK_NONE = 0
FALLBACK_MORE_DAMPING = 1  # Cholesky failed at λ, succeeded at 10·λ
FALLBACK_ROUND_TO_NEAREST = 2  # Cholesky failed at 10·λ too
RETRY_DAMPING_FACTOR = 10.0


@dataclass(frozen=True)
class GPTQOutput:
    """Integers for every (matrix, candidate) pair, in the original column order.

    q: int8 [B, C, R, N]; fallback: int64 [B] with the ``FALLBACK_*`` codes.
    """

    q: torch.Tensor
    fallback: torch.Tensor


def damp_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-column fix then ``λ·mean(diag H)`` on the diagonal (float64 copy).

    h: [..., N, N] raw second moment. Returns (damped H [..., N, N] float64,
    dead mask [..., N] bool).
    """
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * diag.mean(dim=-1, keepdim=True))
    return h, dead


def upper_cholesky_of_inverse(h_damped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper ``U`` with ``Uᵀ U = H⁻¹`` for each matrix of a batch, and an ok mask.

    h_damped: [B, N, N] float64. Returns (U [B, N, N] float64, ok [B] bool);
    entries of U where ok is False are garbage and must not be used.
    """
    lower, info = torch.linalg.cholesky_ex(h_damped)
    ok = info == 0
    h_inv = torch.cholesky_inverse(lower)
    upper, info_inv = torch.linalg.cholesky_ex(h_inv, upper=True)
    ok &= info_inv == 0
    ok &= torch.isfinite(upper).flatten(1).all(dim=1)
    return upper, ok


def act_order_permutation(h_damped: torch.Tensor) -> torch.Tensor:
    """Column order by descending diag H (stable, so ties keep index order). [B, N] int64."""
    diag = torch.diagonal(h_damped, dim1=-2, dim2=-1)
    return torch.argsort(diag, dim=-1, descending=True, stable=True)


def _permute_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x: [B, ..., N]; perm: [B, N] → x[b, ..., perm[b]]."""
    shape = (perm.shape[0],) + (1,) * (x.dim() - 2) + (perm.shape[1],)
    return torch.gather(x, -1, perm.reshape(shape).expand_as(x))


def _permute_square(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """h: [B, N, N] → h[b][perm[b]][:, perm[b]]."""
    rows = torch.gather(h, 1, perm.unsqueeze(-1).expand_as(h))
    return torch.gather(rows, 2, perm.unsqueeze(1).expand_as(h))


def gptq_sweep(w: torch.Tensor, upper: torch.Tensor, scales: torch.Tensor, bits: int,
               block_size: int, protect: torch.Tensor | None = None,
               scales_hi: torch.Tensor | None = None) -> torch.Tensor:
    """The blocked GPTQ column sweep on already-prepared inputs.

    w: [B, R, N] (dead columns zeroed, columns permuted); upper: [B, N, N];
    scales: [B, C, R]. All in the compute dtype. ``protect`` [B, N] bool (same
    column order) marks columns rounded with ``scales_hi`` [B, C, R] at ±127.
    Returns q int8 [B, C, R, N] in the same (permuted) column order.
    """
    qmax = qmax_for_bits(bits)
    if protect is not None:
        s_hi = scales_hi.unsqueeze(-1)
        hi_max = float(qmax_for_bits(PROTECTED_BITS))
    n_cols = w.shape[-1]
    work = w.unsqueeze(1).expand(-1, scales.shape[1], -1, -1).clone()  # [B, C, R, N]
    s = scales.unsqueeze(-1)  # [B, C, R, 1]
    q_out = torch.empty(work.shape, dtype=torch.int8, device=w.device)
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        block = work[..., start:end]  # a view: updates land in `work`
        u_block = upper[:, start:end, start:end]  # [B, k, k]
        errors = torch.empty_like(block)
        for j in range(end - start):
            col = block[..., j:j + 1]  # [B, C, R, 1]
            if protect is None:
                q = torch.round(col / s).clamp_(-qmax, qmax)
                err = (col - q * s) / u_block[:, j, j].reshape(-1, 1, 1, 1)
            else:
                hi = protect[:, start + j].reshape(-1, 1, 1, 1)
                s_j = torch.where(hi, s_hi, s)
                limit = torch.where(hi, hi_max, float(qmax)).to(col.dtype)
                q = torch.minimum(torch.maximum(torch.round(col / s_j), -limit), limit)
                err = (col - q * s_j) / u_block[:, j, j].reshape(-1, 1, 1, 1)
            block[..., j + 1:] -= err * u_block[:, j, j + 1:].unsqueeze(1).unsqueeze(1)
            q_out[..., start + j:start + j + 1] = q.to(torch.int8)
            errors[..., j:j + 1] = err
        if end < n_cols:
            work[..., end:] -= errors @ upper[:, start:end, end:].unsqueeze(1)
    return q_out


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, bits: int, *,
                  damp: float, block_size: int, act_order: bool,
                  dtype: torch.dtype = torch.float32, protect: torch.Tensor | None = None,
                  scales_hi: torch.Tensor | None = None) -> GPTQOutput:
    """GPTQ for a batch of matrices and clip candidates (see module docstring).

    w: [B, R, N] weights; h: [B, N, N] raw (undamped) Hessians; scales:
    [B, C, R] per-row scales of each clip candidate (already on the fp16 grid,
    see ``pgolf.quant.grid.row_scales``). ``protect`` [B, N] bool (original
    column order) and ``scales_hi`` [B, C, R]: AWQ-lite's int8 columns, or
    None. ``dtype`` is the sweep's precision; the Cholesky work is always float64.
    """
    if w.dim() != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"shape mismatch: w {tuple(w.shape)}, h {tuple(h.shape)}")
    if scales.dim() != 3 or scales.shape[0] != w.shape[0] or scales.shape[2] != w.shape[1]:
        raise ValueError(f"shape mismatch: scales {tuple(scales.shape)} for w {tuple(w.shape)}")
    if damp < 0 or block_size < 1:
        raise ValueError(f"need damp >= 0 and block_size >= 1, got {damp}, {block_size}")
    with torch.no_grad():
        h_damped, dead = damp_hessian(h, damp)
        # Uniform damping never changes the diagonal's order, so the retry
        # below reuses this permutation.
        perm = act_order_permutation(h_damped) if act_order else None

        def factor(h_d: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if perm is not None:
                h_d = _permute_square(h_d, perm if rows is None else perm[rows])
            return upper_cholesky_of_inverse(h_d)

        upper, ok = factor(h_damped, None)
        fallback = torch.full((w.shape[0],), FALLBACK_NONE, dtype=torch.int64, device=w.device)
        if not bool(ok.all()):
            retry = ~ok
            h_retry, _ = damp_hessian(h[retry], damp * RETRY_DAMPING_FACTOR)
            upper_retry, ok_retry = factor(h_retry, retry)
            upper[retry] = upper_retry
            fallback[retry] = torch.where(ok_retry, FALLBACK_MORE_DAMPING,
                                          FALLBACK_ROUND_TO_NEAREST).to(fallback.device)
            ok[retry] = ok_retry
        # Give round-to-nearest matrices a harmless identity factor so the
        # batched sweep can run over them; their integers are replaced below.
        upper[~ok] = torch.eye(w.shape[2], dtype=upper.dtype, device=upper.device)

        w_work = w.to(dtype).masked_fill(dead.unsqueeze(1), 0.0)
        sweep_protect = protect
        if perm is not None:
            w_work = _permute_columns(w_work, perm)
            sweep_protect = None if protect is None else torch.gather(protect, 1, perm)
        q = gptq_sweep(w_work, upper.to(dtype), scales.to(dtype), bits, block_size, sweep_protect,
                       None if scales_hi is None else scales_hi.to(dtype))
        if perm is not None:
            q = _permute_columns(q, torch.argsort(perm, dim=-1))
        if not bool(ok.all()):
            bad = ~ok
            q[bad] = quantize_to_grid(w[bad].unsqueeze(1), scales[bad], bits)
            if protect is not None:
                q_hi = quantize_to_grid(w[bad].unsqueeze(1), scales_hi[bad], PROTECTED_BITS)
                q[bad] = torch.where(protect[bad][:, None, None, :], q_hi, q[bad])
    return GPTQOutput(q=q, fallback=fallback)
