"""How a stage process starts and ends: params.yaml, the ``launch`` section, torchrun's facts, clean failure.

The only module of pgolf that reads the environment: torchrun's launch facts
are read here and passed to :func:`pgolf.distributed.init_distributed`.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import signal
import sys
import typing
from typing import Callable, Literal, Mapping

from pgolf.config import from_params, load_params
from pgolf.errors import ParamError, PgolfError
from pgolf.pipeline.paths import PARAMS

Device = Literal["auto", "cpu", "cuda"]


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Section ``launch`` of params.yaml: nproc_per_node is read by torchrun (dvc.yaml's cmd), device by the stages."""

    nproc_per_node: int | Literal["gpu"]  # processes per node; "gpu" = one per visible GPU
    device: Device                         # auto = CUDA when present

    def __post_init__(self) -> None:
        check_nproc_per_node(self.nproc_per_node)


def params() -> dict:
    return load_params(PARAMS)


def launch_facts() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def launch_config(p: Mapping) -> LaunchConfig:
    """The whole ``launch`` section, strictly parsed: for the stages torchrun launches with nproc_per_node."""
    return from_params(LaunchConfig, p, "launch")


def launch_device(p: Mapping) -> str:
    """``launch.device`` alone, for a stage run as one process: nproc_per_node is not read (so not a dependency),
    but an unknown key in the section is still an error."""
    section = p.get("launch")
    if not isinstance(section, Mapping):
        raise ParamError("launch", "missing section")
    known = [f.name for f in dataclasses.fields(LaunchConfig)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ParamError(f"launch.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    if "device" not in section:
        raise ParamError("launch.device", "missing key")
    device, allowed = section["device"], list(typing.get_args(Device))
    if device not in allowed:
        raise ParamError("launch.device", f"must be one of {allowed}, got {device!r}")
    return device



def check_nproc_per_node(value: object) -> int | str:
    """``launch.nproc_per_node``: an int >= 1, or ``gpu`` (torchrun: one process per visible GPU).

    ParamError otherwise (torchrun itself would fail with an AssertionError on 0).
    """
    if isinstance(value, str) and value.strip().isdigit():  # as the launcher gets it on its command line
        value = int(value)
    if value == "gpu":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamError("launch.nproc_per_node",
                         f"must be an integer >= 1 or 'gpu' (one process per visible GPU), got {value!r}")
    return value


def check_launch(p: Mapping) -> tuple[int | str, str]:
    """The whole launch section checked: (nproc_per_node, device); ParamError naming the key."""
    cfg = launch_config(p)
    return cfg.nproc_per_node, cfg.device


def die_with_parent(signum: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies (PR_SET_PDEATHSIG).

    Without it, a SIGKILLed ``dvc`` or torchrun leaves its children running as
    orphans (seen here: a worker kept writing the resume state beside the
    re-run). ``parent``: the pid expected as parent; if it already died before
    the call (the process was re-parented), exit at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def die_with_launcher() -> None:
    """Under torchrun, ask Linux to SIGKILL this worker when torchrun dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def run_distributed(run: Callable[..., dict]) -> dict:
    """Call a stage's ``run(params, rank=, world_size=, local_rank=)`` under torchrun's launch facts.

    The worker dies with its launcher, and the process group is torn down even on failure.
    """
    die_with_launcher()
    rank, world_size, local_rank = launch_facts()
    from pgolf.distributed import shutdown
    try:
        return run(params(), rank=rank, world_size=world_size, local_rank=local_rank)
    finally:
        shutdown()


def stage_main(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn``; an expected failure becomes one ``error:`` line and exit 1."""
    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn()
        except PgolfError as exc:
            rank = launch_facts()[0]
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    return wrapper
