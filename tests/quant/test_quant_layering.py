"""Where the quantisation facts live: import closures, the shared grid setting, the split fit."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pgolf.errors import ParamError
from pgolf.quant.bit_allocation import (MAX_ROUNDS, DemotionPlan, FitOptions, Option, greedy_demote,
                                        order_demotions, search_prefix)
from pgolf.quant.grid import GridBits, grid_bits_from_params
from pgolf.quant.policy import QuantizeConfig
from pgolf.submission.size import counted_code_files
from pgolf.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DATA_PATH = ("pgolf/data/loader.py", "pgolf/data/shards.py")


def closure(*entry_points: str) -> set[str]:
    return set(counted_code_files(REPO, list(entry_points)))


def dvc_stage(name: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]


# ------------------------------------------------------------------ layering
def test_the_quantize_stage_does_not_import_the_data_path():
    """A loader edit must not re-run quantize (nor size_check and the evals behind it)."""
    quantize = closure("stages/quantize.py")
    assert "pgolf/quant/hessian_file.py" in quantize  # control: the Hessian format is read
    assert "pgolf/quant/hessians.py" not in quantize
    assert not quantize & set(DATA_PATH)
    assert "pgolf/data/loader.py" in closure("stages/hessians.py")  # control: the collector does read it
    assert "pgolf/data/loader.py" not in dvc_stage("quantize")["deps"]


def test_the_artifact_format_knows_nothing_of_the_model():
    assert not {f for f in closure("pgolf/quant/artifact.py") if f.startswith("pgolf/model/")}
    assert "pgolf/model/gpt.py" in closure("pgolf/quant/restore.py")  # control


def test_every_block_matrix_name_comes_from_the_layout_table():
    """No module but the table spells out the block matrices' module names."""
    spelled = []
    for path in sorted((REPO / "pgolf").rglob("*.py")) + sorted((REPO / "stages").glob("*.py")):
        code = path.read_text(encoding="utf-8")
        body = code.split('"""', 2)[-1] if code.startswith('"""') else code  # docstrings may name them
        if any(f'"{name}"' in body or f"({name}|" in body for name in ("attn.c_q", "c_q", "mlp.fc", "fc")):
            spelled.append(str(path.relative_to(REPO)))
    assert spelled == ["pgolf/model/layout.py"]


# ------------------------------------------------------- one grid setting
def test_late_qat_reads_the_quantize_grid_keys():
    assert "qat_bits" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"quantize.attn_bits", "quantize.mlp_bits"} <= set(dvc_stage("train")["params"])
    assert not {p for p in dvc_stage("train")["params"] if p.startswith("quantize.")} - {
        "quantize.attn_bits", "quantize.mlp_bits"}
    project = yaml.safe_load((REPO / "params.yaml").read_text())
    grid = grid_bits_from_params(project)
    assert grid == from_quantize(project).grid_bits
    assert grid.by_class() == {"attn": project["quantize"]["attn_bits"], "mlp": project["quantize"]["mlp_bits"]}


def from_quantize(project: dict) -> QuantizeConfig:
    from pgolf.config import from_params
    return from_params(QuantizeConfig, project, "quantize")


@pytest.mark.parametrize("section,key", [({"attn_bits": 9, "mlp_bits": 6}, "quantize.attn_bits"),
                                         ({"attn_bits": 6, "mlp_bits": 1}, "quantize.mlp_bits"),
                                         ({"attn_bits": 6}, "quantize.mlp_bits"),
                                         ({"attn_bits": 6.0, "mlp_bits": 6}, "quantize.attn_bits")])
def test_bad_grid_bits_name_the_quantize_key(section, key):
    with pytest.raises(ParamError) as err:
        grid_bits_from_params({"quantize": {**section, "damp": "not read"}})
    assert err.value.key == key


def test_grid_bits_need_the_quantize_section():
    with pytest.raises(ParamError) as err:
        grid_bits_from_params({"train": {}})
    assert err.value.key == "quantize"
    assert GridBits(5, 6).by_class() == {"attn": 5, "mlp": 6}


# ------------------------------------------------------ fit_to_limit, split
def synthetic_options() -> FitOptions:
    """Three matrices, three levels each; bytes fall and errors rise with each level."""
    tables = {f"m{i}": [Option(6 - lvl, 1000.0 - lvl * (100 + 30 * i), float(lvl * lvl * (i + 1)))
                        for lvl in range(3)] for i in range(3)}
    return FitOptions(choices={}, tables=tables, fixed_bytes=500.0)


def test_order_demotions_estimates_every_prefix_and_matches_the_greedy():
    options = synthetic_options()
    plan = order_demotions(options)
    assert len(plan.order) == 6 and plan.levels_at(6) == {"m0": 2, "m1": 2, "m2": 2}
    for k in range(7):
        levels = plan.levels_at(k)
        total = options.fixed_bytes + sum(options.tables[n][levels[n]].est_bytes for n in levels)
        assert plan.est_at[k] == pytest.approx(total)
        assert greedy_demote(options.tables, {n: 0 for n in options.tables}, total - options.fixed_bytes) == levels


@pytest.mark.parametrize("overhead", [1.0, 1.02, 0.97])
@pytest.mark.parametrize("target_step", range(1, 7))  # step 0 fits: fit_to_limit stops before
def test_search_prefix_finds_the_shortest_prefix_that_fits(overhead, target_step):
    plan = order_demotions(synthetic_options())
    real = [round(e * overhead) + 7 for e in plan.est_at]  # the "encoder": a skewed estimate
    target = real[target_step]
    encoded: list[int] = []
    search = search_prefix(plan, real[0], target, lambda k: encoded.append(k) or real[k], lambda _line: None)
    shortest = next(k for k in range(7) if real[k] <= target)
    assert search.steps == shortest and search.sizes[shortest] <= target
    assert len(encoded) <= MAX_ROUNDS + 1 and len(search.rounds) == len(encoded)
    assert all(search.sizes[k] == real[k] for k in search.sizes)


def test_search_prefix_keeps_everything_demoted_when_nothing_fits():
    plan = order_demotions(synthetic_options())
    lines: list[str] = []
    search = search_prefix(plan, 10_000, 1, lambda k: 10_000 - k, lines.append)
    assert search.steps == len(plan.order) and search.sizes[len(plan.order)] == 10_000 - len(plan.order)
    assert "does not meet the target" in lines[-1]
    assert isinstance(plan, DemotionPlan)
