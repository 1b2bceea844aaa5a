"""Newton–Schulz and the Muon update path, against float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from pgolf.train.muon import ShardedBank, apply_muon_update, muon_direction, newton_schulz5, shape_scale
from pgolf.train.optim import PgolfOptimizer

from tests.helpers.optim_model import tiny_config


def conditioned(rows: int, cols: int, cond: float, seed: int) -> torch.Tensor:
    """float64 matrix with singular values spread evenly over [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(rows, cols, generator=g, dtype=torch.float64), full_matrices=False)
    s = torch.linspace(1.0, 1.0 / cond, min(rows, cols), dtype=torch.float64)
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("rows,cols", [(32, 32), (24, 64), (64, 24)])
def test_newton_schulz_is_near_the_polar_factor(rows, cols):
    g = conditioned(rows, cols, cond=10.0, seed=rows + cols)
    out = newton_schulz5(g).double()
    # The quintic overshoots by design: singular values land in about [0.68, 1.14]
    # (measured), not at 1. Tolerance: [0.6, 1.3].
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.3, (sv.min(), sv.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.97, cosine  # measured ≈ 0.985


def test_newton_schulz_of_zero_is_zero_and_scale_free():
    assert torch.count_nonzero(newton_schulz5(torch.zeros(2, 8, 4))) == 0
    g = conditioned(16, 24, cond=5.0, seed=1).float()
    # Frobenius normalisation: a positive scale of the input does not change the output
    # (up to bf16 rounding of the scaled input; 1024 is a power of two, so exactly).
    torch.testing.assert_close(newton_schulz5(g * 1024.0), newton_schulz5(g), atol=0, rtol=0)


def test_batched_equals_per_matrix_and_transposes():
    g = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(3))
    batched = newton_schulz5(g)
    single = torch.stack([newton_schulz5(m) for m in g])
    # Same bf16 kernels per matrix; measured bitwise equal on CPU. Tolerance: 1 bf16 ulp at 0.5.
    torch.testing.assert_close(batched.float(), single.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(newton_schulz5(g.mT).float(), batched.mT.float(), atol=2e-3, rtol=0)
    assert newton_schulz5(g[None]).shape == (1, 5, 12, 20)


def test_shape_scale():
    assert shape_scale(1536, 512) == pytest.approx(math.sqrt(3))
    assert shape_scale(512, 1536) == 1.0
    assert shape_scale(512, 512) == 1.0


def reference_muon_run(w0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], momenta: list[float],
                       wd: float, ns_steps: int) -> torch.Tensor:
    """The formula of docs/RECIPE.md §3.1, spelled out in float64 (NS is the function under test)."""
    w = w0.double().clone()
    buf = torch.zeros_like(w)
    rows, cols = w.shape[-2:]
    for g, lr, mu in zip(grads, lrs, momenta):
        g = g.double()
        buf = mu * buf + g
        u = g + mu * buf
        o = newton_schulz5(u.float(), ns_steps).double()
        w = w * (1 - lr * wd) - lr * math.sqrt(max(1.0, rows / cols)) * o
    return w


@pytest.mark.parametrize("shape", [(1, 24, 8), (3, 8, 16)])
def test_optimizer_bank_step_matches_float64_reference(shape):
    gen = torch.Generator().manual_seed(11)
    bank = torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.1)
    w0 = bank.detach().clone()
    cfg = tiny_config(muon_momentum_warmup_steps=2, muon_wd=0.1, grad_clip_norm=0.0)
    opt = PgolfOptimizer([("bank", bank)], {"bank": "bank"}, cfg)
    grads = [torch.randn(*shape, generator=gen) for _ in range(4)]
    scales = [1.0, 1.0, 0.5, 0.25]
    for step, (g, scale) in enumerate(zip(grads, scales)):
        bank.grad = g.clone()
        stats = opt.step(scale, step)
        assert stats["lr_muon"] == pytest.approx(cfg.muon_lr * scale)
    momenta = [0.85, 0.90, 0.95, 0.95]  # warm-up 0.85 → 0.95 over 2 steps
    lrs = [cfg.muon_lr * s for s in scales]
    expected = torch.stack([reference_muon_run(w0[i], [g[i] for g in grads], lrs, momenta, cfg.muon_wd, 5)
                            for i in range(shape[0])])
    # fp32 parameters vs a float64 recurrence fed the same NS: measured max |diff| ≈ 3e-8.
    torch.testing.assert_close(bank.detach().double(), expected, atol=1e-6, rtol=0)


def test_pure_update_functions_compose_like_the_formula():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 8, generator=gen)
    g = torch.randn(16, 8, generator=gen)
    buf = torch.randn(16, 8, generator=gen)
    buf_before = buf.clone()
    direction = muon_direction(g, buf, 0.9, 5)
    torch.testing.assert_close(buf, 0.9 * buf_before + g)
    torch.testing.assert_close(direction, newton_schulz5(g + 0.9 * buf))
    w_before = w.clone()
    apply_muon_update(w, direction, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(w, w_before * 0.95 - 0.1 * math.sqrt(2) * direction.float())


def test_sharded_bank_single_rank_is_the_whole_bank():
    p = torch.nn.Parameter(torch.randn(3, 4, 6))
    bank = ShardedBank("b", p, rank=0, world_size=1)
    assert (bank.per_rank, bank.padded_n) == (3, 3)
    full = torch.randn(3, 4, 6)
    bank.load_full_momentum(full)
    torch.testing.assert_close(bank.full_momentum(), full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'b' momentum has shape"):
        bank.load_full_momentum(torch.zeros(2, 4, 6))


def test_sharded_bank_padding_layout():
    # 3 matrices over 2 ranks → padded to 4, 2 per rank; rank 1 holds matrix 2 and one zero pad.
    p = torch.nn.Parameter(torch.zeros(3, 2, 2))
    full = torch.arange(12.0).reshape(3, 2, 2)
    shards = []
    for rank in range(2):
        bank = ShardedBank("b", p, rank=rank, world_size=2)
        bank.load_full_momentum(full)
        shards.append(bank.momentum)
    torch.testing.assert_close(shards[0], full[:2])
    torch.testing.assert_close(shards[1][0], full[2])
    assert torch.count_nonzero(shards[1][1]) == 0
    with pytest.raises(ValueError, match="must be 3-D"):
        ShardedBank("flat", torch.nn.Parameter(torch.zeros(4, 4)), 0, 1)
