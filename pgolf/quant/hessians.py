"""GPTQ calibration: H = Σ xᵀx of every block linear's input, from the real model.

Forward-pre-hooks on the model's parameter-free ``BankLinear`` modules see the
exact input of each block matmul, so value embeddings, VRL and every other
mixing path are what the trained model computes (docs/RECIPE.md §4.3, §6.7).
Keys and file format: pgolf/quant/hessian_file.py (matrices that read one
input, Q, K and V, share one sum). Under CUDA bf16 autocast the sums are of
the bf16 operands the matmuls really use. Sums are kept in float64 and saved
as float32, raw: no averaging, no damping (the solver damps exactly once).
With depth recurrence on (it is during calibration, docs/FRONTIER.md §4.2), a
reused layer's hooks fire once per visit, so its sum covers every visit.
Optionally (``head``) the final norm's output, the input of the tied output
projection, gets a sum too, and (``activation_rms``) each key's per-channel
RMS ``sqrt(diag H / rows)`` is returned for AWQ-lite.

Calibration sequences come from one of two sources:

- ``train``: consecutive sequences from the start of the *train* shards;
  :func:`train_calibration_batches` refuses any file not named like a train
  shard, so validation data cannot be used (docs/RECIPE.md §6.10);
- ``autoregressive``: sequences sampled from the model itself with a KV cache
  (:func:`pgolf.model.sampling.autoregressive_batches`),
  in fixed global batches each seeded from ``(seed, batch index)``, so the
  samples do not depend on how many ranks share the work.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Literal, Sequence, Sized

import torch
from torch import nn

from pgolf.config import check, to_dict
from pgolf.data.loader import TokenStream
from pgolf.data.shards import list_shards
from pgolf.distributed import DistContext, all_reduce_sum_, shard_range
from pgolf.errors import DataError
from pgolf.model.checkpoint import Checkpoint, build_model, load_checkpoint
from pgolf.model.layout import (BLOCK_MATRICES, BlockMatrix, block_index, block_module, first_reader, hessian_key,
                                shares_input)
from pgolf.precision import autocast, synchronize
from pgolf.progress import Progress
from pgolf.quant.hessian_file import HEAD_HESSIAN_KEY, HessianSet, hessian_key_for_module

_TRAIN_SHARD = re.compile(r"^(fineweb_)?train_\d+\.bin$")  # pgolf's name, or the challenge's


@dataclass(frozen=True)
class HessiansConfig:
    """Section ``hessians`` of params.yaml."""

    source: Literal["train", "autoregressive"]
    seq_len: int  # tokens per calibration sequence
    train_batches: int  # source=train: number of batches
    train_batch_seqs: int  # source=train: sequences per batch (all ranks together)
    ar_num_seqs: int  # source=autoregressive: sequences to sample
    ar_batch_seqs: int  # source=autoregressive: sequences sampled together
    ar_temperature: float
    seed: int  # source=autoregressive: sampling seed
    # Defaults only serve direct construction; params.yaml names every key.
    head: bool = False  # also H of the output projection's input (the tied embedding's GPTQ, docs/FRONTIER.md §4.2)
    activation_rms: bool = False  # also each input channel's RMS (AWQ-lite, docs/FRONTIER.md §4.5)
    forward_seqs: int = 0  # sequences per forward pass (0: a whole batch); only the peak memory changes

    def __post_init__(self) -> None:
        check(self.seq_len >= 1, "seq_len", "must be >= 1")
        check(self.train_batches >= 1, "train_batches", "must be >= 1")
        check(self.train_batch_seqs >= 1, "train_batch_seqs", "must be >= 1")
        check(self.ar_num_seqs >= 1, "ar_num_seqs", "must be >= 1")
        check(self.ar_batch_seqs >= 1, "ar_batch_seqs", "must be >= 1")
        check(self.ar_temperature > 0, "ar_temperature", "must be > 0")
        check(self.forward_seqs >= 0, "forward_seqs", "must be >= 0 (0: a whole batch per forward)")


def matmul_operand(x: torch.Tensor) -> torch.Tensor:
    """What ``F.linear`` really multiplies: under CUDA autocast, x in the autocast dtype.

    (An fp32 input reaches the hook when it comes from a norm or a ``pow``,
    which autocast keeps in fp32; the linear then casts it.)
    """
    if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        return x.to(torch.get_autocast_dtype("cuda"))
    return x


def batch_second_moment(flat: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of one batch [n, d] as float64 [d, d].

    16-bit CUDA inputs (bf16 autocast) take one GEMM with fp32 output: every
    product of two 16-bit floats is exact in fp32, so only the in-GEMM fp32
    summation rounds, at tensor-core speed (13x a float64 GEMM at 98,304 x
    1536 on an H200). Other inputs use float64.
    """
    if flat.is_cuda and flat.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(flat.T, flat, out_dtype=torch.float32).to(torch.float64)
    wide = flat.to(torch.float64)
    return wide.T @ wide


