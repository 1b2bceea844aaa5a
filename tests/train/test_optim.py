"""The composite optimizer: roles, AdamW groups, clipping of the averaged gradient, state, 2 ranks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgolf.config import from_params, load_params
from pgolf.errors import DataError, ParamError
from pgolf.train.optim import OptimConfig, PgolfOptimizer

from tests.helpers.gloo import run_torchrun
from tests.helpers.optim_model import ROLES, TinyBankedModel, batch, tiny_config

REPO = Path(__file__).resolve().parents[2]


def set_grads(model: torch.nn.Module, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = {n: torch.randn(p.shape, generator=g) * scale for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    return grads


def test_params_yaml_section_builds_and_bad_values_name_the_key():
    params = load_params(REPO / "params.yaml")
    cfg = from_params(OptimConfig, params, "optim")
    assert cfg.ns_steps == 5 and cfg.grad_clip_norm > 0
    bad = {"optim": {**params["optim"], "adam_beta2": 1.0}}
    with pytest.raises(ParamError, match=r"optim\.adam_beta2"):
        from_params(OptimConfig, bad, "optim")
    bad = {"optim": {**params["optim"], "muon_lr": -0.1}}
    with pytest.raises(ParamError, match=r"optim\.muon_lr"):
        from_params(OptimConfig, bad, "optim")


def test_roles_must_cover_exactly_the_trainable_parameters():
    model = TinyBankedModel()
    with pytest.raises(ValueError, match="'gains' has no optimizer role"):
        PgolfOptimizer(model.named_parameters(), {k: v for k, v in ROLES.items() if k != "gains"}, tiny_config())
    with pytest.raises(ValueError, match="unknown role 'muon'"):
        PgolfOptimizer(model.named_parameters(), {**ROLES, "gains": "muon"}, tiny_config())
    with pytest.raises(ValueError, match="does not train"):
        PgolfOptimizer(model.named_parameters(), {**ROLES, "ghost": "scalar"}, tiny_config())


def test_adamw_groups_match_torch_adamw_with_scaled_lrs():
    cfg = tiny_config(grad_clip_norm=0.0)
    model, ref = TinyBankedModel(), TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, cfg)
    dense = {"embed": ["tok_emb"], "scalar": ["gains", "head"]}
    ref_params = dict(ref.named_parameters())
    ref_opts = {role: torch.optim.AdamW([ref_params[n] for n in names], lr=1.0, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                        eps=cfg.adam_eps, weight_decay=cfg.adam_wd)
                for role, names in dense.items()}
    base = {"embed": cfg.embed_lr, "scalar": cfg.scalar_lr}
    for step, scale in enumerate([1.0, 0.7, 0.2]):
        grads = set_grads(model, seed=step)
        for n, p in ref_params.items():
            p.grad = grads[n].clone()
        stats = opt.step(scale, step)
        for role, ref_opt in ref_opts.items():
            ref_opt.param_groups[0]["lr"] = base[role] * scale
            ref_opt.step()
        assert stats["lr_embed"] == pytest.approx(cfg.embed_lr * scale)
        assert stats["lr_scalar"] == pytest.approx(cfg.scalar_lr * scale)
    for names in dense.values():
        for n in names:
            torch.testing.assert_close(dict(model.named_parameters())[n], ref_params[n], atol=1e-7, rtol=0)


@pytest.mark.parametrize("grad_scale", [1.0, 1e-3])
def test_clip_scales_every_gradient_by_the_global_norm(grad_scale):
    cfg = tiny_config(grad_clip_norm=0.5)
    model = TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, cfg)
    grads = set_grads(model, seed=3, scale=grad_scale)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    stats = opt.step(1.0, 0)
    coef = min(1.0, 0.5 / (norm + 1e-6))
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert stats["clip_coef"] == pytest.approx(coef, rel=1e-6)
    assert (coef < 1.0) == (grad_scale == 1.0)  # one clipped case, one untouched case
    state = opt.state_dict()
    # After one step the Muon momentum is the (clipped) gradient and AdamW's first moment is (1 − β1)·g.
    torch.testing.assert_close(state["muon_momentum"]["up_bank"], grads["up_bank"] * coef, atol=1e-7, rtol=1e-6)
    exp_avg = state["adamw"]["state"][0]["exp_avg"]  # tok_emb: first param of the embed group
    torch.testing.assert_close(exp_avg, (1 - cfg.adam_beta1) * grads["tok_emb"] * coef, atol=1e-8, rtol=1e-6)


def test_lr_scale_zero_changes_no_parameter():
    model = TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, tiny_config())
    set_grads(model, seed=0)
    opt.step(1.0, 0)  # non-trivial momentum and Adam moments first
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_grads(model, seed=1)
    stats = opt.step(0.0, 1)
    assert stats["lr_muon"] == stats["lr_embed"] == stats["lr_scalar"] == 0.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], atol=0, rtol=0)
    with pytest.raises(ValueError, match="lr_scale"):
        opt.step(float("nan"), 2)


def test_momentum_warmup_is_applied_by_step():
    cfg = tiny_config(muon_momentum_warmup_start=0.8, muon_momentum=0.9, muon_momentum_warmup_steps=4)
    model = TinyBankedModel()
    opt = PgolfOptimizer(model.named_parameters(), ROLES, cfg)
    used = []
    for step in (0, 2, 4, 9):
        set_grads(model, seed=step)
        used.append(opt.step(1.0, step)["muon_momentum"])
    assert used == pytest.approx([0.8, 0.85, 0.9, 0.9])


def test_state_dict_round_trip_continues_bit_identically():
    cfg = tiny_config()
    ids, targets = batch(0)

    def run(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            model(ids, targets).backward()
            opt.step(1.0, step)

    straight = TinyBankedModel()
    straight_opt = PgolfOptimizer(straight.named_parameters(), ROLES, cfg)
    run(straight, straight_opt, range(4))

    first = TinyBankedModel()
    first_opt = PgolfOptimizer(first.named_parameters(), ROLES, cfg)
    run(first, first_opt, range(2))
    state = first_opt.state_dict()
    resumed = TinyBankedModel()
    resumed.load_state_dict(first.state_dict())
    resumed_opt = PgolfOptimizer(resumed.named_parameters(), ROLES, cfg)
    resumed_opt.load_state_dict(state)
    run(first, first_opt, range(2, 4))  # must not disturb the saved state
    run(resumed, resumed_opt, range(2, 4))
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)

    with pytest.raises(DataError, match="Muon banks"):
        resumed_opt.load_state_dict({**state, "muon_momentum": {"up_bank": state["muon_momentum"]["up_bank"]}})
    wrong = {**state["muon_momentum"], "up_bank": torch.zeros(2, 2, 2)}
    with pytest.raises(DataError, match="up_bank"):
        resumed_opt.load_state_dict({**state, "muon_momentum": wrong})


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path):
    out = tmp_path / "dist_optim.pt"
    run_torchrun(REPO / "tests" / "pipeline" / "dist_optim_worker.py", str(out), timeout=120)
    result = torch.load(out, weights_only=True)

    # Identical averaged gradients reach identical bf16 NS inputs, so the runs
    # agree to fp32 rounding; measured: bitwise equal. Tolerance 1e-6.
    for name, single in result["single_params"].items():
        torch.testing.assert_close(result["dist_params"][name], single, atol=1e-6, rtol=0, msg=name)
        # A resume at world size 1 from the 2-rank state continues the same run.
        torch.testing.assert_close(result["resumed_single_params"][name], single, atol=1e-6, rtol=0, msg=name)
    for name, single in result["single_momentum"].items():
        torch.testing.assert_close(result["dist_momentum"][name], single, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(result["dist_grad_norms"], result["single_grad_norms"], atol=0, rtol=1e-12)
    assert (result["single_grad_norms"] > 0.3).any()  # the 0.3 clip was active on some steps

    clip = result["clip"]
    # Rank grads small ± big: each rank's own norm is ~38 (≫ clip 1.0), the average (= small) is ~0.38.
    # Clipping the average leaves it untouched; a per-rank clip would shrink it ~40-fold.
    assert clip["grad_norm"] < 1.0 and clip["clip_coef"] == 1.0
    torch.testing.assert_close(clip["up_momentum"], clip["small_up"], atol=1e-6, rtol=0)
    torch.testing.assert_close(clip["tok_exp_avg"], 0.1 * clip["small_tok"], atol=1e-7, rtol=0)
