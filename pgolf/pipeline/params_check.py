"""Every section of params.yaml built strictly, the one list of which config reads which section.

Used by the params stage (first in dvc.yaml, so a bad key stops ``dvc repro``
before any stage's outputs are removed) and by ``pgolf params`` (a bad
``--set`` never reaches the file). Each section is parsed by the dataclass its
stage builds (pgolf.config.from_params: unknown, missing or mistyped keys and
range checks). Files from outside the pipeline must lie under
``data/challenge/``, the folder the data stages depend on (docs/data.md).
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Mapping

from pgolf.config import from_params
from pgolf.errors import ParamError
from pgolf.pipeline.paths import EXTERNAL_DIR


def section_configs() -> dict[str, type]:
    """Each params section and the config class its stage builds from it (imported on demand:
    the CLI starts without torch)."""
    from pgolf.data.corpus import CorpusConfig
    from pgolf.data.shards import ShardsConfig
    from pgolf.data.tokenizer import TokenizerConfig
    from pgolf.eval.sliding import EvalSlidingConfig
    from pgolf.eval.ttt import EvalTTTConfig
    from pgolf.model.config import ModelConfig
    from pgolf.pipeline.launch import LaunchConfig
    from pgolf.quant.hessians import HessiansConfig
    from pgolf.quant.policy import QuantizeConfig
    from pgolf.submission.budget import BudgetConfig
    from pgolf.submission.driver import BundleConfig
    from pgolf.submission.size import SizeConfig
    from pgolf.train.config import TrainConfig
    from pgolf.train.optim import OptimConfig
    return {"launch": LaunchConfig, "corpus": CorpusConfig, "tokenizer": TokenizerConfig, "shards": ShardsConfig,
            "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "hessians": HessiansConfig,
            "quantize": QuantizeConfig, "size": SizeConfig, "eval_sliding": EvalSlidingConfig,
            "eval_ttt": EvalTTTConfig, "bundle": BundleConfig, "budget": BudgetConfig}


def check_external_input(key: str, value: str) -> None:
    """A file or folder from outside the pipeline must be under data/challenge/, which DVC tracks."""
    path, external = PurePosixPath(value), PurePosixPath(EXTERNAL_DIR.as_posix())
    if path.is_absolute() or ".." in path.parts or external not in path.parents:
        raise ParamError(key, f"{value!r} is not under {external}/, the folder the data stages depend "
                              "on; put (or link) it there (docs/data.md)")


def check_params(p: Mapping) -> list[str]:
    """Build every section strictly; ParamError names the first bad key. Returns the section names."""
    configs = section_configs()
    unknown = sorted(set(p) - set(configs))
    if unknown:
        raise ParamError(unknown[0], f"unknown section (known: {', '.join(sorted(configs))})")
    built = {name: from_params(cls, p, name) for name, cls in configs.items()}
    if built["shards"].source == "challenge":
        check_external_input("shards.challenge_dir", built["shards"].challenge_dir)
    if built["tokenizer"].source == "file":
        check_external_input("tokenizer.model_path", built["tokenizer"].model_path)
    return sorted(configs)
