"""Stage params: params.yaml → artifacts/params/validated.json, every key checked before any other stage runs.

DVC removes a stage's outputs before running its command, so a bad value
found by the train stage itself would cost train's last good results. This
stage runs first (every other stage depends on its output) and depends on
the whole of params.yaml, so any edit, an added key too (``train.max_step``,
``dvc exp run -S +train.max_step=100``), runs it: every section is built
strictly (pgolf.config.from_params: unknown, missing or mistyped keys and
range checks), and a bad one stops ``dvc repro`` with one ``error:`` line
before any other stage is touched.

The output names the sections checked, never their values: it changes only
when a section is added or removed, so a valid edit re-runs just the stages
that list the edited key. External inputs must lie under data/challenge/,
the folder the data stages depend on (docs/data.md).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Mapping

from pgolf.config import from_params
from pgolf.data.corpus import CorpusConfig
from pgolf.data.shards import ShardsConfig
from pgolf.data.tokenizer import TokenizerConfig
from pgolf.errors import ParamError
from pgolf.eval.sliding import SlidingConfig
from pgolf.eval.ttt import TTTConfig
from pgolf.io import write_json_atomic
from pgolf.model.config import ModelConfig
from pgolf.quant.hessians import HessianConfig
from pgolf.quant.policy import QuantizeConfig
from pgolf.submission.size import SizeConfig
from pgolf.train.config import TrainConfig
from pgolf.train.optim import OptimConfig
from stages.common import check_launch, params, stage_main

# Each section of params.yaml and the config that reads it (launch: stages.common.check_launch).
SECTIONS = {"corpus": CorpusConfig, "tokenizer": TokenizerConfig, "shards": ShardsConfig,
            "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig,
            "eval_sliding": SlidingConfig, "eval_ttt": TTTConfig, "hessians": HessianConfig,
            "quantize": QuantizeConfig, "size": SizeConfig}
EXTERNAL_DIR = PurePosixPath("data/challenge")  # a dependency of the tokenizer and shards stages
OUT = Path("artifacts/params/validated.json")


def check_external_input(key: str, value: str) -> None:
    """A file or folder from outside the pipeline must be under data/challenge/, which DVC tracks."""
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or EXTERNAL_DIR not in path.parents:
        raise ParamError(key, f"{value!r} is not under {EXTERNAL_DIR}/, the folder the data stages depend "
                              "on; put (or link) it there (docs/data.md)")


def check_params(p: Mapping) -> list[str]:
    """Build every section strictly; ParamError names the first bad key. Returns the section names."""
    known = ["launch", *SECTIONS]
    unknown = sorted(set(p) - set(known))
    if unknown:
        raise ParamError(unknown[0], f"unknown section (known: {', '.join(sorted(known))})")
    check_launch(p)
    built = {name: from_params(cls, p, name) for name, cls in SECTIONS.items()}
    if built["shards"].source == "challenge":
        check_external_input("shards.challenge_dir", built["shards"].challenge_dir)
    if built["tokenizer"].source == "file":
        check_external_input("tokenizer.model_path", built["tokenizer"].model_path)
    return known


def run(p: Mapping, root: Path = Path(".")) -> dict:
    """Check ``p`` and write the record of what was checked under ``root``."""
    record = {"checked": "params.yaml", "sections": sorted(check_params(p))}
    write_json_atomic(root / OUT, record)
    return record


@stage_main
def main() -> None:
    p = params()
    run(p)
    print(f"params: params.yaml is valid ({sum(len(v) for v in p.values() if isinstance(v, dict))} keys "
          f"in {len(p)} sections)")


if __name__ == "__main__":
    main()
