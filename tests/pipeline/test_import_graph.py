"""The project's import graph, computed from the source with ``ast``, has the shape the design asks for.

Edges are every ``import`` of a project module (``pgolf``, ``stages``),
function-level imports included: a lazy import is still a dependency (the
size gate counts it, dvc.yaml lists it, editing it re-runs the stage), so a
cycle through one is still a cycle. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``. Importing ``a.b.c`` also
runs the ``__init__`` of ``a`` and ``a.b``; those edges are left out of the
cycle check (an ``__init__`` that imports nothing closes no cycle) but are in
each stage's closure, which is pgolf.submission.size's own walk.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.submission.size import counted_code_files

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pgolf", "stages")
# params first: it checks every key before any stage's outputs are touched (issue 18 item 1).
PIPELINE = ("params", "corpus", "tokenizer", "shards", "train", "hessians", "bundle", "quantize", "size_check",
            "eval_sliding", "eval_ttt", "budget")
MAX_FILE_LINES = 400
MAX_RUN_LINES = 40
MAX_TOP_LEVEL_MODULES = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_names(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def project_edges(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports."""
    edges = set()
    for base, names in imported_names(path):
        if base.split(".")[0] not in PACKAGES:
            continue
        submodules = {f"{base}.{n}" for n in names if f"{base}.{n}" in modules}
        edges |= submodules
        if len(submodules) < len(names) or not names:
            assert base in modules, f"{path}: imports {base}, which is not in the tree"
            edges.add(base)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: project_edges(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


# ------------------------------------------------------------------------ controls

def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_relative_and_from_package_imports(tmp_path, monkeypatch):
    """Control: the parser finds function-level imports, ``from pkg import module`` and relative imports."""
    fake = tmp_path / "pgolf"
    (fake / "sub").mkdir(parents=True)
    for rel, text in {"__init__.py": "", "a.py": "def f():\n    from pgolf.sub import b\n",
                      "sub/__init__.py": "", "sub/b.py": "from . import c\nfrom ..a import f\n",
                      "sub/c.py": "import json\n"}.items():
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("pgolf",))
    graph = import_graph()
    assert graph["pgolf.a"] == {"pgolf.sub.b"}
    assert graph["pgolf.sub.b"] == {"pgolf.sub.c", "pgolf.a"}
    assert find_cycle(graph) == ["pgolf.a", "pgolf.sub.b", "pgolf.a"]


# ------------------------------------------------------------------------ the rules

def test_no_import_cycles_among_pgolf_and_stages():
    assert find_cycle(import_graph()) is None


def test_stages_import_only_pgolf_and_pgolf_never_imports_stages():
    for module, edges in import_graph().items():
        if module.startswith("stages."):
            assert all(e.startswith("pgolf") for e in edges), (module, sorted(edges))
        if module.split(".")[0] == "pgolf":
            assert not any(e.startswith("stages") for e in edges), (module, sorted(edges))


def test_dvc_yaml_lists_the_stages_in_pipeline_order():
    assert tuple(dvc_stages()) == PIPELINE
    assert {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"} == set(PIPELINE)


@pytest.mark.parametrize("stage", PIPELINE)
def test_each_stage_code_deps_equal_its_import_closure(stage):
    # The counted code is the train_gpt.py bundle, a file dependency of quantize and size_check
    # (tests/pipeline/test_quant_dvc.py), so their code deps are their own closures like any stage's.
    expected = set(counted_code_files(REPO, [f"stages/{stage}.py"]))
    deps = {d for d in dvc_stages()[stage]["deps"] if d.endswith(".py") and d.startswith(("pgolf/", "stages/"))}
    assert deps == expected


def test_the_closure_of_a_stage_holds_what_it_imports():
    """Control for the test above: a stage's closure reaches the library function it calls, transitively."""
    closure = set(counted_code_files(REPO, ["stages/eval_ttt.py"]))
    assert {"pgolf/eval/inputs.py", "pgolf/eval/ttt.py", "pgolf/eval/windows.py"} <= closure
    assert "stages/eval_sliding.py" not in closure


def test_no_file_under_pgolf_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "pgolf").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_at_most_eight_modules_directly_under_pgolf():
    assert len(list((REPO / "pgolf").glob("*.py"))) <= MAX_TOP_LEVEL_MODULES


@pytest.mark.parametrize("stage", PIPELINE)
def test_each_stage_run_is_at_most_40_lines(stage):
    tree = ast.parse((REPO / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
    runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert len(runs) == 1, "a stage has one module-level run()"
    assert runs[0].end_lineno - runs[0].lineno + 1 <= MAX_RUN_LINES
