import pytest
import torch

from pgolf.quant.grid import (dequantize_grid, fake_quantize_ste, qmax_for_bits,
                              quantize_to_grid, row_scales)


@pytest.mark.parametrize("bits,qmax", [(2, 1), (5, 15), (6, 31), (7, 63), (8, 127)])
def test_qmax(bits, qmax):
    assert qmax_for_bits(bits) == qmax


def test_bits_out_of_range():
    with pytest.raises(ValueError):
        qmax_for_bits(9)


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_grid_matches_float64_reference(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    s = row_scales(w, bits)
    q = quantize_to_grid(w, s, bits)
    qmax = 2 ** (bits - 1) - 1
    ref_s = (w.double().abs().amax(1) / qmax).half().double()
    assert torch.equal(s.double(), ref_s)
    ref_q = torch.clamp(torch.round(w.double() / ref_s[:, None]), -qmax, qmax)
    assert torch.equal(q.double(), ref_q)
    assert q.abs().max().item() <= qmax
    # Row max sits on (or within fp16 rounding of) the outermost level.
    assert (q.abs().amax(1) >= qmax - 1).all()
    err = (dequantize_grid(q, s) - w).abs()
    assert (err <= s[:, None] * 0.5 + 1e-6).all()


def test_zero_row_is_safe():
    w = torch.zeros(2, 8)
    s = row_scales(w, 6)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(quantize_to_grid(w, s, 6), torch.zeros(2, 8, dtype=torch.int8))


def test_ste_forward_is_dequantised_and_gradient_is_identity():
    torch.manual_seed(1)
    w = torch.randn(3, 4, 32, requires_grad=True)
    out = fake_quantize_ste(w, 6)
    s = row_scales(w, 6)
    expected = dequantize_grid(quantize_to_grid(w.detach(), s, 6), s)
    assert torch.allclose(out.detach(), expected, atol=1e-6)
    assert not torch.equal(out.detach(), w.detach())
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