class HessianCollector:
    """Context manager: while open, every forward of ``model`` adds to the sums.

    Q's hook accumulates the shared attention input; K's and V's hooks only
    check that they really receive the same tensor, so a model change that
    breaks the sharing fails loudly instead of producing a wrong Hessian.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._shared_input: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, module_name: str, layer: int, matrix: BlockMatrix) -> Callable:
        key = hessian_key(layer, matrix)
        first = first_reader(matrix)
        shared_reader = first is not matrix  # checks its input is the first reader's, adds nothing
        keeps_input = shares_input(matrix) and not shared_reader

        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if shared_reader:
                seen = self._shared_input.get(key)
                if seen is None or (seen is not x and not torch.equal(seen, x)):
                    raise RuntimeError(f"{module_name} got a different input than its {first.module}; "
                                       f"the shared {key} Hessian would be wrong")
                return
            if keeps_input:
                self._shared_input[key] = x
            self.add(key, x)
        return hook

    def add(self, key: str, x: torch.Tensor) -> None:
        """Add the rows of ``x`` [..., d] (as the matmul will see them) to the sum under ``key``."""
        flat = matmul_operand(x.detach()).reshape(-1, x.shape[-1])
        if key not in self.sums:
            self.sums[key] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
            self.rows[key] = 0
        self.sums[key] += batch_second_moment(flat)
        self.rows[key] += flat.shape[0]

    def __enter__(self) -> "HessianCollector":
        for name, module in self.model.named_modules():
            found = block_module(name)
            if found is not None:
                self._handles.append(module.register_forward_pre_hook(self._hook(name, *found)))
        if not self._handles:
            raise ValueError("model has no blocks.{i}.attn/mlp hook modules to calibrate")
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shared_input.clear()


def check_train_shards(paths: Sequence[str | Path]) -> list[Path]:
    """The paths, if every one is named like a train shard; DataError otherwise."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("hessians: no train shards given for calibration")
    for path in paths:
        if not _TRAIN_SHARD.match(path.name):
            raise DataError(f"{path}: not a train shard (train_NNNNNN.bin): calibration reads train data only")
    return paths


