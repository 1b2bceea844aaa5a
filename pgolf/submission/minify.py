"""Smaller sources for the bundle, with the same behaviour: what ``bundle.strip_docstrings`` packs.

Every rewrite works on the syntax tree (``ast``), so comments and layout go
with the first ``ast.unparse``; none changes what runs:

* **Docstrings** of modules, classes and functions are dropped (nothing packed
  reads ``__doc__``).
* **Annotations of function arguments and returns** are dropped (not of decorated
  functions: ``custom_op`` and ``triton.jit`` read them), and an
  annotated assignment with a value outside a class body becomes a plain
  assignment. Class-body annotations stay: they define dataclass fields, and
  :func:`pgolf.config.from_params` reads their types.
* **Dead top-level definitions**: a module-level function or class, or a
  ``NAME = value`` built only from constants, names, operators and
  ``Path(...)`` (no side effect), whose name occurs nowhere in the packed code (as a name, an attribute or a string
  constant: ``getattr(module, "name")`` keeps it; being imported is not a use)
  is dropped, to a fixed point, and so is its name from every
  ``from <packed module> import`` that no longer finds it there (an import
  left with no names goes). Decorated definitions and classes with bases or
  keywords always stay (a decorator or metaclass may register them); so do
  dunder names and the names in ``keep`` (the driver's entry point, called
  from the stub).
* **Short local names**: inside an undecorated function, a name the body binds
  (not a parameter: callers pass them by keyword; not only a comprehension's
  variable) becomes, everywhere in its scope, the shortest name the
  module does not use anywhere, most used first. A function with ``global``,
  ``nonlocal``, ``match``, ``locals``/``vars``/``eval``/``exec`` keeps its names;
  so does a name a nested function, lambda or class reads, an imported or
  ``except ... as`` name (their binding is not a name node), and what a default
  value reads (it is evaluated outside the body).
* **Short private names**: a module's own undecorated top-level function or
  ``NAME = value`` whose name starts with one underscore, and that no other
  packed module names (as a name, attribute or string), gets the shortest name
  the module does not use (pgolf/submission/short_names.py says when a name is
  left alone).
* **Indentation** of one space per level instead of four, and **no spaces
  between tokens** but those that keep two words apart (``a=b+1``, ``x if y``);
  each checked by parsing the result again: the tree must equal the unparsed
  one, else that module keeps the previous form. (f-strings are copied whole:
  Python 3.12+ tokenises their insides.)

With an ``entry`` module, a module no packed import reaches from it any more
(its only importers' imports of it went with the definitions they named) is
not packed at all.

The bundle runs only the driver (pgolf/submission/driver.py), so code that only
the stages, tools or tests call is dead inside it, though alive in the repository.
"""
from __future__ import annotations

import ast
import io
import tokenize
from typing import Iterable, Mapping

from pgolf.errors import DataError
from pgolf.submission.short_names import shorten_locals, shorten_private_names


def parse(source: bytes | str, where: str) -> ast.Module:
    try:
        return ast.parse(source, filename=where)
    except SyntaxError as exc:
        raise DataError(f"{where}: cannot parse ({exc.msg}, line {exc.lineno})") from None


def drop_docstrings(tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]


def strip_docstrings(source: bytes, where: str) -> bytes:
    """The module's code without docstrings or comments (``ast.unparse``); same behaviour."""
    tree = parse(source, where)
    drop_docstrings(tree)
    return (ast.unparse(tree) + "\n").encode("utf-8")


def drop_annotations(tree: ast.Module) -> None:
    """Function argument/return annotations; ``x: T = v`` → ``x = v`` outside class bodies."""
    class_bodies = {id(s) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for s in node.body}
    for node in ast.walk(tree):
        # A decorator may read them: torch.library.custom_op builds the op's schema from them and
        # triton.jit reads ``tl.constexpr``, so decorated functions keep theirs.
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not getattr(
                node, "decorator_list", None):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
            if not isinstance(node, ast.Lambda):
                node.returns = None
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            for i, s in enumerate(statements):
                # A bare ``x: T`` in a function makes x local: it stays, as do all class-body ones.
                if isinstance(s, ast.AnnAssign) and s.value is not None and s.simple and id(s) not in class_bodies:
                    statements[i] = ast.copy_location(ast.Assign(targets=[s.target], value=s.value), s)
    ast.fix_missing_locations(tree)


def _names_used(node: ast.AST) -> set[str]:
    """Names ``node`` uses: names, attributes, string constants, and the original of an ``import ... as``
    whose new name it uses (importing a name is not using it)."""
    used: set[str] = set()
    renamed: dict[str, str] = {}
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            used.add(n.id)
        elif isinstance(n, ast.Attribute):
            used.add(n.attr)
        elif isinstance(n, ast.alias) and n.asname:
            renamed[n.asname] = n.name.rpartition(".")[2]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            used.add(n.value)
    return used | {name for new, name in renamed.items() if new in used}


_PURE = (ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.operator, ast.Tuple, ast.List, ast.Set, ast.Dict,
         ast.UnaryOp, ast.unaryop)


def _defined_name(node: ast.stmt) -> str | None:
    """The one name a removable top-level statement binds."""
    if isinstance(node, ast.Assign):
        return node.targets[0].id
    return node.name


def _removable(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assign):  # NAME = a constant expression (Path(...) calls included): no side effect
        return (len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and not node.targets[0].id.startswith("__")
                and all(isinstance(n, _PURE) or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                                 and n.func.id == "Path" and not n.keywords)
                        for n in ast.walk(node.value)))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return not node.decorator_list and not node.name.startswith("__")
    if isinstance(node, ast.ClassDef):
        return not (node.decorator_list or node.bases or node.keywords or node.name.startswith("__"))
    return False


