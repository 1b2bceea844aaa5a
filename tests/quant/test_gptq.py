"""GPTQ solver against a slow float64 reference written from the OBS equations.

The reference quantises one column at a time with the explicit inverse
Hessian, eliminating each quantised column from H⁻¹ (no Cholesky, no blocks,
no batching), so it shares no code path with pgolf.quant.gptq beyond the grid.
"""
from __future__ import annotations

import pytest
import torch

from pgolf.quant.gptq import (FALLBACK_MORE_DAMPING, FALLBACK_NONE, FALLBACK_ROUND_TO_NEAREST, damp_hessian,
                        gptq_quantize)
from pgolf.quant.grid import quantize_to_grid, row_scales

F64 = torch.float64


def reference_gptq(w, h, scale, bits, damp, act_order):
    """Integers [R, N] for one matrix: dead columns, damping once, optional act-order, OBS sweep."""
    qmax = 2 ** (bits - 1) - 1
    w, h, s = w.to(F64).clone(), h.to(F64).clone(), scale.to(F64)
    n = w.shape[1]
    for i in range(n):
        if h[i, i] == 0:
            h[i, i] = 1.0
            w[:, i] = 0.0
    mean_diag = sum(h[i, i].item() for i in range(n)) / n
    for i in range(n):
        h[i, i] += damp * mean_diag
    order = sorted(range(n), key=lambda i: -h[i, i].item()) if act_order else list(range(n))
    w, h = w[:, order], h[order][:, order]
    h_inv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(n):
        d = h_inv[j, j]
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), -qmax, qmax)
        err = w[:, j] - q[:, j] * s
        w[:, j + 1:] -= torch.outer(err / d, h_inv[j, j + 1:])
        h_inv = h_inv - torch.outer(h_inv[:, j], h_inv[j, :]) / d
    out = torch.empty_like(q)
    out[:, order] = q
    return out.to(torch.int8)


