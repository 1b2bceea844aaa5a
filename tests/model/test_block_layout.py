"""pgolf/model/layout.py: the one block-matrix table agrees with the model it describes."""
from __future__ import annotations

import torch

from pgolf.model.attention import BankLinear
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, param_roles, rebank_state_dict, unbank_state_dict
from pgolf.model.layout import (BANK_CLASS, BANK_NAMES, BLOCK_CLASSES, BLOCK_MATRICES, ROLES, bank_layout,
                                block_index, block_module, block_weight, first_reader, hessian_key)
from pgolf.quant.grid import dequantize_grid, quantize_to_grid, row_scales
from pgolf.tools.profiles import compose


def tiny_config(**overrides) -> ModelConfig:
    """The cpu profile's model, shrunk."""
    model = {**compose("cpu")["model"], "vocab_size": 64, "num_layers": 3, "model_dim": 32, "num_heads": 4,
             "num_kv_heads": 2, "mlp_mult": 2.0, "xsa_layers": [1, 2], "ve_layers": [2], "ve_dim": 8,
             "bigram_buckets": 16, "bigram_dim": 8, "rope_dims": 4, **overrides}
    return ModelConfig.from_dict(model)


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised O/down banks too
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_table_names_exactly_the_models_block_linears():
    cfg = tiny_config()
    model = GPT(cfg)
    hooked = {name for name, m in model.named_modules() if isinstance(m, BankLinear)}
    assert hooked == {f"blocks.{i}.{m.module}" for i in range(cfg.num_layers) for m in BLOCK_MATRICES}
    assert all(block_module(name) is not None for name in hooked)
    assert block_module("blocks.0.attn") is None and block_module("blocks.0.attn.c_q.extra") is None
    assert block_weight("blocks.2.mlp.proj.weight")[0] == 2 and block_weight("blocks.2.mlp.proj") is None


def test_bank_slices_have_the_tables_shapes_and_cover_each_bank_once():
    cfg = tiny_config()
    model = random_model(cfg)
    layout = bank_layout(cfg.num_layers)
    for name, (bank, index) in layout.items():
        _, matrix = block_weight(name)
        assert tuple(model.get_parameter(bank)[index].shape) == (getattr(cfg, matrix.rows), getattr(cfg, matrix.cols))
    for bank in BANK_NAMES:
        used = sorted(index for b, index in layout.values() if b == bank)
        assert used == list(range(model.get_parameter(bank).shape[0])), bank
    flat = unbank_state_dict(model.state_dict(), cfg)
    back = rebank_state_dict(flat, cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_classes_hessian_keys_and_roles():
    assert set(BANK_CLASS) == set(BANK_NAMES) and set(BANK_CLASS.values()) == set(BLOCK_CLASSES)
    keys = {hessian_key(0, m) for m in BLOCK_MATRICES}
    assert keys == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"}
    shared = [m.module for m in BLOCK_MATRICES if first_reader(m) is not m]
    assert shared == ["attn.c_k", "attn.c_v"]
    roles = param_roles(GPT(tiny_config()))
    assert set(roles.values()) == set(ROLES)
    assert {n for n, r in roles.items() if r == "bank"} == set(BANK_NAMES)
    assert block_index("blocks.11.attn.c_q") == 11 and block_index("x.blocks.3") == 3
    assert block_index("skip_weights") is None and block_index("myblocks.1.x") is None


def test_late_qat_puts_each_bank_on_its_classes_grid():
    """{"attn": 6, "mlp": 3}: Q/K/V/O banks on the 6-bit grid, MLP banks on the 3-bit one."""
    cfg = tiny_config()
    model = random_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    ids, tgt = torch.randint(64, (2, 8), generator=g), torch.randint(64, (2, 8), generator=g)
    bits = {"attn": 6, "mlp": 3}
    model.set_qat(True, bits)
    qat = model(ids, tgt)
    reference = random_model(cfg).train()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for bank in BANK_NAMES:
            w, b = reference.get_parameter(bank), bits[BANK_CLASS[bank]]
            s = row_scales(w, b)
            w.copy_(dequantize_grid(quantize_to_grid(w, s, b), s))
    torch.testing.assert_close(qat, reference(ids, tgt), rtol=0, atol=1e-5)
    model.set_qat(True, 6)
    same_grid = model(ids, tgt)
    assert (same_grid - qat).abs() > 1e-4  # the MLP grid made a difference