def train_calibration_batches(paths: Sequence[str | Path], vocab_size: int, cfg: HessiansConfig,
                              rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """This rank's share of ``train_batches`` batches of consecutive train sequences.

    Batch b holds sequences ``[b·S, (b+1)·S)`` of the train stream (S =
    ``train_batch_seqs``, each ``seq_len`` tokens); rank r takes its
    contiguous share of every batch. Yields int64 [n, seq_len].
    """
    stream = TokenStream(check_train_shards(paths), vocab_size)
    needed = cfg.train_batches * cfg.train_batch_seqs * cfg.seq_len
    if needed > stream.total:
        raise DataError(f"{paths[0]}: calibration needs {needed} train tokens "
                        f"({cfg.train_batches} x {cfg.train_batch_seqs} x {cfg.seq_len}), "
                        f"the train shards hold {stream.total}")
    lo, hi = shard_range(cfg.train_batch_seqs, rank, world_size)
    for b in range(cfg.train_batches):
        if hi > lo:
            first = b * cfg.train_batch_seqs + lo
            tokens = stream.tokens(first * cfg.seq_len, (hi - lo) * cfg.seq_len)
            yield torch.from_numpy(tokens).view(hi - lo, cfg.seq_len)


def collect_hessians(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                     autocast: Callable[[], ContextManager], progress: Progress | None = None,
                     head: bool = False, activation_rms: bool = False, forward_seqs: int = 0) -> HessianSet:
    """Run ``model.forward_logits`` over ``batches`` with hooks; sum over ranks.

    ``head``: run ``model.final_hidden`` instead (the logits feed no Hessian) and
    also sum its output, the output projection's input, under HEAD_HESSIAN_KEY.
    ``activation_rms``: also return ``sqrt(diag H / rows)`` per key, rows being
    every row that went into the sum (each visit of a reused layer counts).
    ``forward_seqs`` > 0 splits each batch into forwards of that many sequences
    (the sums are the same up to float64 rounding; eager document-masked
    attention materialises a batch's whole score matrix, 48 GiB for F1855's
    384 × 2048-token batches). Every rank must call this (the sums are
    all-reduced) even with no batches.
    """
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # tokens, sequences
    if progress is not None:
        progress.start("calibration", len(batches) if isinstance(batches, Sized) else None, "batches")
    with HessianCollector(model) as collector, torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            for part in ids.split(forward_seqs) if forward_seqs else (ids,):
                with autocast():
                    if head:
                        collector.add(HEAD_HESSIAN_KEY, model.final_hidden(part))
                    else:
                        model.forward_logits(part)
            counts += torch.tensor([ids.numel(), ids.shape[0]], dtype=torch.float64, device=device)
            if progress is not None:
                progress.advance(1, ids.numel())
    keys = sorted({key for name, _ in model.named_modules()
                   if (key := hessian_key_for_module(name)) is not None} | ({HEAD_HESSIAN_KEY} if head else set()))
    hessians, sums = {}, {}
    for key in keys:
        h = collector.sums.get(key)
        if h is None:  # this rank saw no data; still join the reduction
            width = model.cfg.model_dim if key == HEAD_HESSIAN_KEY else _input_width(model, key)
            h = torch.zeros(width, width, dtype=torch.float64, device=device)
        sums[key] = all_reduce_sum_(h)
        hessians[key] = sums[key].float().cpu()
    all_reduce_sum_(counts)
    act_rms = {}
    if activation_rms:
        rows = all_reduce_sum_(torch.tensor([float(collector.rows.get(k, 0)) for k in keys],
                                            dtype=torch.float64, device=device))
        act_rms = {k: (torch.diagonal(sums[k]) / max(float(n), 1.0)).sqrt().float().cpu()
                   for k, n in zip(keys, rows.tolist())}
    # Under depth recurrence a reused layer's hooks fire once per visit and its
    # Hessian sums all visits (docs/FRONTIER.md §4.2); per visit every hook saw the same rows.
    visits = _visits_per_layer(model)
    per_visit = {collector.rows[key] / visits.get(block_index(key), 1) for key in collector.rows}
    if len(per_visit) > 1:
        raise RuntimeError(f"hook modules saw different token counts per visit {sorted(per_visit)}")
    return HessianSet(hessians=hessians, num_tokens=int(counts[0]), num_sequences=int(counts[1]),
                      act_rms=act_rms)


def _visits_per_layer(model: nn.Module) -> dict[int, int]:
    """Physical layer → visits per forward (1 each unless the model reuses layers)."""
    if not hasattr(model, "visits"):
        return {}
    order = [i for part in model.visits() for i in part]
    return {i: order.count(i) for i in set(order)}


def _input_width(model: nn.Module, key: str) -> int:
    """Input features of the matrices behind ``key`` (from the model config)."""
    within_block = key.split(".", 2)[2]
    matrix = next(m for m in BLOCK_MATRICES if m.hessian == within_block)
    return getattr(model.cfg, matrix.cols)


@dataclass(frozen=True)
class HessianOutcome:
    """What the hessians stage writes: the sums (complete on every rank) and its metrics."""

    hessians: HessianSet
    metrics: dict


def calibrate(cfg: HessiansConfig, checkpoint: Path, shard_dir: Path, ctx: DistContext,
              log: Progress | None = None) -> HessianOutcome:
    """Hessians of the trained model in ``checkpoint`` from ``cfg.source``'s sequences.

    ``train`` reads only the list of train shards in ``shard_dir``; every rank
    must call this (the sums are all-reduced). Data time counts separately
    from collection time, as training-data calibration counts inside the
    challenge's training budget.
    """
    started = time.perf_counter()
    return calibrate_model(cfg, load_checkpoint(checkpoint), list_shards(shard_dir, "train"), ctx, log, started)


def calibrate_model(cfg: HessiansConfig, ckpt: Checkpoint, train_paths: Sequence[Path], ctx: DistContext,
                    log: Progress | None = None, started: float | None = None) -> HessianOutcome:
    """:func:`calibrate` on a loaded checkpoint and a list of train shards (the submission driver's
    in-memory path); ``started``: when the clock of the ``seconds`` metric started."""
    started = time.perf_counter() if started is None else started
    model = build_model(ckpt, ctx.device).eval()
    if cfg.source == "train":
        batches = list(train_calibration_batches(list(train_paths), ckpt.model_config.vocab_size,
                                                 cfg, ctx.rank, ctx.world_size))
    else:
        from pgolf.model.sampling import autoregressive_batches  # only this source samples
        with autocast(ctx.device):
            batches = list(autoregressive_batches(model, cfg, ctx.rank, ctx.world_size, ctx.device, log))
    synchronize(ctx.device)
    sampled = time.perf_counter()
    hs = collect_hessians(model, batches, ctx.device, lambda: autocast(ctx.device), log, head=cfg.head,
                          activation_rms=cfg.activation_rms, forward_seqs=cfg.forward_seqs)
    synchronize(ctx.device)
    finished = time.perf_counter()
    metrics = {"source": cfg.source, "num_sequences": hs.num_sequences, "num_tokens": hs.num_tokens,
               "num_matrices": len(hs.hessians), "world_size": ctx.world_size, "device": ctx.device.type,
               "seconds": round(finished - started, 3), "seconds_data": round(sampled - started, 3),
               "seconds_collect": round(finished - sampled, 3), "params": to_dict(cfg)}
    return HessianOutcome(hs, metrics)
