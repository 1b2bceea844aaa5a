"""pgolf/submission/minify.py: every rewrite keeps behaviour, and drops what it says it drops."""
from __future__ import annotations

import ast
import dataclasses
import re
import sys
import types

import pytest

from pgolf.errors import DataError
from pgolf.submission.minify import minify_sources, narrow_indent, squeeze_spaces

MOD_A = b'''"""doc"""
from __future__ import annotations
import dataclasses

@dataclasses.dataclass
class Cfg:
    """fields are annotations"""
    lr: float
    steps: int = 3

class Unused:
    pass

class Based(Exception):
    pass

def helper(x: int, *a: str, k: float = 1.0, **kw: int) -> int:
    y: int = x * 2
    z: int
    z = y + 1
    return z

def dead(x: int) -> int:
    return dead_too(x)

def dead_too(x):
    return x

def by_string():
    return 5

@dataclasses.dataclass
class Registered:
    pass

def main():
    return helper(Cfg(0.5).steps) + getattr(__import__("sys").modules[__name__], "by_string")()
'''
MOD_B = b'''from a import helper

def loop(n):
    total = 0
    for i in range(n):
        if i % 2:
            total += helper(i)
        else:
            total -= 1
    return total
'''


def test_minified_modules_keep_behaviour_and_drop_dead_code():
    out = minify_sources({"a.py": MOD_A, "b.py": MOD_B}, keep=["main", "loop"])
    assert "loop" not in minify_sources({"a.py": MOD_A, "b.py": MOD_B}, keep=["main"])["b.py"].decode()
    for source, source_b in ((MOD_A, MOD_B), (out["a.py"], out["b.py"])):
        module = types.ModuleType("a")
        sys.modules["a"] = module
        try:
            exec(compile(source, "a", "exec"), module.__dict__)
            assert module.main() == 7 + 5
            assert [f.name for f in dataclasses.fields(module.Cfg)] == ["lr", "steps"]
            scope_b: dict = {}
            exec(compile(source_b, "b", "exec"), scope_b)
            assert scope_b["loop"](5) == sum(2 * i + 1 for i in (1, 3)) - 3
        finally:
            del sys.modules["a"]
    tree = ast.parse(out["a.py"])
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert names == {"Cfg", "Based", "helper", "by_string", "Registered", "main"}  # dead, dead_too, Unused gone
    text = out["a.py"].decode()
    assert '"""' not in text and "-> int" not in text and "x: int" not in text
    assert "lr:float" in text and "z:int" in text  # class fields and a bare local declaration stay
    assert "\n return z" in text  # one space per level


def test_narrow_indent_keeps_a_module_whose_literals_span_lines():
    text = 'def f():\n    return """a\n    b"""'
    assert narrow_indent(text, "x") == text
    assert narrow_indent("def f():\n    if 1:\n        return 2", "x") == "def f():\n if 1:\n  return 2"


def test_unparsable_module_is_one_error():
    with pytest.raises(DataError, match="bad.py: cannot parse"):
        minify_sources({"bad.py": b"def (:\n"}, keep=[])


def test_squeeze_keeps_words_apart_and_f_strings_whole():
    text = 'def f(a, b=1):\n if a is not None and b in (1, 2):\n  return f"{a!r} = {b:>4} {{x}}" + str(1 if a else 2)'
    out = squeeze_spaces(text, "x")
    assert out == 'def f(a,b=1):\n if a is not None and b in(1,2):\n  return f"{a!r} = {b:>4} {{x}}"+str(1 if a else 2)'
    scope_a: dict = {}
    scope_b: dict = {}
    exec(text, scope_a)
    exec(out, scope_b)
    assert scope_a["f"]("s", 2) == scope_b["f"]("s", 2) == "'s' =    2 {x}1"
    multi = 'x = """a\n  b"""'
    assert squeeze_spaces(multi, "x") == multi  # a token over two lines: left as it is


def test_decorated_functions_keep_their_annotations():
    """torch.library.custom_op builds its schema from them; triton.jit reads tl.constexpr."""
    from pgolf.submission.minify import drop_annotations
    tree = ast.parse("@op('x')\ndef f(a: int, b: 'T') -> int:\n    return a\ndef g(a: int) -> int:\n    return a\n")
    drop_annotations(tree)
    f, g = tree.body
    assert [x.annotation is not None for x in f.args.args] == [True, True] and f.returns is not None
    assert g.args.args[0].annotation is None and g.returns is None


SCOPES = b'''
i = 100
limit = 7

def comprehension_var_is_not_the_functions(xs):
    out = [i * 2 for i in xs]
    return out, i

def default_reads_outside(values, n=limit):
    limit = n + 1
    total = 0
    for value in values:
        total += value * limit
    return total

def closure_reads_outer(values):
    scale = 3
    def inner(v, s=scale):
        return v * s + scale
    return [inner(v) for v in values]

def handler_and_import(values):
    try:
        result = values[10]
    except IndexError as problem:
        result = type(problem).__name__
    from math import sqrt
    root = sqrt(len(values))
    return result, root

def walrus_and_del(values):
    if (count := len(values)) > 1:
        first = values[0]
        del first
    return count
'''


