"""Atomic file output: a crash never leaves a file DVC could mistake for complete."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename over it on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, path: Path) -> None:
    """Move folder ``src`` to ``path``; an existing ``path`` is moved aside first and removed after."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(src, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, path)


def pending_path(path: str | Path) -> Path:
    """Where a streamed output (a log, a curve folder) is written until its run succeeds:
    ``.NAME.partial`` next to ``path``; :func:`publish` moves it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def publish(path: str | Path) -> None:
    """Move :func:`pending_path` of ``path`` (a file or a folder) over ``path``.

    Until then ``path`` keeps the last good run's version: a failed or killed
    run leaves it alone (its own partial output stays beside it, to read).
    """
    path, pending = Path(path), pending_path(path)
    if pending.is_dir() and not pending.is_symlink():
        _replace_dir(pending, path)
    else:
        os.replace(pending, path)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def non_finite_value(obj: Any, at: str = "") -> tuple[str, float] | None:
    """(key path such as ``a.b[2]``, value) of the first NaN/Inf float in ``obj``, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "(top level)", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_value(value, f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}" if at else str(key))
        if found:
            return found
    return None


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Sorted, indented JSON. A NaN/Inf value is a DataError and nothing is written:
    NaN is not JSON, and a NaN metric means the model or the data is broken."""
    bad = non_finite_value(obj)
    if bad is not None:
        from pgolf.errors import DataError
        raise DataError(f"{path}: {bad[0]} is {bad[1]}, not a finite number; not written")
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def save_tensor_file(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the same bytes for the same tensors.

    ``torch.save`` to a file *name* records that name inside the zip (the records
    are ``<name>/data.pkl``, ...), so saving through :func:`atomic_path`'s random
    temporary name made every checkpoint differ byte-wise and DVC re-ran every
    later stage. Saved through an open file object the records are always
    ``archive/...``.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_tensor_file(path: str | Path, what: str, hint: str = "") -> Any:
    """``torch.load(..., weights_only=True)`` on the CPU; any failure is one DataError line.

    ``what`` names the kind of file in the message ("checkpoint", "Hessian file");
    ``hint`` is appended (e.g. which stage makes it). Never unpickles code.
    """
    import torch

    from pgolf.errors import DataError
    path = Path(path)
    suffix = f" ({hint})" if hint else ""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found{suffix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated, foreign or code-carrying file
        import pickle
        if isinstance(exc, pickle.UnpicklingError):
            detail = "it holds objects other than tensors; refused without unpickling them"
        else:
            detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise DataError(f"{path}: not a readable {what} ({type(exc).__name__}: {detail}){suffix}") from None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
