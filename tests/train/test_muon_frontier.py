"""Frontier Muon (docs/FRONTIER.md §3.2): Polar Express, MuonEq-R and their optimizer switches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.train.muon import (NS_COEFFS, POLAR_EXPRESS_COEFFS, muon_direction, newton_schulz5, orthogonalize,
                              polar_express, row_normalize)
from pgolf.train.optim import OptimConfig, PgolfOptimizer


def reference_polynomial_iteration(g: np.ndarray, coeffs) -> np.ndarray:
    """The defining iteration, written out in float64 numpy: X ← aX + b(XXᵀ)X + c(XXᵀ)²X."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in coeffs:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (16, 16)])
def test_polar_express_matches_its_polynomial_iteration_in_float64(shape):
    g = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = polar_express(g, dtype=torch.float64)
    for i in range(3):
        want = reference_polynomial_iteration(g[i].numpy(), POLAR_EXPRESS_COEFFS)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=0, atol=1e-12)


def test_polar_express_uses_five_distinct_tuples_and_differs_from_ns5():
    assert len(POLAR_EXPRESS_COEFFS) == 5 and len(set(POLAR_EXPRESS_COEFFS)) == 5
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    g = torch.randn(16, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert not torch.allclose(polar_express(g, torch.float64), newton_schulz5(g, 5, torch.float64))


def test_ns5_still_matches_its_fixed_quintic():
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = reference_polynomial_iteration(g.numpy(), (NS_COEFFS,) * 5)
    np.testing.assert_allclose(newton_schulz5(g, 5, torch.float64).numpy(), want, rtol=0, atol=1e-12)


def test_polar_express_singular_values_end_near_one():
    # Ill-conditioned input: singular values spread over 2 decades.
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    s = torch.logspace(-2, 0, 64, dtype=torch.float64)
    sv = torch.linalg.svdvals(polar_express(u @ torch.diag(s) @ v.T, torch.float64))
    assert sv.min() > 0.8 and sv.max() < 1.2, (sv.min(), sv.max())
    sv_ns = torch.linalg.svdvals(newton_schulz5(u @ torch.diag(s) @ v.T, 5, torch.float64))
    assert sv.min() > sv_ns.min()  # the point of the tuned tuples: small singular values grow faster


def test_row_normalize_gives_unit_rows_and_keeps_zero_rows_zero():
    u = torch.randn(2, 5, 7, dtype=torch.float64)
    u[0, 1] = 0
    out = row_normalize(u)
    norms = out.norm(dim=-1)
    assert torch.all(norms[0, 1] == 0)
    mask = torch.ones_like(norms, dtype=torch.bool)
    mask[0, 1] = False
    # The norm is taken in fp32 (as the records do), hence fp32 tolerances.
    torch.testing.assert_close(norms[mask], torch.ones_like(norms[mask]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], u[1] / u[1].norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)


def test_muon_direction_with_row_norm_orthogonalises_the_normalised_nesterov_direction():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64)
    buf0 = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64)
    buf = buf0.clone()
    got = muon_direction(g, buf, 0.9, 5, "polar_express", row_norm=True).double()
    u = g + 0.9 * (0.9 * buf0 + g)
    want = orthogonalize(u / u.norm(dim=-1, keepdim=True), "polar_express", 5).double()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(buf, 0.9 * buf0 + g, rtol=0, atol=1e-12)


def _cfg(**over) -> OptimConfig:
    values = dict(muon_lr=0.02, muon_momentum=0.95, muon_momentum_warmup_start=0.9, muon_momentum_warmup_steps=0,
                  muon_wd=0.0, ns_steps=5, embed_lr=0.01, scalar_lr=0.01, adam_beta1=0.9, adam_beta2=0.95,
                  adam_eps=1e-8, adam_wd=0.0, grad_clip_norm=0.0, ema_decay=0.9, swa_lr_scale_threshold=0.0,
                  swa_every=1, swa_on_cpu=False)
    values.update(over)
    return OptimConfig(**values)


def test_optimizer_switch_applies_polar_express_with_row_norm():
    bank = torch.nn.Parameter(torch.randn(2, 8, 16, dtype=torch.float32))
    start = bank.detach().clone()
    bank.grad = torch.randn_like(bank)
    grad = bank.grad.clone()
    opt = PgolfOptimizer([("qo_bank", bank)], {"qo_bank": "bank"},
                         _cfg(muon_orthogonalizer="polar_express", muon_row_norm=True))
    opt.step(1.0, 0)
    u = grad + 0.95 * grad
    want = start - 0.02 * polar_express(row_normalize(u)).float()
    torch.testing.assert_close(bank.detach(), want, rtol=0, atol=1e-7)  # fp32 rounding of the add only


def test_optimizer_embed_wd_defaults_to_adam_wd_and_can_differ():
    emb = torch.nn.Parameter(torch.ones(4, 3))
    sc = torch.nn.Parameter(torch.ones(3))
    roles = {"tok_emb.weight": "embed", "g": "scalar"}
    opt = PgolfOptimizer([("tok_emb.weight", emb), ("g", sc)], roles, _cfg(adam_wd=0.04))
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.04, 0.04]
    opt = PgolfOptimizer([("tok_emb.weight", emb), ("g", sc)], roles, _cfg(adam_wd=0.02, embed_wd=0.085))
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.085, 0.02]


def test_polar_express_requires_five_steps_and_a_known_name():
    from pgolf.errors import ParamError
    with pytest.raises(ParamError, match="ns_steps"):
        _cfg(muon_orthogonalizer="polar_express", ns_steps=4)
    with pytest.raises(ParamError, match="muon_orthogonalizer"):
        _cfg(muon_orthogonalizer="ns7")
