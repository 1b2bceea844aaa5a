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
