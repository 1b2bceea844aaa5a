"""Whether the Triton kernels of ``model.fused_mlp`` / ``model.fused_loss`` can run on a tensor.

Triton is optional: it ships with CUDA builds of torch but not with the CPU
wheel this project tests on. ``triton`` and ``tl`` are None without it, and
the fused ops then run their plain torch formulas. ``INTERPRET_ON_CPU`` lets
the tests run the kernels on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch has no Triton
    triton = None
    tl = None

INTERPRET_ON_CPU = False  # tests only: run the Triton kernels on CPU tensors (interpreter mode)


def available(t: torch.Tensor) -> bool:
    """True when the Triton kernels should run on ``t``'s device."""
    if triton is None:
        return False
    return t.device.type == "cuda" or (INTERPRET_ON_CPU and t.device.type == "cpu")
