"""The Triton kernels of model.fused_mlp / model.fused_loss run by Triton's CPU interpreter, in fp32,
against float64 references. Triton is not a dependency of this project: these tests run only in an
environment with Triton and ``TRITON_INTERPRET=1`` (set before Triton is imported), e.g.

    pip install --target .venv-triton triton
    TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/.venv-triton python -m pytest tests/model/test_fused_kernels_triton.py

Tolerances: fp32 kernels (fp32 dot products, different summation order) against fp64, 1e-4 relative
to the largest value."""
from __future__ import annotations

import os

import pytest
import torch

from pgolf.model import triton_support
from pgolf.model.fused_loss import rows_backward_reference, rows_forward_reference
from pgolf.model.fused_mlp import down_grad_act, up_act

pytestmark = pytest.mark.skipif(triton_support.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton with TRITON_INTERPRET=1 (optional interpreter run)")


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    monkeypatch.setattr(triton_support, "INTERPRET_ON_CPU", True)


def close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("m,k,n", [(70, 48, 80), (33, 20, 40), (64, 32, 64)])  # ragged and whole tiles
def test_matmul_activation_kernels_match_float64(m, k, n):
    g = torch.Generator().manual_seed(m)
    x, w_up = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    grad_y, w_down = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    u, h = up_act(x, w_up, 0.5, use_triton=True)
    u_ref, h_ref = up_act(x.double(), w_up.double(), 0.5, use_triton=False)
    close(u, u_ref)
    close(h, h_ref)
    grad_u, h2 = down_grad_act(grad_y, w_down, u_ref.float(), 0.5, use_triton=True)
    grad_u_ref, h2_ref = down_grad_act(grad_y.double(), w_down.double(), u_ref.float().double(), 0.5,
                                       use_triton=False)
    close(grad_u, grad_u_ref)
    close(h2, h2_ref)


@pytest.mark.parametrize("vocab", [1024, 37, 5000])  # one block, a ragged block, two blocks
@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_cross_entropy_row_kernel_matches_float64(vocab, cap):
    from pgolf.model.fused_loss import _rows_triton
    g = torch.Generator().manual_seed(vocab)
    logits = 20 * torch.randn(9, vocab, generator=g)
    targets = torch.randint(0, vocab, (9,), generator=g)
    upstream = torch.rand(9, generator=g)
    nll, lse = _rows_triton(logits, targets, cap)
    nll_ref, lse_ref = rows_forward_reference(logits.double(), targets, cap)
    close(nll, nll_ref)
    close(lse, lse_ref)
    grad = _rows_triton(logits, targets, cap, lse_ref.float(), upstream)
    close(grad, rows_backward_reference(logits.double(), targets, lse_ref, upstream.double(), cap))
