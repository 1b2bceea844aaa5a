"""A tiny frontier model through train → hessians → quantize, and the recurrence switch step."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.helpers.models import QUANT_PARAMS
from tests.helpers import link_data, tiny_train_params

import stages.hessians
import stages.quantize
import stages.train
from pgolf.model.checkpoint import load_checkpoint
from pgolf.quant.restore import load_dequantized_model
from pgolf.train.schedule import recurrence_on

pytestmark = pytest.mark.usefixtures("one_thread")

FRONTIER_MODEL = {"num_layers": 4, "xsa_layers": [0, 1, 2, 3], "ve_layers": [], "ve_dim": 0, "smear_gate": False,
                  "bigram_buckets": 0, "bigram_dim": 0, "vrl": False, "skip_gates": True, "recur_start": 1,
                  "recur_end": 2, "recur_loops": 1, "parallel_start_layer": 3, "attn_gate_window": 4,
                  "input_smear_window": 4, "doc_attention": True, "doc_attention_impl": "dense"}
FRONTIER_OPTIM = {"muon_orthogonalizer": "polar_express", "muon_row_norm": True, "embed_wd": 0.085}
# The shared hessians/quantize sections (every frontier switch off), at this test's sequence length.
QUANT = {"hessians": {**QUANT_PARAMS["hessians"], "seq_len": 32}, "quantize": dict(QUANT_PARAMS["quantize"])}


def test_recurrence_switch_point_by_steps_and_by_clock():
    assert [recurrence_on(s, 12, 0.0, 0.0, 0.25) for s in range(5)] == [False, False, False, True, True]
    assert not recurrence_on(0, 12, 209.9, 600.0, 0.35) and recurrence_on(0, 12, 210.0, 600.0, 0.35)


@pytest.mark.slow  # >0.7 s: kept out of the fast lane (runs in the full suite)
def test_tiny_frontier_model_trains_switches_recurrence_and_quantizes(tmp_path, tiny_data):
    p = tiny_train_params(model=FRONTIER_MODEL, optim=FRONTIER_OPTIM,
                          train={"max_steps": 12, "warmdown_steps": 8, "min_lr_scale": 0.1,
                                 "recur_start_frac": 0.25, "qat_lr_scale_threshold": 0.0})
    p.update(copy.deepcopy(QUANT))
    root = link_data(tmp_path, tiny_data)
    m = stages.train.run(p, root)
    assert m["recur_from_step"] == 3 and m["steps"] == 12
    log = (root / "artifacts/train/train.log").read_text()
    assert "depth recurrence on from step 3 (6 virtual layers)" in log
    ckpt = load_checkpoint(root / "artifacts/train/model.pt")
    assert ckpt.model_config.recur_loops == 1 and ckpt.model_config.doc_attention

    h = stages.hessians.run(p, root)
    assert h["num_matrices"] == 4 * 4  # qkv, proj, fc, mlp.proj per physical layer (reused layers sum visits)
    q = stages.quantize.run(p, root)
    assert q["num_quantized"] > 0 and q["fallback_round_to_nearest"] == 0

    trained = load_checkpoint(root / "artifacts/train/model.pt")
    from pgolf.model.gpt import GPT
    original = GPT(trained.model_config)
    original.load_state_dict(trained.state_dict)
    loaded = load_dequantized_model(root / "artifacts/quant/model.ptz", "cpu")
    assert loaded.looping and loaded.cfg.num_visits == 6
    ids = torch.randint(2, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    ids[:, [0, 13]] = 1
    with torch.no_grad():
        a, b = original.eval().forward_logits(ids), loaded.forward_logits(ids)
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()
