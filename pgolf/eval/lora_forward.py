"""The per-chunk forward + loss of per-document LoRA TTT as one function of tensors, padded to few shapes, compiled.

``eval_ttt.compile`` (doc_lora mode, CUDA; pgolf/eval/doc_ttt.py) runs every
chunk through :class:`ChunkForward`, whose one function (adapted forward of
the chunk's windows, log-softmax, target NLL, the masked training loss) is
compiled with ``torch.compile``. A chunk's shapes change from chunk to chunk
(the running documents shrink, the windows widen by the chunk size up to the
eval seq_len L), so the inputs are padded to a few shapes first:

* rows k → ``row_bucket(k)``: with static shapes (``compile_width_step`` >
  0) the batch size (``batch_docs``); with the dynamic graph (step 0) the
  next power of two, at least 2 (dynamo specialises a size of 1), so the
  long tail of a batch (a few long documents still running) does not pay
  for ``batch_docs`` rows. Padding rows hold token 0, score no target and
  take no step. Their loss terms are removed with ``where`` (denominator
  clamped to 1), so the loss does not depend on them and their adapters'
  gradients are exactly zero; :class:`pgolf.eval.lora.RowAdamW` steps only
  the stepping rows anyway. The model is row-independent, so real rows are
  unchanged.
* width w → ``width_bucket(w)``: with ``compile_width_step`` S > 0 the next
  power of two (at least min(S, 64)) while w ≤ S, else the next multiple of
  S, capped at L (one static graph per bucket: 12 for L = 2560, S = 256,
  chunk 48); S = 0 pads to a multiple of 16 and compiles one graph with the
  width and the row count marked dynamic. Right padding with token 0 does
  not change a causal model's outputs at the real positions.

Rounding differs from the unpadded eager path only through the matmul
shapes (tests/eval/test_doc_ttt_padded.py: ≤ 1e-12 in float64). The forward
always runs with grad enabled (a no-grad call would be a second graph per
shape); chunks where no document steps skip only the backward.

The AdamW step of the padded path is :meth:`pgolf.eval.lora.RowAdamW.step_rows`
(a row mask instead of a row count), compiled as one more graph: about a dozen
small kernels per adapter tensor become one.

Compile warm-up (:meth:`ChunkForward.warm_up`) builds every bucket's graph on
token-0 inputs with no valid target (zero loss, zero gradients, a step with
no row), so it reads no validation data and changes no state.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from pgolf.precision import autocast, synchronize

DYNAMIC_MULTIPLE = 16   # compile_width_step 0: widths padded to a multiple of this, one dynamic-width graph


def width_bucket(width: int, seq_len: int, step: int) -> int:
    """The padded width of a chunk's windows (module docstring)."""
    width = int(width)
    if step <= 0:
        return min(-(-width // DYNAMIC_MULTIPLE) * DYNAMIC_MULTIPLE, max(seq_len, width))
    if width <= step:
        bucket = max(1 << (width - 1).bit_length(), min(step, 64))
    else:
        bucket = -(-width // step) * step
    return min(bucket, max(seq_len, width))


def row_bucket(rows: int, batch_rows: int, step: int) -> int:
    """The padded row count of a chunk with ``rows`` running documents (module docstring)."""
    if step > 0:
        return batch_rows
    return min(batch_rows, max(2, 1 << (int(rows) - 1).bit_length()))


def all_buckets(seq_len: int, step: int) -> list[int]:
    """Every padded width a run with windows of ≤ ``seq_len`` can meet (one graph each when static)."""
    return sorted({width_bucket(w, seq_len, step) for w in range(1, seq_len + 1)})


def raise_recompile_limit(graphs: int) -> None:
    """Dynamo's per-function graph limit (default 8) raised to ``graphs``: every bucket × chunk size is one graph."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < graphs:
        setattr(config, name, graphs)


def chunk_loss(model: torch.nn.Module, lora, ids: torch.Tensor, sel: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor, stepping: torch.Tensor, denom: torch.Tensor, with_logp: bool):
    """(NLL [R, C], training loss, log-probs [R, C, V] or None) of one chunk.

    ``ids`` [R, W] windows, ``sel`` [R, C] the scored columns, ``valid`` [R, C]
    real targets, ``stepping`` [R] rows that train on this chunk, ``denom`` [R]
    their target counts (≥ 1). The loss is Σ over stepping rows of the row's
    mean NLL over its valid targets.
    """
    with autocast(ids.device):
        hidden = model.adapted_hidden(ids, lora)
        picked = hidden.gather(1, sel[:, :, None].expand(-1, -1, hidden.shape[-1]))
        logits = model.adapted_logits(picked, lora)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(-1, targets[:, :, None]).squeeze(-1)
    per_doc = torch.where(valid, nll, 0.0).sum(1) / denom.to(nll.dtype)
    loss = torch.where(stepping, per_doc, 0.0).sum()
    return nll, loss, (logp if with_logp else None)


class ChunkForward:
    """``chunk_loss`` on padded inputs, compiled (``backend``) or eager (``backend`` None: the tested path).

    ``graphs`` counts the graphs the backend compiled (every recompile adds one).
    """

    def __init__(self, model: torch.nn.Module, lora, seq_len: int, width_step: int, backend: str | None,
                 opt=None):
        self.model, self.lora, self.seq_len, self.width_step = model, lora, seq_len, width_step
        self.opt = opt   # RowAdamW: its ``step_rows`` compiled beside the forward (one graph)
        self.step: Callable = opt.step_rows if opt is not None else None
        self.local_cfg = model.cfg.replace(doc_attention=False)  # one object: a compiled graph guards on it
        self.graphs = 0
        self.fn: Callable = self._run
        if backend is not None:
            inner = torch._dynamo.lookup_backend(backend)

            def counting(gm, example_inputs):
                self.graphs += 1
                return inner(gm, example_inputs)

            raise_recompile_limit(len(all_buckets(seq_len, width_step)) * 4 if width_step > 0 else 4)
            self.fn = torch.compile(self._run, backend=counting, fullgraph=True,
                                    dynamic=None if width_step <= 0 else False)
            if opt is not None:
                self.step = torch.compile(opt.step_rows, backend=inner, fullgraph=True, dynamic=False)

    def _run(self, ids, sel, targets, valid, stepping, denom, with_logp: bool):
        return chunk_loss(self.model, self.lora, ids, sel, targets, valid, stepping, denom, with_logp)

    def width(self, width: int) -> int:
        return width_bucket(width, self.seq_len, self.width_step)

    def rows(self, rows: int) -> int:
        return row_bucket(rows, self.lora.rows, self.width_step)

    def __call__(self, ids, sel, targets, valid, stepping, denom, with_logp: bool):
        if self.width_step <= 0 and self.fn is not self._run:
            torch._dynamo.maybe_mark_dynamic(ids, 1)   # a specialisation would recompile (counted), not fail
            for t in (ids, sel, targets, valid, stepping, denom):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        saved, self.model.cfg = self.model.cfg, self.local_cfg
        try:
            with torch.enable_grad():
                return self.fn(ids, sel, targets, valid, stepping, denom, with_logp)
        finally:
            self.model.cfg = saved

    def warm_up(self, chunks: list[int], with_logp: bool) -> float:
        """Build the graph of every bucket for every chunk size in ``chunks`` (module docstring); seconds."""
        dev = next(iter(self.lora.a.values())).device
        rows = self.lora.rows   # the largest row bucket: a dynamic graph built on it serves the smaller ones
        synchronize(dev)
        began = time.perf_counter()
        widths = all_buckets(self.seq_len, self.width_step) if self.width_step > 0 else [self.width(self.seq_len)]
        for chunk in sorted(set(chunks)):
            for width in widths:
                ids = torch.zeros(rows, width, dtype=torch.long, device=dev)
                sel = torch.zeros(rows, chunk, dtype=torch.long, device=dev)
                nothing = torch.zeros(rows, chunk, dtype=torch.bool, device=dev)
                _, loss, _ = self(ids, sel, sel.clone(), nothing, torch.ones(rows, dtype=torch.bool, device=dev),
                                  torch.ones(rows, dtype=torch.long, device=dev), with_logp)
                loss.backward()
                if self.step is not None:   # no row steps: weights, moments and step counts stay
                    self.step(torch.zeros(rows, dtype=torch.bool, device=dev))
                for p in self.lora.parameters():
                    p.grad = None
        synchronize(dev)
        return time.perf_counter() - began
