"""Warmed-up EMA and tight SWA against float64 references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.train.averaging import EMA, SWA, ema_effective_decay
from pgolf.errors import DataError


class Tiny(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 4, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(4, dtype=dtype))


def weight_sequence(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
             "b": torch.randn(4, generator=g, dtype=torch.float64)} for _ in range(n)]


def load(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def test_ema_matches_the_hand_computed_recurrence():
    model = Tiny()
    seq = weight_sequence(40)
    init = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    ref = dict(init)
    for t, weights in enumerate(seq):
        load(model, weights)
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        ref = {n: d * ref[n] + (1 - d) * weights[n].float().double() for n in ref}
    avg = ema.averaged_state()
    for n in ref:
        # fp32 lerp vs float64 recurrence: measured max |diff| ≈ 3e-8. Tolerance 1e-6.
        torch.testing.assert_close(avg[n].double(), ref[n], atol=1e-6, rtol=0)
    assert ema.num_updates == 40


def test_ema_after_one_step_is_not_dominated_by_the_initial_weights():
    model = Tiny()
    ema = EMA(model, decay=0.997)  # the records' decay: unwarmed, 99.7% would stay at init
    load(model, {"w": torch.ones(3, 4), "b": torch.ones(4)})
    ema.update(model)
    assert ema_effective_decay(0.997, 0) == pytest.approx(0.1)
    torch.testing.assert_close(ema.averaged_state()["w"], torch.full((3, 4), 0.9))
    assert ema_effective_decay(0.997, 100_000) == 0.997


def test_ema_copy_to_state_round_trip_and_dtype():
    model = Tiny(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    for weights in weight_sequence(3):
        load(model, weights)
        ema.update(model)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    assert ema.averaged_state()["w"].dtype == torch.bfloat16
    other = EMA(Tiny(torch.bfloat16), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3
    target = Tiny(torch.bfloat16)
    other.copy_to(target)
    torch.testing.assert_close(target.w.detach(), ema.shadow["w"].to(torch.bfloat16), atol=0, rtol=0)
    with pytest.raises(DataError, match="missing"):
        other.load_state_dict({"decay": 0.5, "num_updates": 1, "shadow": {"w": torch.zeros(3, 4)}})


@pytest.mark.parametrize("on_cpu", [False, True])
def test_swa_average_is_the_mean_of_the_snapshots(on_cpu):
    model = Tiny()
    swa = SWA(model, lr_scale_threshold=0.2, every=5, on_cpu=on_cpu)
    seq = weight_sequence(12, seed=1)
    added = []
    for step, weights in enumerate(seq):
        load(model, weights)
        lr_scale = 1.0 - step / len(seq)  # below 0.2 from step 10 on
        if swa.maybe_add(model, lr_scale, step):
            added.append(weights)
    assert swa.count == len(added) == 1  # only step 10 is both late enough and a multiple of 5
    for weights in seq[:4]:
        load(model, weights)
        swa.add(model)
        added.append(weights)
    avg = swa.average()
    for n in ("w", "b"):
        ref = torch.stack([w[n].float().double() for w in added]).mean(0)
        # fp32 running sum of 5 snapshots vs float64 mean. Tolerance 1e-6 (measured ≈ 6e-8).
        torch.testing.assert_close(avg[n].double(), ref, atol=1e-6, rtol=0)
        assert avg[n].dtype == torch.float32


def test_swa_casts_back_and_round_trips():
    model = Tiny(torch.bfloat16)
    swa = SWA(model, lr_scale_threshold=0.2, every=1)
    with pytest.raises(ValueError, match="no snapshots"):
        swa.average()
    for weights in weight_sequence(3, seed=2):
        load(model, weights)
        swa.add(model)
    assert swa.average()["w"].dtype == torch.bfloat16
    other = SWA(Tiny(torch.bfloat16), lr_scale_threshold=0.2, every=1)
    other.load_state_dict(swa.state_dict())
    assert other.count == 3
    torch.testing.assert_close(other.average()["w"], swa.average()["w"], atol=0, rtol=0)
    assert not SWA(model, lr_scale_threshold=0.0, every=1).should_add(0.0, 0)  # threshold 0 = off
