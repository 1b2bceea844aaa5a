"""``eval_ttt`` behind one call, for the stage and the submission driver alike.

``eval_ttt.mode`` picks the method: ``chunked`` (pgolf/eval/ttt.py, score-first
SGD on the stream's chunks) or ``doc_lora`` (pgolf/eval/doc_ttt.py, per-document
LoRA TTT with phased global SGD). With ``eval_ttt.ngram_tilt`` both tilt their
scores (never their training loss) by the stream's n-gram hints
(pgolf/eval/ngram_tilt.py), whose one pass is counted in ``seconds``.
"""
from __future__ import annotations

import dataclasses

import torch

from pgolf.data.bpb import ByteSource
from pgolf.eval.ngram_params import build_tilt
from pgolf.eval.sliding import EvalSlidingConfig
from pgolf.eval.ttt import EvalTTTConfig, run_ttt, untrained_reason
from pgolf.progress import Progress


def run_eval_ttt(model: torch.nn.Module, tokens: torch.Tensor, source: ByteSource, windows: EvalSlidingConfig,
                 cfg: EvalTTTConfig, *, rank: int = 0, world_size: int = 1, progress: Progress | None = None,
                 warmup: bool = False):
    """(result, the mode's own metrics, a warning or None); ``score_metrics(result)`` gives the rest."""
    if cfg.mode == "doc_lora":  # an optional module group of the bundle (pgolf/submission/optional.py)
        from pgolf.eval.doc_ttt import doc_ttt_metrics, run_doc_ttt
        tilt = build_tilt(tokens, cfg)
        result = run_doc_ttt(model, tokens, source, windows.seq_len, cfg, rank=rank, world_size=world_size,
                             progress=progress, score_adjust=tilt.score_adjust() if tilt is not None else None)
        if tilt is not None:
            result = dataclasses.replace(result, seconds=result.seconds + tilt.seconds, tilt=tilt)
        extra = doc_ttt_metrics(result)
        return result, {**extra, "chunks": result.windows, "train_steps": extra["lora_steps"],
                        "ttt_trained": extra["lora_steps"] > 0}, None
    result = run_ttt(model, tokens, source, windows, cfg, rank=rank, world_size=world_size, progress=progress,
                     warmup=warmup)
    return result, {"chunks": result.num_chunks, "train_steps": result.train_steps,
                    "ttt_trained": result.train_steps > 0}, untrained_reason(result, cfg, tokens.numel() - 1)
