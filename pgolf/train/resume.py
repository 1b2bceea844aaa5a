"""Resumable training state: one file, written atomically, that survives ``kill -9``.

Every ``resume_every`` steps rank 0 writes everything the loop needs to
continue exactly where it was: weights, optimizer state, EMA and SWA state,
the loader position, RNG states, the step, the elapsed training time, the QAT
switch and the curve rows logged so far. On CPU with fixed seeds a resumed run
ends bit-identical to an uninterrupted one. The last step is saved too, so
the post-training choice of weights can be redone without retraining.
Optimizer state is stored gathered (whole banks), but the world size is part
of the hash, so a state resumes only at the world size that wrote it.

A state is only resumed when its ``config_hash``
(:func:`pgolf.train.config.config_hash`) matches the current run: the
resolved model/optim/train configs (minus the logging and resume-state
intervals and the final-weights choice, which do not change training), the
world size and the train shards' names and sizes.
A state of another config is ignored (and overwritten at the next write).

After a successful finish the file is replaced by a small *finished* marker
(no tensors). Keeping a file there, rather than deleting it, lets DVC track it
as a ``persist: true`` output; the marker tells the next run to start fresh.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pgolf.errors import DataError, PgolfError
from pgolf.io import save_tensor_file

FORMAT = "pgolf-train-resume"
VERSION = 1


@dataclass
class ResumeState:
    """Everything one training step depends on, in plain tensors and primitives."""
    config_hash: str
    step: int
    elapsed_s: float
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, Any]
    swa: dict[str, Any]
    loader: dict[str, int]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    qat_from_step: int | None
    curve_rows: list[dict[str, float]]

    def to_payload(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "finished": False, **self.__dict__}


def capture_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore_rng(rng_cpu: torch.Tensor, rng_cuda: torch.Tensor | None, device: torch.device) -> None:
    torch.set_rng_state(rng_cpu)
    if device.type == "cuda" and rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda, device)


def save_resume_state(path: Path, state: ResumeState) -> None:
    save_tensor_file(path, state.to_payload())


def save_trainer_state(t: Any, path: Path, run_hash: str, curve_rows: list[dict[str, float]]) -> None:
    """Write the resume state of ``t`` (a :class:`pgolf.train.loop.Trainer`) on rank 0; every rank joins
    the optimizer's gather."""
    optimizer_state = t.optimizer.state_dict()
    p = t.progress
    p.last_resume_step = p.step
    if not t.ctx.is_main:
        return
    rng_cpu, rng_cuda = capture_rng(t.ctx.device)
    save_resume_state(path, ResumeState(
        config_hash=run_hash, step=p.step, elapsed_s=p.elapsed_s,
        model={k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()},
        optimizer=optimizer_state, ema=t.ema.state_dict(), swa=t.swa.state_dict(),
        loader=t.loader.state_dict(), rng_cpu=rng_cpu, rng_cuda=rng_cuda,
        qat_from_step=p.qat_from_step, curve_rows=list(curve_rows)))


def restore_trainer(t: Any, state: ResumeState) -> None:
    """Put ``t`` (a :class:`pgolf.train.loop.Trainer`) where ``state`` was written: weights, optimizer,
    averages, loader position, RNG, step, clock and the QAT switch."""
    with torch.no_grad():
        t.model.load_state_dict(state.model)
    t.optimizer.load_state_dict(state.optimizer)
    t.ema.load_state_dict(state.ema)
    t.swa.load_state_dict(state.swa)
    t.loader.load_state_dict(state.loader)
    restore_rng(state.rng_cpu, state.rng_cuda, t.ctx.device)
    p = t.progress
    p.step, p.elapsed_s, p.qat_from_step = state.step, state.elapsed_s, state.qat_from_step
    p.resumed_from_step = p.last_resume_step = state.step
    if p.qat_from_step is not None:
        t.model.set_qat(True, t.grid.by_class())


def mark_finished(path: Path, config_hash_value: str, step: int) -> None:
    """Replace the state with a tensor-free marker: this config's run completed."""
    save_tensor_file(path, {"format": FORMAT, "version": VERSION, "finished": True,
                            "config_hash": config_hash_value, "step": step})


def remove_stale_temporaries(path: Path) -> None:
    """Delete temp files a killed writer left next to ``path`` (see pgolf.io.atomic_path)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def load_resume_state(path: Path, expected_hash: str) -> tuple[ResumeState | None, str]:
    """(state, why): the state to resume, or None and the reason for starting fresh."""
    if not path.is_file():
        return None, "no resume state"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or damaged file
        raise DataError(f"{path}: not a readable resume state ({type(exc).__name__}); "
                        "delete it to start training from scratch") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{path}: not a pgolf resume state; delete it to start training from scratch")
    if payload.get("version") != VERSION:
        return None, f"resume state version {payload.get('version')} != {VERSION}"
    if payload["config_hash"] != expected_hash:
        return None, "resume state belongs to another config"
    if payload["finished"]:
        return None, f"the run with this config already finished at step {payload['step']}"
    fields = {k: payload[k] for k in ResumeState.__dataclass_fields__}
    return ResumeState(**fields), f"resuming from step {payload['step']}"


@contextlib.contextmanager
def exclusive_run(path: Path) -> Iterator[None]:
    """Hold an exclusive lock next to the resume state for the whole run.

    Two runs sharing one resume file would overwrite each other's states; this
    happens for real when a launcher is killed with SIGKILL and its worker
    keeps training as an orphan. The lock (``flock``) dies with its process.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PgolfError(f"{path}: another training run (pid {holder}) is using this resume state; "
                             "stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
