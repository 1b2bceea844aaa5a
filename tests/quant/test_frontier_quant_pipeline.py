"""The frontier quantisation switches end to end on a tiny recurrent, gated GPT: Hessians with head and
activation RMS → quantize_loaded → artifact → restored model, report, metrics and `pgolf inspect`."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pgolf.io import write_json_atomic
from pgolf.model.checkpoint import Checkpoint
from pgolf.model.gpt import GPT
from pgolf.progress import StageLog
from pgolf.quant.artifact import decode
from pgolf.quant.hessians import collect_hessians
from pgolf.quant.pipeline import quantize_loaded
from pgolf.model.gpt import unbank_state_dict
from pgolf.quant.policy import QuantizeConfig, realised_weights
from pgolf.quant.restore import load_dequantized_model
from pgolf.tools.cli import main
from tests.helpers.models import tiny_model

CPU = torch.device("cpu")
CFG = QuantizeConfig(
    method="gptq", damp=0.01, block_size=16, act_order=True, clip_candidates=(0.999, 1.0),
    clip_metric="weight_mse", attn_bits=6, mlp_bits=6, embed_bits=7, embed_clip_quantile=0.9999,
    passthrough_numel=256, compressor="zstd", zstd_level=3, lzma_preset=6, prune=False, prune_margin_bytes=0,
    clip="sdclip", embed_method="gptq", gate_int8=True, awq_top_k=1, awq_group_size=16)


def gated_recurrent_model() -> GPT:
    return tiny_model(0, num_layers=5, xsa_layers=[], ve_layers=[], bigram_buckets=0, bigram_dim=0, recur_start=1,
                      recur_end=2, recur_loops=2, attn_gate_window=8)


def calibrated_model():
    """(model, its calibration ids, Hessians with the head and activation RMS, a checkpoint of it)."""
    model = gated_recurrent_model()
    ids = torch.randint(64, (4, 32), generator=torch.Generator().manual_seed(2))
    hs = collect_hessians(model, [ids[:2], ids[2:]], CPU, lambda: torch.autocast("cpu", enabled=False),
                          head=True, activation_rms=True)
    ckpt = Checkpoint(model_config=model.cfg, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
                      meta={})
    return model, ids, hs, ckpt


def test_frontier_switches_end_to_end(tmp_path, capsys):
    model, ids, hs, ckpt = calibrated_model()
    with StageLog(tmp_path / "q.log", stream=open(tmp_path / "out.txt", "w")) as log:
        out = quantize_loaded(ckpt, hs, CFG, CPU, None, "model.pt", "hessians.pt", log)
    rows = {r["name"]: r for r in out.report}
    assert rows["blocks.0.attn.attn_gate_w"]["class"] == "gate" and rows["blocks.0.attn.attn_gate_w"]["bits"] == 8
    assert rows["tok_emb.weight"]["bits"] == 7 and rows["tok_emb.weight"]["clip"] == CFG.sdclip_k_embed
    assert rows["blocks.0.mlp.fc.weight"]["clip"] == CFG.sdclip_k_mlp
    awq = [r for r in out.report if r.get("awq")]
    assert len(awq) == 1 and awq[0]["awq"]["size"] == 16
    assert out.metrics["awq"][0]["name"] == awq[0]["name"]
    assert out.metrics["classes"]["gate"]["bits"] == [8]
    art = decode(out.blob)
    assert art.meta["quantize"]["clip"] == "sdclip" and art.meta["quantize"]["awq_top_k"] == 1
    path = tmp_path / "model.ptz"
    path.write_bytes(out.blob)
    restored = load_dequantized_model(path, CPU)
    with torch.no_grad():
        ref, got = model.forward_logits(ids), restored.forward_logits(ids)
    # Restore applies the protected columns: the restored weight is the realised one, exactly.
    realised = realised_weights(unbank_state_dict(ckpt.state_dict, model.cfg), art.tensors)
    restored_state = unbank_state_dict(restored.state_dict(), restored.cfg)
    for name, (_, w_hat) in realised.items():
        assert torch.equal(restored_state[name].float().reshape(w_hat.shape), w_hat), name
    # A tiny random model at int6 is far from exact; still, logits stay near (relative mean error < 15 %).
    assert restored.looping and float((ref - got).abs().mean()) < 0.15 * float(ref.abs().mean())
    assert main(["inspect", str(path)]) == 0  # no report beside it yet: the file's own protect block
    assert f"awq: {awq[0]['name']} columns [[" in capsys.readouterr().out
    write_json_atomic(tmp_path / "report.json", out.report)
    assert main(["inspect", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "class gate: " in text and "sdclip [11.5]" in text and f"awq: {awq[0]['name']} columns" in text


def test_frontier_keys_off_leave_the_artifact_meta_as_before():
    model = gated_recurrent_model()
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(3))
    hs = collect_hessians(model, [ids], CPU, lambda: torch.autocast("cpu", enabled=False))
    ckpt = Checkpoint(model_config=model.cfg, state_dict=dict(model.state_dict()), meta={})
    off = dataclasses.replace(CFG, clip="search", embed_method="rtn", gate_int8=False, awq_top_k=0,
                              awq_group_size=64, embed_bits=8)
    with StageLog(None, enabled=False) as log:
        out = quantize_loaded(ckpt, hs, off, CPU, None, "m", "h", log)
    meta = decode(out.blob).meta["quantize"]
    assert not {"clip", "embed_method", "gate_int8", "awq_top_k", "sdclip_k_attn"} & set(meta)
    assert json.dumps(out.metrics["awq"]) == "[]"


@pytest.mark.parametrize("LAYOUT", ["plain", "grouped"])
def test_awq_lqer_and_grouped_layout_together(tmp_path, LAYOUT):
    """docs/FRONTIER.md §4.4, docs/FRONTIER.md §4.5 and docs/FRONTIER.md §4.6 at once: LQER is fitted on the
    realised weight, AWQ-lite's protected columns included, and the grouped file restores both exactly."""
    model, ids, hs, ckpt = calibrated_model()
    cfg = dataclasses.replace(CFG, lqer_top_k=3, lqer_rank=2, lqer_group=16, compression=LAYOUT)
    with StageLog(None, enabled=False) as log:
        out = quantize_loaded(ckpt, hs, cfg, CPU, None, "model.pt", "hessians.pt", log)
    art = decode(out.blob)
    corrected = {t.name: t for t in art.tensors if t.lqer is not None}
    assert len(corrected) == 3 and any(t.protect is not None for t in art.tensors)
    path = tmp_path / "model.ptz"
    path.write_bytes(out.blob)
    restored = unbank_state_dict(load_dequantized_model(path, CPU).state_dict(), model.cfg)
    original = unbank_state_dict(ckpt.state_dict, model.cfg)
    plain = [dataclasses.replace(t, lqer=None) for t in art.tensors]
    for name, (w, w_hat) in realised_weights(original, plain).items():
        got = restored[name].float().reshape(w_hat.shape)
        if name in corrected:  # q·s (protected columns at their own scale) + Â·B̂, and closer to W than q·s alone
            assert torch.allclose(got, w_hat + corrected[name].lqer.dense(), atol=1e-6), name
            assert float((w - got).norm()) < float((w - w_hat).norm()), name
        else:
            assert torch.equal(got, w_hat), name
