"""The submission driver charges CaseOps bytes as the eval stages do: from the val byte sidecar
(``fineweb_val_bytes_*.bin`` in the challenge's layout), through the same load_byte_source."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import from_params
from pgolf.data.bpb import SidecarBytes, build_byte_tables
from pgolf.data.shards import challenge_sources, load_sidecar, load_tokens
from pgolf.distributed import init_distributed
from pgolf.errors import DataError
from pgolf.eval.sliding import EvalSlidingConfig, evaluate_sliding
from pgolf.model.gpt import GPT, unbank_state_dict
from pgolf.quant.artifact import StoredTensor, write_artifact
from pgolf.submission import steps
from pgolf.tools.profiles import compose
from tests.helpers import run_data_stages, tiny_data_params, tiny_model_config

TOKENIZER = "data/tokenizers/fineweb_8192_bpe_caseops.model"


@pytest.fixture(scope="module")
def caseops_root(tmp_path_factory) -> Path:
    """The tiny data stages under CaseOps (vocab 512, a val byte sidecar) and a random-init artifact."""
    root = tmp_path_factory.mktemp("caseops")
    run_data_stages(tiny_data_params(tokenizer={"case_transform": "caseops"}), root)
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = GPT(cfg)
    tensors = [StoredTensor(name, tuple(t.shape), "float32", "passthrough", raw=t.detach().float())
               for name, t in sorted(unbank_state_dict(model.state_dict(), cfg).items())]
    write_artifact(root / "artifacts/quant/model.ptz", tensors, cfg.to_dict(), {}, "zstd", 1)
    return root


def challenge_folder(root: Path, folder: Path) -> Path:
    """The pipeline's shards and sidecar under the challenge's names, as bench/bundle_records.py lays them out."""
    folder.mkdir()
    for shard in sorted((root / "data/shards").glob("*_[0-9]*.bin")):
        shutil.copy(shard, folder / f"fineweb_{shard.name}")
    (folder / Path(TOKENIZER).name).write_bytes((root / "data/tokenizer/tokenizer.model").read_bytes())
    return folder


@pytest.mark.slow  # the data stages: seconds
def test_the_drivers_bpb_under_caseops_equals_the_eval_stages(caseops_root, tmp_path):
    import stages.eval_sliding

    p = compose("cpu")
    p["launch"]["device"] = "cpu"
    p["eval_sliding"].update(seq_len=64, stride=32, batch_windows=16, compile=False)
    stage = stages.eval_sliding.run(copy.deepcopy(p), caseops_root)

    folder = challenge_folder(caseops_root, tmp_path / "records")
    tokenizer = folder / Path(TOKENIZER).name
    with pytest.raises(DataError, match="CaseOps"):  # what the driver charged before: refused outright
        build_byte_tables(tokenizer, 512)
    source = steps.val_byte_source(folder, tokenizer, 512)  # the driver's call
    assert isinstance(source, SidecarBytes)
    assert np.array_equal(source.per_token, load_sidecar(caseops_root / "data/shards"))
    cfg = from_params(EvalSlidingConfig, p, "eval_sliding")
    val = load_tokens(challenge_sources(folder, "val"), 512)
    model, tokens = steps.eval_inputs(caseops_root / "artifacts/quant/model.ptz", val, cfg,
                                      init_distributed(0, 1, 0, "cpu"), str(folder))
    driver = evaluate_sliding(model, tokens, source, cfg)
    assert driver["bytes"] == stage["bytes"] > 0
    assert driver["val_bpb"] == stage["val_bpb"] and driver["val_loss"] == stage["val_loss"]
