"""Short names for the bundle's minifier (pgolf/submission/minify.py describes both rewrites)."""
from __future__ import annotations

import ast
import builtins
import itertools
import string
from typing import Iterable, Mapping

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_DYNAMIC = frozenset({"locals", "vars", "eval", "exec"})


def _short_names() -> Iterable[str]:
    first = string.ascii_letters + "_"
    for n in itertools.count(1):
        for t in itertools.product(first, *[first + string.digits] * (n - 1)):
            yield "".join(t)


def _body_nodes(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
    """The nodes of ``fn``'s body in its own scope (not inside a nested function, lambda or class)."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(fn.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))
    return out


def shorten_locals(tree: ast.Module) -> None:
    """The minifier's short local names (pgolf/submission/minify.py), in place."""
    taken = _taken(tree)
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        if fn.decorator_list:
            continue
        nodes = _body_nodes(fn)
        if any(isinstance(n, (ast.Global, ast.Nonlocal, ast.Match)) or isinstance(n, ast.Name) and n.id in _DYNAMIC
               for n in nodes):
            continue
        keep = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        for n in nodes:
            if isinstance(n, _SCOPES):  # read by a nested scope (its defaults included)
                keep.update(m.id for m in ast.walk(n) if isinstance(m, ast.Name))
            elif isinstance(n, ast.alias):
                keep.add(n.asname or n.name.split(".")[0])
            elif isinstance(n, ast.ExceptHandler) and n.name:
                keep.add(n.name)
        names = [n for n in nodes if isinstance(n, ast.Name)]
        # A comprehension's own variable is not the function's: outside it the same name may be a global.
        own = {id(m) for n in nodes if isinstance(n, ast.comprehension) for m in ast.walk(n.target)}
        bound = {n.id for n in names if isinstance(n.ctx, (ast.Store, ast.Del)) and id(n) not in own} - keep
        uses = {name: sum(n.id == name for n in names) for name in bound}
        fresh = (name for name in _short_names() if name not in taken)
        mapping = {}
        for name in sorted(bound, key=lambda b: (-uses[b], b)):
            new = next(fresh)
            if len(new) < len(name):
                mapping[name] = new
        for n in names:
            n.id = mapping.get(n.id, n.id)


def _taken(tree: ast.Module) -> set[str]:
    """Every name ``tree`` binds, reads or imports, and the builtins: what a new name must not be."""
    taken = set(dir(builtins))
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            taken.add(n.id)
        elif isinstance(n, ast.arg):
            taken.add(n.arg)
        elif isinstance(n, ast.alias):
            taken.add(n.asname or n.name.split(".")[0])
        elif isinstance(n, (*_SCOPES[:2], ast.ClassDef)):
            taken.add(n.name)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            taken.add(n.name)
    return taken


def _spelled(tree: ast.AST) -> dict[str, int]:
    """How often each word occurs in ``tree`` other than as a plain name: attributes, arguments, keywords,
    imports, strings, nested definitions, global/nonlocal and except names (a private name found there is
    left alone: renaming the plain names would no longer match it)."""
    words: dict[str, int] = {}
    for n in ast.walk(tree):
        found: list[str] = []
        if isinstance(n, ast.Attribute):
            found = [n.attr]
        elif isinstance(n, ast.arg):
            found = [n.arg]
        elif isinstance(n, ast.keyword) and n.arg:
            found = [n.arg]
        elif isinstance(n, ast.alias):
            found = [n.name.rpartition(".")[2], n.asname or ""]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            found = [n.value]
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            found = list(n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            found = [n.name]
        elif isinstance(n, (*_SCOPES[:2], ast.ClassDef)):
            found = [n.name]
        for w in found:
            words[w] = words.get(w, 0) + 1
    return words


def shorten_private_names(trees: Mapping[str, ast.Module]) -> None:
    """The minifier's short private names, in place, over all packed modules at once."""
    names = {path: {n.id for n in ast.walk(t) if isinstance(n, ast.Name)} for path, t in trees.items()}
    spelled = {path: _spelled(t) for path, t in trees.items()}
    words = {path: names[path] | set(spelled[path]) for path in trees}
    modules_with: dict[str, int] = {}  # word -> how many modules name or spell it
    for found in words.values():
        for w in found:
            modules_with[w] = modules_with.get(w, 0) + 1
    for path, tree in trees.items():
        own: dict[str, ast.stmt] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
                own[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                own[node.targets[0].id] = node
        private = sorted(name for name, node in own.items()
                         if name.startswith("_") and not name.startswith("__")
                         and modules_with.get(name, 0) == (name in words[path])  # no other module has it
                         and spelled[path].get(name, 0) == (0 if isinstance(node, ast.Assign) else 1))
        taken = _taken(tree) | set(spelled[path])
        fresh = (name for name in _short_names() if name not in taken)
        mapping = {}
        for name in private:
            new = next(fresh)
            if len(new) < len(name):
                mapping[name] = new
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id in mapping:
                n.id = mapping[n.id]
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n in own.values() and n.name in mapping:
                n.name = mapping[n.name]
