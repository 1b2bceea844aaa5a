"""The phases of a submission run that differ from the stages only in where their inputs come from.

The driver (:mod:`pgolf.submission.driver`) runs the stages' own library
calls in one process group: training (pgolf/train/loop.py), calibration
(:func:`pgolf.quant.hessians.calibrate_model`), quantisation
(:func:`pgolf.quant.pipeline.quantize_loaded`) and both evals
(:func:`pgolf.eval.sliding.evaluate_sliding`, :func:`pgolf.eval.ttt.run_ttt`),
so a bundle run and a pipeline run on the same data, params and seeds give
the same bytes and the same scores. What is here: the checkpoint and the
validation stream on the device as the stages would have read them back from
their files (the file round trip is exact: CPU tensors of the same dtype).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.bpb import ByteSource, load_byte_source
from pgolf.distributed import DistContext
from pgolf.eval.sliding import EvalSlidingConfig, prepare_tokens
from pgolf.model.checkpoint import Checkpoint
from pgolf.precision import configure_backends
from pgolf.quant.restore import load_dequantized_model


def checkpoint_in_memory(model_cfg, state_dict: dict[str, torch.Tensor], meta: dict) -> Checkpoint:
    """What save_checkpoint + load_checkpoint give: CPU copies of the weights."""
    return Checkpoint(model_config=model_cfg,
                      state_dict={k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
                      meta=dict(meta))


def val_byte_source(data_dir: Path, tokenizer: Path, vocab_size: int) -> ByteSource:
    """The bytes each target is charged, as the eval stages charge them (pgolf.eval.inputs): the val byte
    sidecar when the challenge's data has one (CaseOps: ``fineweb_val_bytes_*.bin``), else the tokenizer's tables."""
    return load_byte_source(data_dir, tokenizer, vocab_size, challenge_names=True)


def eval_inputs(artifact: Path, val: np.ndarray, windows: EvalSlidingConfig, ctx: DistContext,
                source: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """(dequantised artifact, validation stream on the device): what pgolf.eval.inputs reads from files."""
    configure_backends(ctx.device)
    model = load_dequantized_model(artifact, ctx.device)
    return model, prepare_tokens(val, windows.seq_len, windows.trim_to_seq_len, ctx.device, source)
