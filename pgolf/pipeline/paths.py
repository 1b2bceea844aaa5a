"""Where each stage's inputs and outputs live, relative to the project root.

The one home of these names: stages, bench scripts and tools join them to a
root folder. dvc.yaml lists the same files as each stage's deps and outs.
"""
from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
PARAMS_RECORD = Path("artifacts/params/validated.json")  # the params stage's output: every key checked
EXTERNAL_DIR = Path("data/challenge")  # files from outside the pipeline (docs/data.md); a DVC dependency
LAUNCH_LOG_DIR = Path("artifacts/logs")  # <stage>.log: stderr of the last launch of a torchrun stage

CORPUS_DIR = Path("data/corpus")  # {train,val}.jsonl
CORPUS_TRAIN = CORPUS_DIR / "train.jsonl"
CORPUS_VAL = CORPUS_DIR / "val.jsonl"
CORPUS_MANIFEST = CORPUS_DIR / "manifest.json"
TOKENIZER_DIR = Path("data/tokenizer")
TOKENIZER_MODEL = TOKENIZER_DIR / "tokenizer.model"
TOKENIZER_META = TOKENIZER_DIR / "meta.json"
SHARD_DIR = Path("data/shards")
SHARDS_MANIFEST = SHARD_DIR / "manifest.json"
DATA_METRICS_DIR = Path("data/metrics")  # <stage>.json of corpus, tokenizer, shards

TRAIN_DIR = Path("artifacts/train")
CHECKPOINT = TRAIN_DIR / "model.pt"  # the trained weights
RESUME_STATE = Path("artifacts/train_resume/state.pt")  # where an interrupted run continues from
HESSIANS_DIR = Path("artifacts/hessians")
HESSIANS = HESSIANS_DIR / "hessians.pt"
QUANT_DIR = Path("artifacts/quant")
ARTIFACT = QUANT_DIR / "model.ptz"  # the quantised, compressed weights that are submitted
BUNDLE_DIR = Path("artifacts/bundle")
BUNDLE = BUNDLE_DIR / "train_gpt.py"  # the submission's one code file: what the challenge counts
BUNDLE_RESERVE = BUNDLE_DIR / "reserved_bytes.json"  # the code bytes quantize's byte target sets aside
BUNDLE_METRICS = BUNDLE_DIR / "metrics.json"
SIZE_JSON = Path("artifacts/size.json")
BUDGET_JSON = Path("artifacts/budget.json")
EVAL_SLIDING_DIR = Path("artifacts/eval_sliding")
EVAL_TTT_DIR = Path("artifacts/eval_ttt")


def data_metrics(stage: str) -> Path:
    """The small metrics JSON of a data stage (corpus, tokenizer, shards)."""
    return DATA_METRICS_DIR / f"{stage}.json"
