"""Glue shared by every stage entry point: params, launch facts, clean failure."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from pgolf.config import load_params
from pgolf.errors import ParamError, PgolfError

PARAMS_FILE = "params.yaml"


def params() -> dict:
    return load_params(PARAMS_FILE)


def launch_facts() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def launch_device(p: dict) -> str:
    """``launch.device`` from params (auto | cpu | cuda); ParamError if missing or unknown."""
    value = p.get("launch", {}).get("device") if isinstance(p.get("launch"), dict) else None
    if value not in ("auto", "cpu", "cuda"):
        raise ParamError("launch.device", f"must be one of ['auto', 'cpu', 'cuda'], got {value!r}")
    return value


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
