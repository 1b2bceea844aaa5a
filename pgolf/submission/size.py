"""The submission size gate: counted code bytes + compressed model bytes ≤ 16,000,000.

What counts (docs/RECIPE.md §4.7; decimal bytes, never MiB):

* **Model bytes**: the size of ``artifacts/quant/model.ptz``, the whole file
  (header, checksum and compressed payload).
* **Code bytes**: the size of the bundle ``artifacts/bundle/train_gpt.py``
  (pgolf/submission/bundle.py), the one script a submission ships: it carries
  every pgolf module the run needs (train, Hessians, quantize, evals) and the
  resolved params, compressed. The challenge counts "all the code" and wants
  it in ``train_gpt.py``; third-party libraries (torch, numpy, sentencepiece,
  zstandard) are not counted, the tokenizer and data are evaluation inputs.

Which modules the bundle packs is computed, not hand-maintained:
:func:`counted_code_files` follows the ``import`` statements of an entry point
(including imports inside functions) through the project's own packages,
adding each package's ``__init__.py`` on the way (importing a module runs it).
Given the run's params (the bundle does), an import inside a function of a
module of an optional group (pgolf/submission/optional.py) is followed only
when the group's condition holds, and ``if TYPE_CHECKING:`` blocks are skipped:
neither runs in that run.

Total = code bytes + model bytes; it fits when total ≤ 16,000,000 (exactly
16,000,000 fits). size.json also records the sha256 of the artifact it measured.
"""
from __future__ import annotations

import ast
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pgolf.errors import DataError
from pgolf.io import file_sha256
from pgolf.pipeline.paths import BUNDLE, BUNDLE_RESERVE
from pgolf.submission.limits import LIMIT_BYTES
from pgolf.submission.optional import excluded_modules

EVAL_ENTRY_POINTS = ("stages/eval_sliding.py", "stages/eval_ttt.py")
LOCAL_PACKAGES = ("pgolf", "stages")


@dataclass(frozen=True)
class SizeConfig:
    """Section ``size`` of params.yaml."""

    enforce: bool  # over the limit → size_check fails (else it only reports fits: false)


@dataclass(frozen=True)
class SizeReport:
    code_bytes: int
    model_bytes: int
    total_bytes: int
    limit: int
    headroom: int
    fits: bool
    code_files: list[str]
    artifact_sha256: str


def _module_file(root: Path, dotted: str) -> Path | None:
    """File of module ``dotted`` under ``root`` (module.py or package/__init__.py)."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


EAGER, LAZY, NEVER = "eager", "lazy", "never"  # an import runs on import / inside a function / never


def _import_statements(node: ast.AST, kind: str = EAGER) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Each import statement under ``node`` and when it runs (EAGER, LAZY or NEVER: ``if TYPE_CHECKING:``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, kind
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _import_statements(child, NEVER if kind == NEVER else LAZY)
        elif isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            for statement in child.body:
                yield from _import_statements(ast.Module(body=[statement], type_ignores=[]), NEVER)
            for statement in child.orelse:
                yield from _import_statements(ast.Module(body=[statement], type_ignores=[]), kind)
        else:
            yield from _import_statements(child, kind)


def _module_imports(root: Path, path: Path) -> dict[str, str]:
    """{dotted name of a local module ``path`` imports: when the first such import runs}."""
    stat = path.stat()
    return dict(_parsed_imports(root, path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4096)
def _parsed_imports(root: Path, path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """:func:`_module_imports` of one version of a file (cached: tests walk the same tree many times)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise DataError(f"{path}: cannot parse for import analysis ({exc.msg}, line {exc.lineno})") from None
    is_package = path.name == "__init__.py"
    own_package = _module_name(root, path) if is_package else _module_name(root, path).rpartition(".")[0]
    found: dict[str, str] = {}
    rank = {EAGER: 0, LAZY: 1, NEVER: 2}
    for node, kind in _import_statements(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                anchor = own_package.split(".")[:len(own_package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports a module when pkg/mod.py exists.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in LOCAL_PACKAGES and (name not in found or rank[kind] < rank[found[name]]):
                found[name] = kind
    return tuple(found.items())


def _imported_modules(root: Path, path: Path) -> set[str]:
    """Dotted names of local modules ``path`` imports (``from pkg import mod`` included)."""
    return set(_module_imports(root, path))


def counted_code_files(root: str | Path = ".", entry_points: Sequence[str] = EVAL_ENTRY_POINTS,
                       params: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted root-relative paths of the counted code (see the module docstring).

    Without ``params`` every import is followed (a stage's code deps); with them, the modules of a
    run with those params (the bundle's).
    """
    root = Path(root).resolve()
    excluded = None if params is None else excluded_modules(params)
    todo: list[Path] = []
    for entry in entry_points:
        path = root / entry
        if not path.is_file():
            raise DataError(f"{entry}: evaluation entry point not found; cannot count code bytes")
        todo.append(path)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted, kind in _module_imports(root, path).items():
            parts = dotted.split(".")
            if excluded is not None and (kind == NEVER or (kind == LAZY and any(
                    ".".join(parts[:depth]) in excluded for depth in range(1, len(parts) + 1)))):
                continue
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
            for depth in range(1, len(parts) + 1):
                found = _module_file(root, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(p.relative_to(root).as_posix() for p in seen)


def code_bytes(root: str | Path, files: Sequence[str]) -> int:
    root = Path(root)
    return sum((root / f).stat().st_size for f in files)


def bundle_reserved_bytes(root: str | Path = ".") -> int:
    """The code bytes quantize's byte target sets aside for the bundle, from the bundle stage's
    ``reserved_bytes.json``: its counted bytes rounded up (:func:`pgolf.submission.limits.reserved_code_bytes`)."""
    path = Path(root) / BUNDLE_RESERVE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["reserved_bytes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read reserved_bytes ({type(exc).__name__}); run the bundle stage") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{path}: reserved_bytes must be a positive integer, got {value!r}")
    return value




def size_report(model_path: str | Path, root: str | Path = ".", limit: int = LIMIT_BYTES,
                files: Sequence[str] | None = None) -> SizeReport:
    """Measure ``model_path`` plus the counted code (default: the bundle) against ``limit`` bytes."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path}: quantised artifact not found (run the quantize stage)")
    files = [BUNDLE.as_posix()] if files is None else list(files)
    for f in files:
        if not (Path(root) / f).is_file():
            raise DataError(f"{Path(root) / f}: counted code file not found (run the bundle stage)")
    code = code_bytes(root, files)
    model = model_path.stat().st_size
    total = code + model
    return SizeReport(code_bytes=code, model_bytes=model, total_bytes=total, limit=limit,
                      headroom=limit - total, fits=total <= limit, code_files=files,
                      artifact_sha256=file_sha256(model_path))


def report_dict(report: SizeReport) -> dict:
    return asdict(report)


def warn_if_over(size_json_path: str | Path) -> bool:
    """Print a warning to stderr unless ``size.json`` says the submission fits.

    For the eval stages: returns True when a warning was printed (over the
    limit, or the size was never checked), so scores of an over-limit
    artifact cannot pass unnoticed.
    """
    path = Path(size_json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fits, total, limit = bool(data["fits"]), int(data["total_bytes"]), int(data["limit"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {path}: submission size unknown (run the size_check stage)", file=sys.stderr)
        return True
    if not fits:
        print(f"warning: {path}: submission is {total:,} bytes, over the {limit:,}-byte limit "
              f"by {total - limit:,}; this score is not a valid submission", file=sys.stderr)
        return True
    return False
