"""What both eval stages read: the dequantised artifact, the validation stream on the device, its byte source.

Scores are always of the artifact as submitted (never the training weights);
a benchmark scoring other weights reads the same stream and bytes with
:func:`load_eval_data`. Bytes come from the val byte sidecar when the shards
have one (CaseOps), else from the tokenizer's tables (pgolf/data/bpb.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.data.bpb import ByteSource, load_byte_source
from pgolf.data.shards import load_split
from pgolf.errors import DataError
from pgolf.eval.sliding import EvalSlidingConfig, prepare_tokens
from pgolf.pipeline.paths import ARTIFACT, EVAL_SLIDING_DIR, SHARD_DIR, TOKENIZER_MODEL
from pgolf.precision import configure_backends
from pgolf.quant.restore import load_dequantized_model


@dataclass(frozen=True)
class EvalInputs:
    model: torch.nn.Module
    tokens: torch.Tensor  # the validation stream (trimmed as the config asks), int64 on the device
    byte_source: ByteSource  # bytes charged per target: the sidecar, else the tokenizer's tables


def load_eval_data(root: Path, cfg: EvalSlidingConfig, vocab_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, ByteSource]:
    """(validation stream on ``device``, byte source) of the project under ``root``."""
    stream = load_split(root / SHARD_DIR, "val", vocab_size)
    tokens = prepare_tokens(stream, cfg.seq_len, cfg.trim_to_seq_len, device, str(root / SHARD_DIR))
    return tokens, load_byte_source(root / SHARD_DIR, root / TOKENIZER_MODEL, vocab_size)


def load_eval_inputs(root: Path, cfg: EvalSlidingConfig, device: torch.device) -> EvalInputs:
    """The dequantised artifact and its eval data, with the device's numeric mode set."""
    configure_backends(device)
    model = load_dequantized_model(root / ARTIFACT, device)
    tokens, byte_source = load_eval_data(root, cfg, model.cfg.vocab_size, device)
    return EvalInputs(model, tokens, byte_source)


def read_sliding_bpb(root: Path) -> float:
    """eval_sliding's val_bpb, the reference TTT's gain is measured against."""
    path = root / EVAL_SLIDING_DIR / "metrics.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["val_bpb"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read val_bpb ({type(exc).__name__}); run eval_sliding first") from None
