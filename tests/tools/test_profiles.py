"""Profiles compose like DVC's Hydra integration, and params.yaml is the default composition."""
from pathlib import Path

import pytest
import yaml

from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.tools.profiles import CONF_DIR, compose, model_preset

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.stem for p in (CONF_DIR / "profile").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def stage_configs():
    from pgolf.data.corpus import CorpusConfig
    from pgolf.eval.sliding import EvalSlidingConfig
    from pgolf.quant.hessians import HessiansConfig
    from pgolf.model.gpt import ModelConfig
    from pgolf.train.optim import OptimConfig
    from pgolf.quant.policy import QuantizeConfig
    from pgolf.data.shards import ShardsConfig
    from pgolf.submission.size import SizeConfig
    from pgolf.data.tokenizer import TokenizerConfig
    from pgolf.train.config import TrainConfig
    from pgolf.eval.ttt import EvalTTTConfig
    return {"corpus": CorpusConfig, "tokenizer": TokenizerConfig, "shards": ShardsConfig,
            "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "hessians": HessiansConfig,
            "quantize": QuantizeConfig, "size": SizeConfig, "eval_sliding": EvalSlidingConfig, "eval_ttt": EvalTTTConfig}


def test_params_yaml_is_the_default_composition():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose("cpu"), "params.yaml is stale: run `pgolf params --profile cpu`"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_builds_every_stage_config(profile):
    params = compose(profile)
    for section, cls in stage_configs().items():
        from_params(cls, params, section)
    assert set(params) == set(compose("cpu")), "a profile may only override existing sections"


@pytest.mark.parametrize("profile", PROFILES)
def test_our_merge_equals_hydra(profile):
    hydra = pytest.importorskip("hydra")
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=[f"profile={profile}", "train.seed=7"])
    assert OmegaConf.to_container(cfg) == compose(profile, ["train.seed=7"])
    assert hydra is not None


def test_record_profile_values():
    rec = compose("record")
    assert rec["model"]["num_layers"] == 11 and rec["model"]["bigram_buckets"] == 3072
    assert rec["train"]["tokens_per_step"] == 786_432 and rec["train"]["seq_len"] == 2048
    assert rec["launch"]["nproc_per_node"] == "gpu"
    one = compose("gpu1")
    assert one["launch"]["nproc_per_node"] == 1 and one["model"] == rec["model"]


def test_bad_profile_and_override():
    with pytest.raises(ParamError, match="unknown profile 'nope'"):
        compose("nope")
    with pytest.raises(ParamError, match="train.sede: unknown key"):
        compose("cpu", ["train.sede=1"])
    with pytest.raises(ParamError, match="key=value"):
        compose("cpu", ["train.seed"])


def test_record_model_parameter_count():
    import torch

    from pgolf.model.gpt import GPT, ModelConfig
    cfg = from_params(ModelConfig, compose("record"), "model")
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(cfg).parameters())
    assert n == 27_124_838  # 26,928,220 (PR #549) + 196,608 (BigramHash 3072) + 10 VRL gates


def test_record_presets_are_complete_model_sections():
    from pgolf.model.gpt import ModelConfig
    assert PRESETS == ["r1019", "r549", "r960"]
    for name in PRESETS:
        preset = model_preset(name)
        assert list(preset) == list(compose("cpu")["model"]), name  # every key, in params.yaml's order
        ModelConfig.from_dict(preset)
    r549 = model_preset("r549")
    assert model_preset("r960") == {**r549, "bigram_buckets": 3072, "vrl": True}
    assert model_preset("r1019") == {**r549, "xsa_layers": list(range(11)), "bigram_buckets": 3072,
                                     "bigram_dim": 112}


def test_record_profiles_use_the_r960_model():
    for profile in ("record", "gpu1"):
        assert compose(profile)["model"] == model_preset("r960"), profile
    assert compose("record", ["model.num_layers=9"])["model"]["num_layers"] == 9


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ParamError, match="unknown model 'r1'.*r1019, r549, r960"):
        model_preset("r1")