def module_name(path: str) -> str:
    """``pgolf/quant/x.py`` → ``pgolf.quant.x`` (a package's ``__init__.py`` → the package)."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _bound_names(tree: ast.Module) -> set[str]:
    """The names a module's top level binds (definitions, assignments, imports)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
    return bound


def drop_dangling_imports(trees: Mapping[str, ast.Module]) -> None:
    """Drop from each ``from <packed module> import name`` the names that module no longer binds (its
    definition was dropped), to a fixed point (a re-export goes with its source); an emptied import goes."""
    modules = {module_name(path): tree for path, tree in trees.items()}
    while True:
        bound = {name: _bound_names(tree) for name, tree in modules.items()}
        changed = False
        for tree in trees.values():
            for node in ast.walk(tree):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    statements = getattr(node, field, None)
                    if not isinstance(statements, list):
                        continue
                    kept = []
                    for s in statements:
                        if isinstance(s, ast.ImportFrom) and not s.level and s.module in modules:
                            names = [a for a in s.names if a.name == "*" or a.name in bound[s.module]
                                     or f"{s.module}.{a.name}" in modules]
                            changed |= len(names) < len(s.names)
                            if not names:
                                continue
                            s.names = names
                        kept.append(s)
                    if field != "handlers":
                        setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
        if not changed:
            return


def drop_dead_definitions(trees: Mapping[str, ast.Module], keep: Iterable[str]) -> list[str]:
    """Drop unreferenced top-level functions/classes from ``trees`` in place, then the imports of them;
    ``["path:name", ...]`` dropped."""
    dropped: list[str] = []
    uses = {id(top): _names_used(top) - ({_defined_name(top)} if _removable(top) else set())
            for tree in trees.values() for top in tree.body}
    while True:
        used = set(keep).union(*(uses.get(id(top), set()) for tree in trees.values() for top in tree.body))
        changed = False
        for path, tree in trees.items():
            alive = [top for top in tree.body if not (_removable(top) and _defined_name(top) not in used)]
            dropped += [f"{path}:{_defined_name(top)}" for top in tree.body if top not in alive]
            changed |= len(alive) < len(tree.body)
            tree.body = alive or [ast.Pass()]
        if not changed:
            break
    drop_dangling_imports(trees)
    return dropped


def narrow_indent(text: str, where: str) -> str:
    """One space per indentation level (``ast.unparse`` writes four and no multi-line literals)."""
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(" " * ((len(line) - len(body)) // 4) + body)
    narrow = "\n".join(lines)
    if ast.dump(parse(narrow, where)) != ast.dump(parse(text, where)):
        return text  # a literal spanning lines: keep this module's four spaces
    return narrow


_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SKIP = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _pieces(text: str) -> Iterable[tuple[int, str] | None]:
    """(column, source text) of each token of one-line logical lines, None at each line end."""
    lines = text.split("\n")
    depth, start = 0, (0, 0)
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
        if t.type == _FSTRING_START:
            depth, start = depth + 1, (start if depth else t.start)
            continue
        if depth:  # inside an f-string: emit it whole at its end
            if t.type == _FSTRING_END:
                depth -= 1
                if not depth:
                    if start[0] != t.end[0]:
                        raise ValueError("multi-line f-string")
                    yield start[1], lines[t.end[0] - 1][start[1]:t.end[1]]
            continue
        if t.type == tokenize.NEWLINE:
            yield None
        elif t.type not in _SKIP:
            if t.start[0] != t.end[0]:
                raise ValueError("multi-line token")
            yield t.start[1], lines[t.start[0] - 1][t.start[1]:t.end[1]]


def squeeze_spaces(text: str, where: str) -> str:
    """``text`` without the spaces between tokens that no two words need (same tree, else ``text``)."""
    out: list[str] = []
    line: list[str] = []
    try:
        for piece in _pieces(text):
            if piece is None:
                out.append("".join(line))
                line = []
                continue
            column, token = piece
            if not line:
                line.append(" " * column)
            elif line[-1][-1] in _WORD and token[0] in _WORD:
                line.append(" ")
            line.append(token)
    except (ValueError, tokenize.TokenError, SyntaxError):
        return text
    squeezed = "\n".join(out)
    try:
        same = ast.dump(ast.parse(squeezed)) == ast.dump(parse(text, where))
    except SyntaxError:
        same = False
    return squeezed if same else text


def reachable(trees: Mapping[str, ast.Module], entry: str) -> set[str]:
    """Paths of ``trees`` that importing ``entry`` can import (any import statement, a package's
    ``__init__`` included); every path where a relative import makes that unknowable."""
    modules = {module_name(path): path for path in trees}
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(trees[path]):
            if isinstance(node, ast.ImportFrom) and node.level:
                return set(trees)
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                parts = name.split(".")
                todo += [modules[m] for m in (".".join(parts[:d]) for d in range(1, len(parts) + 1)) if m in modules]
    return seen


def minify_sources(sources: Mapping[str, bytes], keep: Iterable[str], entry: str | None = None) -> dict[str, bytes]:
    """{path: minified source} of the packed modules ``sources`` (the module docstring's rewrites); with
    ``entry``, only the modules it can still import."""
    trees = {path: parse(source, path) for path, source in sources.items()}
    for tree in trees.values():
        drop_docstrings(tree)
        drop_annotations(tree)
        shorten_locals(tree)
    drop_dead_definitions(trees, keep)
    shorten_private_names(trees)
    kept = set(trees) if entry is None else reachable(trees, entry)
    return {path: (squeeze_spaces(narrow_indent(ast.unparse(tree), path), path) + "\n").encode("utf-8")
            for path, tree in trees.items() if path in kept}
