"""The quantize stage with LQER and the grouped layout: the fit counts the factors, the report records
every choice, the artifact restores."""
from __future__ import annotations

import json

import pytest
import torch

import stages.hessians
import stages.quantize
from pgolf.quant.artifact import dequantize, read_artifact
from pgolf.quant.restore import load_dequantized_model
from pgolf.submission.size import LIMIT_BYTES, bundle_reserved_bytes
from tests.helpers.models import quant_params as params, write_quant_root


@pytest.mark.slow
def test_stage_with_lqer_and_grouped_fits_the_target_and_reports_its_choices(tmp_path):
    root = write_quant_root(tmp_path)
    stages.hessians.run(params(), root)
    off = stages.quantize.run(params(), root)
    off_bytes = (root / "artifacts/quant/model.ptz").read_bytes()
    on = {"lqer_top_k": 2, "lqer_rank": 2, "lqer_group": 32, "compression": "grouped", "compressor": "lzma"}
    free = stages.quantize.run(params(quantize=on), root)
    report = json.loads((root / "artifacts/quant/report.json").read_text())
    corrected = [r for r in report if "lqer" in r]
    assert len(corrected) == 2 and [r["name"] for r in corrected] == sorted(x["name"] for x in free["lqer"])
    assert all(r["lqer"]["rank"] == 2 and r["lqer"]["group"] == 32 for r in corrected)
    assert all(r["lqer"]["error_fro_lqer"] < r["lqer"]["error_fro"] for r in corrected)
    art = read_artifact(root / "artifacts/quant/model.ptz")
    assert {t.name for t in art.tensors if t.lqer is not None} == {r["name"] for r in corrected}
    assert [f["bytes"] for f in free["frames"]] == [f["bytes"] for f in art.frames]
    assert free["model_bytes"] == len((root / "artifacts/quant/model.ptz").read_bytes())
    assert {r["group"] for r in report if r["bits"] is not None} >= {"tok_emb", "mlp.fc", "attn.c_q"}
    frame_bytes = {f["frame"]: f["bytes"] for f in art.frames}
    assert all(r["group_compressor"] == "lzma" and r["group_frame_bytes"] == frame_bytes[r["group"]] for r in report)
    model = load_dequantized_model(root / "artifacts/quant/model.ptz", "cpu")  # LQER and groups restore
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # A target 200 bytes under the unfitted LQER artifact: the fit demotes, and the file with its
    # factors (fitted again on the realised weights) meets the target.
    code = bundle_reserved_bytes(root)
    margin = LIMIT_BYTES - code - (free["model_bytes"] - 200)
    fitted = stages.quantize.run(params(quantize={**on, "fit_to_limit": True, "prune_margin_bytes": margin}), root)
    blob = (root / "artifacts/quant/model.ptz").read_bytes()
    assert fitted["fit_demoted"] > 0 and fitted["fit_fits"]
    assert len(blob) == fitted["model_bytes"] <= fitted["fit_target_bytes"] == free["model_bytes"] - 200
    art = read_artifact(root / "artifacts/quant/model.ptz")
    assert sum(t.lqer is not None for t in art.tensors) == 2
    assert fitted["lqer_bytes"] > 0 and set(dequantize(art)) == {t.name for t in art.tensors}

    # Off: today's artifact, byte for byte.
    stages.quantize.run(params(quantize={"lqer_top_k": 0, "compression": "plain"}), root)
    assert (root / "artifacts/quant/model.ptz").read_bytes() == off_bytes and "lqer" not in off
