"""The test tree mirrors pgolf/ and its modules share builders only through tests/helpers.

Read from the source with ``ast``: no module under tests/ imports a test module
(``test_*``) or a torchrun worker script, and test modules do not edit sys.path
(every folder is a package, so ``tests.*`` imports and duplicate basenames work).
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
PGOLF = TESTS.parent / "pgolf"
TOP_LEVEL_FILES = {"__init__.py", "conftest.py"}
EXTRA_FOLDERS = {"core", "pipeline", "helpers", "fixtures"}  # core: the modules directly under pgolf/


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module an ``import``/``from`` in ``path`` names (relative ones resolved)."""
    package = module_name(path).rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def is_test_or_worker(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.startswith(("test_", "dist_")) or last == "conftest"


def test_no_module_imports_a_test_module_or_a_worker():
    offenders = {f"{path.relative_to(TESTS.parent)} imports {name}"
                 for path in python_files() for name in imported_modules(path) if is_test_or_worker(name)}
    assert not offenders, sorted(offenders)


def test_test_modules_do_not_edit_sys_path():
    offenders = []
    for path in python_files():
        if not path.name.startswith("test_"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(TESTS.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_folders_mirror_pgolf_and_are_packages():
    subpackages = {p.parent.name for p in PGOLF.glob("*/__init__.py")}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert subpackages <= folders, f"no tests/ folder for pgolf/{sorted(subpackages - folders)}"
    assert folders <= subpackages | EXTRA_FOLDERS, f"tests/ folders without a pgolf/ twin: {sorted(folders - subpackages - EXTRA_FOLDERS)}"
    top = {p.name for p in TESTS.glob("*.py")}
    assert top == TOP_LEVEL_FILES, f"tests/ top level holds only {sorted(TOP_LEVEL_FILES)}, not {sorted(top - TOP_LEVEL_FILES)}"
    for path in python_files():
        assert (path.parent / "__init__.py").is_file(), f"{path.parent.relative_to(TESTS.parent)} lacks __init__.py"


def test_test_files_are_named_test_star_or_worker():
    for path in python_files():
        if path.parent.name == "helpers" or path.name in TOP_LEVEL_FILES:
            continue
        assert path.name.startswith(("test_", "dist_")), f"{path.relative_to(TESTS.parent)}: put builders in tests/helpers"


SUBPROCESS_CALLS = {"run", "Popen", "check_call", "check_output", "call"}


def _calls_a_subprocess(node: ast.AST, helpers: set[str]) -> bool:
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        fn = call.func
        if (isinstance(fn, ast.Attribute) and fn.attr in SUBPROCESS_CALLS and isinstance(fn.value, ast.Name)
                and fn.value.id == "subprocess"):
            return True
        if isinstance(fn, ast.Name) and fn.id in helpers:
            return True
    return False


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Names of ``pytest.mark.X`` used as decorators or listed in ``pytestmark``."""
    names = set()
    for dec in decorators:
        for node in ast.walk(dec):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "mark"):
                names.add(node.attr)
    return names


def shared_subprocess_helpers() -> set[tuple[str, str]]:
    """(module, function) of tests/helpers functions that start a subprocess (e.g. ``run_torchrun``): a test
    that imports and calls one starts one too."""
    found: set[tuple[str, str]] = set()
    for path in sorted((TESTS / "helpers").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = "tests.helpers" + ("" if path.stem == "__init__" else f".{path.stem}")
        found |= {(module, f.name) for f in tree.body
                  if isinstance(f, ast.FunctionDef) and _calls_a_subprocess(f, set())}
    return found


def _imported_helpers(tree: ast.Module, shared: set[tuple[str, str]]) -> set[str]:
    """The names under which ``tree`` imports one of the ``shared`` helpers."""
    return {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
            for alias in node.names if (node.module, alias.name) in shared}


def test_subprocess_tests_are_marked_slow_and_gpu_skips_live_in_conftest():
    unmarked, own_skips = [], []
    shared = shared_subprocess_helpers()
    assert ("tests.helpers.gloo", "run_torchrun") in shared  # the check sees through the shared helper
    for path in python_files():
        if not path.name.startswith("test_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marks = _marks([node.value for node in tree.body if isinstance(node, ast.Assign)
                               and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)])
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        helpers = _imported_helpers(tree, shared)
        for _ in range(3):   # helpers calling helpers, a few levels deep
            helpers |= {f.name for f in functions if not f.name.startswith("test_") and _calls_a_subprocess(f, helpers)}
        fixtures = {f.name for f in functions if f.name in helpers and "fixture" in ast.dump(ast.Module(f.decorator_list, []))}
        for f in functions:
            if not f.name.startswith("test_"):
                continue
            uses_fixture = any(arg.arg in fixtures for arg in f.args.args)
            if (_calls_a_subprocess(f, helpers) or uses_fixture) and "slow" not in _marks(f.decorator_list) | module_marks:
                unmarked.append(f"{path.relative_to(TESTS.parent)}::{f.name}")
            for dec in f.decorator_list:
                if "skipif" in ast.dump(dec) and "cuda" in ast.dump(dec):
                    own_skips.append(f"{path.relative_to(TESTS.parent)}::{f.name}")
    assert not unmarked, f"subprocess tests without @pytest.mark.slow: {unmarked}"
    assert not own_skips, f"use @pytest.mark.gpu (tests/conftest.py skips it without CUDA): {own_skips}"
