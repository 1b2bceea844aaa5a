"""Numeric mode of a device: bf16 autocast + TF32 + torch.compile on CUDA, plain fp32 on CPU.

CPU runs stay in fp32 and eager so that tests are exact and reproducible
(the kill -9 resume test compares final weights bit for bit); CUDA runs use
the records' settings (docs/RECIPE.md §3.6).
"""
from __future__ import annotations

import contextlib
import resource
from typing import Callable, ContextManager

import torch


def configure_backends(device: torch.device) -> None:
    """Enable TF32 matmuls/convolutions on CUDA (the records' setting)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU trains in fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_enabled(requested: bool, device: torch.device) -> bool:
    """torch.compile only on CUDA: on CPU it costs minutes of compile for tiny models."""
    return requested and device.type == "cuda"


def maybe_compile(fn: Callable, enabled: bool, options: dict[str, object] | None = None) -> Callable:
    """``torch.compile(fn, dynamic=False, fullgraph=True)`` when enabled (docs/RECIPE.md §3.6).

    ``options`` are inductor config overrides for this graph only (e.g.
    ``{"triton.mix_order_reduction": False}``); None or empty keeps inductor's defaults.
    """
    if not enabled:
        return fn
    if options:
        return torch.compile(fn, dynamic=False, fullgraph=True, options=dict(options))
    return torch.compile(fn, dynamic=False, fullgraph=True)


# torch.compile's modes, as the inductor options each one sets (torch._inductor.list_mode_options):
# the options form composes with the per-graph overrides below (torch.compile takes mode or options).
COMPILE_MODES: dict[str, dict[str, object]] = {
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True, "coordinate_descent_tuning": True},
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": True},
}


def training_compile_options(mix_order_reduction: bool, mode: str = "default") -> dict[str, object]:
    """Inductor overrides for the training step (``train.mix_order_reduction``, ``train.compile_mode``).

    Inductor's mixed-order reduction fuses an RMSNorm backward (a reduction
    over each row) with the per-channel parameter gradients (sums over all
    rows) into one kernel. At the record shape one such kernel per step keeps
    eight 512-wide fp32 accumulators per program and runs 20x slower than
    its unfused neighbours (profile in docs/LOG.md), so the record profiles
    switch it off; ``True`` keeps inductor's default. ``mode`` adds the options
    of a torch.compile mode (``COMPILE_MODES``); with CUDA graphs each
    micro-step's forward and backward replay as one graph each (the step's
    shapes are static), the loss read before the next replay.
    """
    return {**COMPILE_MODES[mode], **({} if mix_order_reduction else {"triton.mix_order_reduction": False})}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): peak allocated CUDA memory, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host_max_rss"