def correlated_problem(rows, cols, seed, tokens=1500, dead=()):
    """Weights, correlated inputs X and H = XᵀX (float32, like a stored Hessian)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.3 * torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, list(dead)] = 0.0
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x, (x.to(F64).T @ x.to(F64)).float()


def run(w, h, scale, bits, damp=0.01, block_size=16, act_order=True, dtype=F64):
    out = gptq_quantize(w[None], h[None], scale[None, None], bits, damp=damp, block_size=block_size,
                        act_order=act_order, dtype=dtype)
    return out.q[0, 0], int(out.fallback[0])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize("bits", [4, 6])
def test_matches_float64_reference_exactly(act_order, block_size, bits):
    w, _, h = correlated_problem(24, 40, seed=bits * 100 + block_size, dead=(3, 17))
    scale = row_scales(w, bits)
    q, fallback = run(w, h, scale, bits, block_size=block_size, act_order=act_order)
    assert fallback == FALLBACK_NONE
    assert torch.equal(q, reference_gptq(w, h, scale, bits, 0.01, act_order))


def test_float32_sweep_agrees_with_float64_reference():
    # Float32 rounding may flip a value sitting on a rounding boundary, and the
    # flip propagates through the error feedback; allow at most 0.5% of entries.
    w, _, h = correlated_problem(64, 128, seed=7)
    scale = row_scales(w, 6)
    q, _ = run(w, h, scale, 6, block_size=32, dtype=torch.float32)
    ref = reference_gptq(w, h, scale, 6, 0.01, True)
    mismatches = int((q != ref).sum())
    assert mismatches <= 0.005 * q.numel(), mismatches


def test_batched_matrices_and_candidates_match_single_calls():
    probs = [correlated_problem(16, 24, seed=s) for s in (1, 2, 3)]
    w = torch.stack([p[0] for p in probs])
    h = torch.stack([p[2] for p in probs])
    scales = torch.stack([torch.stack([row_scales(wi, 5), row_scales(wi, 5, clip=0.5 * wi.abs().amax(1))])
                          for wi in w])
    out = gptq_quantize(w, h, scales, 5, damp=0.02, block_size=8, act_order=True, dtype=F64)
    for b in range(3):
        for c in range(2):
            assert torch.equal(out.q[b, c], reference_gptq(w[b], h[b], scales[b, c], 5, 0.02, True))


@pytest.mark.parametrize("bits", [4, 6])
def test_output_error_strictly_below_round_to_nearest(bits):
    w, x, h = correlated_problem(32, 48, seed=bits)
    scale = row_scales(w, bits)
    q, _ = run(w, h, scale, bits, dtype=torch.float32)
    rtn = quantize_to_grid(w, scale, bits)

    def output_error(qq):
        return torch.linalg.norm(x.to(F64) @ (w.to(F64) - qq.to(F64) * scale.to(F64)[:, None]).T)

    assert output_error(q) < 0.9 * output_error(rtn)


def test_damping_is_applied_exactly_once():
    w, _, h = correlated_problem(32, 40, seed=11)
    scale = row_scales(w, 4)
    lam = 0.1
    q, _ = run(w, h, scale, 4, damp=lam)
    assert torch.equal(q, reference_gptq(w, h, scale, 4, lam, True))
    # Damping twice is what 2λ (to first order) would give: it must differ.
    assert int((q != reference_gptq(w, h, scale, 4, 2 * lam, True)).sum()) > 0
    damped, dead = damp_hessian(h, lam)
    mean_diag = h.to(F64).diagonal().mean()
    torch.testing.assert_close(damped.diagonal(), h.to(F64).diagonal() + lam * mean_diag, rtol=0, atol=1e-9)
    assert not dead.any()


def test_dead_columns_quantise_to_zero():
    w, _, h = correlated_problem(8, 12, seed=3, dead=(0, 5))
    q, fallback = run(w, h, row_scales(w, 6), 6)
    assert fallback == FALLBACK_NONE
    assert not q[:, [0, 5]].any()


def _with_eigenvalues(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return (basis @ torch.diag(torch.tensor(eigs, dtype=F64)) @ basis.T).float()


def test_cholesky_failure_retries_with_ten_times_damping():
    # One eigenvalue −0.05·mean: +0.01·mean is not enough, +0.1·mean is.
    h = _with_eigenvalues([1.0] * 15 + [-0.05])
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    scale = row_scales(w, 6)
    q, fallback = run(w, h, scale, 6, damp=0.01)
    assert fallback == FALLBACK_MORE_DAMPING
    assert torch.equal(q, reference_gptq(w, h, scale, 6, 0.1, True))


def test_cholesky_failure_falls_back_to_round_to_nearest():
    h = _with_eigenvalues([1.0] * 15 + [-0.5])
    good_w, _, good_h = correlated_problem(6, 16, seed=2)
    w = torch.stack([good_w, good_w])
    scale = row_scales(good_w, 6)
    out = gptq_quantize(w, torch.stack([good_h, h]), torch.stack([scale, scale])[:, None], 6,
                        damp=0.01, block_size=4, act_order=False, dtype=F64)
    assert out.fallback.tolist() == [FALLBACK_NONE, FALLBACK_ROUND_TO_NEAREST]
    assert torch.equal(out.q[0, 0], reference_gptq(good_w, good_h, scale, 6, 0.01, False))
    assert torch.equal(out.q[1, 0], quantize_to_grid(good_w, scale, 6))


def test_block_size_does_not_change_the_float64_result():
    # Blocking only regroups the same updates (lazy batch updates).
    w, _, h = correlated_problem(16, 50, seed=5)
    scale = row_scales(w, 6)
    results = [run(w, h, scale, 6, block_size=bs)[0] for bs in (1, 7, 50, 128)]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        gptq_quantize(torch.zeros(1, 4, 8), torch.zeros(1, 4, 4), torch.ones(1, 1, 4), 6,
                      damp=0.01, block_size=4, act_order=False)


@pytest.mark.gpu
def test_cuda_sweep_matches_the_cpu_reference():
    w, _, h = correlated_problem(64, 128, seed=9, dead=(4,))
    scale = row_scales(w, 6)
    ref = reference_gptq(w, h, scale, 6, 0.01, True)
    cuda = torch.device("cuda")
    for dtype, allowed in ((F64, 0), (torch.float32, int(0.005 * ref.numel()))):
        out = gptq_quantize(w[None].to(cuda), h[None].to(cuda), scale[None, None].to(cuda), 6,
                            damp=0.01, block_size=32, act_order=True, dtype=dtype)
        assert int((out.q[0, 0].cpu() != ref).sum()) <= allowed, dtype
