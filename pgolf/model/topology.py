"""Residual topology of the frontier GPT: visit order, gated U-Net skips, two-lane decoder.

Depth recurrence (docs/FRONTIER.md §2.3). With ``recur_loops = n > 0`` the
physical layers ``recur_start..recur_end`` (inclusive) are run ``1 + n`` times
in a row: for 11 layers, 3..5 and n = 2 the visit list is
``[0,1,2] + [3,4,5]×3 + [6..10]`` (17 visits). It is plain weight reuse: every
visit of a physical layer uses that layer's bank slices and scalars (and its
1/√(layer+1) input scale). The list is split in half like the plain U-Net:
the first ``len//2`` visits are the encoder (``[0,1,2,3,4,5,3,4]``), the rest
the decoder (``[5,3,4,5,6,7,8,9,10]``). Looping can be switched off (the first
part of training); then the list is ``0..L-1`` and only the first
``min(enc, dec)`` skips are used (the skip tensors are sized for the looped
list from the start).

Skips. Each encoder visit pushes its output; decoder position ``j`` (while the
stack is not empty) pops one and merges it before running its block:

* plain: ``x ← x + w_j ⊙ skip``;
* gated (``skip_gates``, docs/FRONTIER.md §2.2): ``x ← σ(g_j) ⊙ x + (1 − σ(g_j)) ⊙ (w_j ⊙ skip)``,
  ``g`` zero-initialised (a 0.5/0.5 mix at the start).

Parallel two-lane decoder (``parallel_start_layer = p > 0``, docs/FRONTIER.md §2.5). At the
first decoder position whose physical layer is ≥ p, ``lane0 = lane1 = x``;
from there on (that position included) skips merge into lane0 only (the lanes
are created before the merge). A layer i computes both branches from the old
lanes, ``A = attn_scale ⊙ Attn(RMSNorm(m0⊙lane0 + m1⊙x0)·s_i)`` and
``M = mlp_scale ⊙ MLP(RMSNorm(lane1)·s_i)``, then
``lane_k ← r_ik·lane_k + P_i[0][k]·A + P_i[1][k]·M`` with ``r`` =
``parallel_resid_lambdas`` [L, 2] (init 1.1) and ``P`` =
``parallel_post_lambdas`` [L, 2, 2] (init 1). The output is the lane mean.
"""
from __future__ import annotations

import torch

PARALLEL_RESID_INIT = 1.1
PARALLEL_POST_INIT = 1.0


def visit_order(num_layers: int, recur_start: int, recur_end: int, recur_loops: int,
                looping: bool) -> tuple[int, ...]:
    """Physical layer of every virtual layer, in execution order."""
    plain = tuple(range(num_layers))
    if not looping or recur_loops == 0:
        return plain
    segment = plain[recur_start:recur_end + 1]
    return plain[:recur_start] + segment * (recur_loops + 1) + plain[recur_end + 1:]


def split_encoder_decoder(visits: tuple[int, ...], unet: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder visits, decoder visits): the first half (rounded down) and the rest; no encoder without U-Net."""
    n_enc = len(visits) // 2 if unet else 0
    return visits[:n_enc], visits[n_enc:]


def merge_skip(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
               gate: torch.Tensor | None) -> torch.Tensor:
    """One U-Net skip merge (module docstring); ``gate`` None = the plain additive skip."""
    scaled = weight.to(x.dtype) * skip
    if gate is None:
        return x + scaled
    g = torch.sigmoid(gate).to(x.dtype)
    return g * x + (1 - g) * scaled


def parallel_lanes_update(lane0: torch.Tensor, lane1: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor,
                          resid: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's lane update: ``resid`` [2], ``post`` [2, 2] of that layer (module docstring)."""
    r = resid.to(lane0.dtype)
    p = post.to(lane0.dtype)
    new0 = r[0] * lane0 + p[0, 0] * attn + p[1, 0] * mlp
    new1 = r[1] * lane1 + p[0, 1] * attn + p[1, 1] * mlp
    return new0, new1