def test_short_local_names_keep_behaviour():
    out = minify_sources({"m.py": SCOPES}, keep=["comprehension_var_is_not_the_functions", "default_reads_outside",
                                                  "closure_reads_outer", "handler_and_import", "walrus_and_del"])
    results = []
    for source in (SCOPES, out["m.py"]):
        scope: dict = {}
        exec(compile(source, "m", "exec"), scope)
        results.append([scope["comprehension_var_is_not_the_functions"]([1, 2]), scope["default_reads_outside"]([1, 2]),
                        scope["closure_reads_outer"]([1, 2]), scope["handler_and_import"]([1, 2, 3, 4]),
                        scope["walrus_and_del"]([5, 6])])
    assert results[0] == results[1] == [([2, 4], 100), 24, [6, 9], ("IndexError", 2.0), 2]
    text = out["m.py"].decode()
    words = set(re.findall(r"\w+", text))
    assert not {"total", "value", "out", "result", "root", "count", "first"} & words  # the functions' own locals
    assert {"scale", "problem", "sqrt", "limit", "values"} <= words  # nested scope, except/import, default, parameter


def test_a_module_only_dead_code_imported_is_not_packed():
    sources = {"pkg/__init__.py": b"", "pkg/main.py": b"from pkg.used import f\nfrom pkg.helper import g\n\n"
               b"def main():\n    return f()\n", "pkg/used.py": b"def f():\n    return 1\n",
               "pkg/helper.py": b"def g():\n    return 2\n"}
    out = minify_sources(sources, keep=["main"], entry="pkg/main.py")
    assert sorted(out) == ["pkg/__init__.py", "pkg/main.py", "pkg/used.py"]  # g was dead, so was its module
    assert b"helper" not in out["pkg/main.py"]
    assert sorted(minify_sources(sources, keep=["main"])) == sorted(sources)  # no entry: every module


def test_unreferenced_constant_assignments_go_and_the_rest_stay():
    sources = {"pkg/__init__.py": b"", "pkg/paths.py": (
        b"from pathlib import Path\nimport os\nROOT = Path('a')\nUSED = ROOT / 'b'\nDEAD = ROOT / 'c'\n"
        b"DEAD_TUPLE = (1, -2, 'x')\nSIDE = os.getpid()\nFIRST, SECOND = 1, 2\nBY_NAME = 3\n"),
        "pkg/main.py": b"from pkg.paths import USED, DEAD\nimport pkg.paths\n\n"
                       b"def main():\n    return USED, getattr(pkg.paths, 'BY_NAME')\n"}
    out = minify_sources(sources, keep=["main"], entry="pkg/main.py")
    paths = out["pkg/paths.py"].decode()
    for kept in ("ROOT=", "USED=", "SIDE=os.getpid()", "FIRST,SECOND=", "BY_NAME="):  # used, a call, a tuple target
        assert kept in paths, kept
    assert "DEAD" not in paths and "DEAD" not in out["pkg/main.py"].decode()
    namespace: dict = {}  # what is left still runs
    exec(compile(out["pkg/paths.py"], "paths", "exec"), namespace)
    assert str(namespace["USED"]) == "a/b"


PRIVATE = b'''
_SCALE = 3

def _double(x):
    return 2 * x

def _recurse(n):
    return 0 if n == 0 else _SCALE + _recurse(n - 1)

def _by_attr():
    return 1

def _by_string():
    return 2

def _as_argument():
    return 3

def _shadowed(v):
    return v + 1

def uses_arg(_as_argument=5):
    return _as_argument

def shadows(values):
    _shadowed = sum(values)
    return _shadowed

def main():
    return (_double(4), _recurse(2), globals()["_by_string"](), _as_argument(), uses_arg(), shadows([1, 2]),
            _shadowed(1))
'''


def test_private_top_level_names_get_short_names_unless_spelled_elsewhere():
    sources = {"pkg/__init__.py": b"", "pkg/m.py": PRIVATE,
               "pkg/main.py": b"import pkg.m\n\ndef main():\n    return pkg.m.main(), pkg.m._by_attr()\n"}
    out = minify_sources(sources, keep=["main"], entry="pkg/main.py")
    text = out["pkg/m.py"].decode()
    words = set(re.findall(r"\w+", text))
    assert not {"_SCALE", "_double", "_recurse", "_shadowed"} & words  # renamed: the module's own, plain names
    # left alone: another module's attribute, a string, a parameter of the same name
    assert {"_by_attr", "_by_string", "_as_argument"} <= words
    results = []
    for m_source in (PRIVATE, out["pkg/m.py"]):
        scope: dict = {}
        exec(compile(m_source, "m", "exec"), scope)
        results.append(scope["main"]())
    assert results[0] == results[1] == (8, 6, 2, 3, 5, 3, 2)
