"""The submission bundle: one self-extracting ``train_gpt.py`` that carries every module a submission runs.

The challenge counts all the code of a submission, and all of it should live
in ``train_gpt.py`` (docs/RECIPE.md §4.7). The bundle is that file:

* a short, readable decoder stub (standard library only: ``lzma``, ``base64``);
* one base85 string, the xz (LZMA preset 9e) compression of an archive:
  a first line of JSON ``{"format", "version", "driver", "params", "files":
  [[path, nbytes], ...]}`` followed by the files' bytes in that order.

The files are the import closure of the driver module
(:mod:`pgolf.submission.driver`, computed by
:func:`pgolf.submission.size.counted_code_files`); ``params`` is the run's
resolved params.yaml. With ``bundle.strip_docstrings`` each module is packed as
``ast.unparse`` of its syntax tree without docstrings, which drops comments
and docstrings and changes nothing that runs (the record-profile bundle goes
from ~97 KB to ~59 KB); the names, layout of the code and everything else are
kept, and compression does the rest. ``--unpack`` shows what was packed.

At run time the stub decompresses the archive into a private temporary
folder (removed at exit), puts that folder first on ``sys.path``, checks that
``pgolf`` then imports from it and not from an installed copy, and calls the
driver's ``main(params, argv, code_path)``. Each torchrun worker unpacks its
own copy.

Counted bytes = the file's size: the challenge adds ``len(train_gpt.py
encoded as UTF-8)``, and the file is ASCII. Building twice from the same code
and params gives the same bytes.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import lzma
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pgolf.errors import DataError
from pgolf.submission.size import counted_code_files

FORMAT = "pgolf-bundle"
VERSION = 1
DRIVER_MODULE = "pgolf.submission.driver"
DRIVER_FILE = "pgolf/submission/driver.py"
# The stub's first line: how `pgolf inspect` recognises a bundle.
FIRST_LINE = "# pgolf submission bundle"
_LINE_CHARS = 4096  # base85 in long lines: a newline costs a counted byte

STUB = '''{first_line} v{version}: the whole pgolf run (train, calibrate, quantise, evaluate) in one file.
"""torchrun --standalone --nproc_per_node=8 train_gpt.py [--set section.key=value ...] in a records folder
with the challenge's data layout. ARCHIVE = base85(xz(one JSON line: driver, params, file list; then the
pgolf sources)), unpacked to a private temp folder and imported from there, never from an installed pgolf.
Sources: python train_gpt.py --unpack DIR. Made by pgolf/submission/bundle.py."""
import atexit, base64, json, lzma, os, shutil, sys, tempfile


def unpack(folder):
    blob = lzma.decompress(base64.b85decode("".join(ARCHIVE.split())))
    head, _, body = blob.partition(b"\\n")
    index = json.loads(head)
    offset = 0
    for path, size in index["files"]:
        target = os.path.join(folder, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(body[offset:offset + size])
        offset += size
    return index


def main():
    if sys.argv[1:2] == ["--unpack"]:
        unpack(sys.argv[2])
        return
    folder = tempfile.mkdtemp(prefix="pgolf_bundle_")
    atexit.register(shutil.rmtree, folder, True)
    index = unpack(folder)
    sys.path.insert(0, folder)
    if "pgolf" not in sys.modules:
        driver = __import__(index["driver"], fromlist=["main"])
    source = os.path.realpath(getattr(sys.modules["pgolf"], "__file__", None) or "?")
    if not source.startswith(os.path.realpath(folder) + os.sep):
        sys.exit(f"error: pgolf imported from {{source}}, not from this bundle")
    sys.exit(driver.main(index["params"], sys.argv[1:], os.path.abspath(__file__)))


ARCHIVE = """
{archive}
"""

if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class Bundle:
    text: str                 # the whole train_gpt.py
    files: list[str]          # repository-relative paths of the packed modules
    source_bytes: int         # the modules' files as in the repository
    raw_bytes: int            # the archive uncompressed: packed sources + the index line with params
    archive_bytes: int        # the xz stream
    params: dict[str, Any]

    @property
    def counted_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def metrics(self) -> dict[str, Any]:
        return {"counted_bytes": self.counted_bytes, "source_bytes": self.source_bytes, "raw_bytes": self.raw_bytes,
                "archive_bytes": self.archive_bytes, "stub_bytes": self.counted_bytes - self.archive_b85_bytes,
                "num_modules": len(self.files), "modules": self.files, "driver": DRIVER_MODULE,
                "sha256": self.sha256}

    @property
    def archive_b85_bytes(self) -> int:
        b85 = -(-self.archive_bytes // 4) * 5
        return b85 + -(-b85 // _LINE_CHARS)  # one newline per wrapped line


def strip_docstrings(source: bytes, where: str) -> bytes:
    """The module's code without docstrings or comments (``ast.unparse``); same behaviour."""
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as exc:
        raise DataError(f"{where}: cannot parse ({exc.msg}, line {exc.lineno})") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return (ast.unparse(tree) + "\n").encode("utf-8")


def pack_archive(root: Path, files: list[str], params: Mapping[str, Any], strip: bool) -> tuple[bytes, int]:
    """(xz archive, its uncompressed size) of ``files`` under ``root`` and ``params``."""
    sources = [(root / f).read_bytes() for f in files]
    if strip:
        sources = [strip_docstrings(s, str(root / f)) for f, s in zip(files, sources)]
    head = json.dumps({"format": FORMAT, "version": VERSION, "driver": DRIVER_MODULE, "params": params,
                       "files": [[f, len(s)] for f, s in zip(files, sources)]},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw = head + b"\n" + b"".join(sources)
    return lzma.compress(raw, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME), len(raw)


def plain(value: Any) -> Any:
    """Nested mappings and lists as plain dicts and lists (every leaf read), for JSON."""
    if isinstance(value, Mapping):
        return {str(k): plain(value[k]) for k in value}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def build_bundle(root: str | Path, params: Mapping[str, Any], strip: bool = True) -> Bundle:
    """The bundle of the driver's import closure under ``root`` with ``params`` embedded."""
    params = plain(params)  # every key is embedded, so every key is read (first, before any file)
    root = Path(root)
    if not (root / DRIVER_FILE).is_file():
        raise DataError(f"{root / DRIVER_FILE}: driver module not found; cannot build the bundle")
    files = [f for f in counted_code_files(root, [DRIVER_FILE]) if f.startswith("pgolf/")]
    archive, raw_bytes = pack_archive(root, files, params, strip)
    b85 = base64.b85encode(archive).decode("ascii")
    wrapped = "\n".join(b85[i:i + _LINE_CHARS] for i in range(0, len(b85), _LINE_CHARS))
    text = STUB.format(first_line=FIRST_LINE, version=VERSION, archive=wrapped)
    return Bundle(text=text, files=files, source_bytes=sum((root / f).stat().st_size for f in files),
                  raw_bytes=raw_bytes, archive_bytes=len(archive), params=params)


def read_bundle(path: str | Path) -> dict[str, Any]:
    """The archive index of a bundle file (format, driver, params, files) plus its byte counts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the bundle ({type(exc).__name__})") from None
    if not text.startswith(FIRST_LINE):
        raise DataError(f"{path}: not a pgolf bundle (first line is not '{FIRST_LINE} ...')")
    start, end = text.find('ARCHIVE = """'), text.rfind('"""')
    if start < 0 or end <= start:
        raise DataError(f"{path}: bundle has no ARCHIVE string")
    try:
        blob = lzma.decompress(base64.b85decode("".join(text[start + 13:end].split())))
        head, _, body = blob.partition(b"\n")
        index = json.loads(head)
        files = [(str(f), int(n)) for f, n in index["files"]]
    except (ValueError, lzma.LZMAError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: corrupt bundle archive ({type(exc).__name__})") from None
    if index.get("format") != FORMAT or sum(n for _, n in files) != len(body):
        raise DataError(f"{path}: archive index does not match its contents")
    return {"format": index["format"], "version": index.get("version"), "driver": index.get("driver"),
            "params": index.get("params"), "files": files, "counted_bytes": len(text.encode("utf-8")),
            "raw_bytes": len(blob), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def unpacked_sources(path: str | Path) -> dict[str, str]:
    """{module path: source text} of the modules a bundle file carries (for requirements and inspect)."""
    path = Path(path)
    index = read_bundle(path)
    text = path.read_text(encoding="utf-8")
    start, end = text.find('ARCHIVE = """'), text.rfind('"""')
    blob = lzma.decompress(base64.b85decode("".join(text[start + 13:end].split())))
    body = blob.partition(b"\n")[2]
    out, offset = {}, 0
    for name, size in index["files"]:
        out[name] = body[offset:offset + size].decode("utf-8")
        offset += size
    return out


def requirements(bundle_path: Path) -> str:
    """requirements.txt: the third-party packages the bundled modules import, by distribution name.

    A package imported only inside functions (e.g. dvclive, tqdm: paths a bundle run may not
    take) is marked so; the version is the one this run used.
    """
    from importlib import metadata

    top: set[str] = set()
    lazy: set[str] = set()

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name.split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            return {node.module.split(".")[0]}
        return set()

    for source in unpacked_sources(bundle_path).values():
        tree = ast.parse(source)
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            (top if id(node) in module_level else lazy).update(names(node))
    local = set(sys.stdlib_module_names) | {"pgolf", "__future__"}
    dists = metadata.packages_distributions()
    lines = []
    for name in sorted((top | lazy) - local):
        dist = (dists.get(name) or [name])[0]
        try:
            version = f"run with {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            version = "not installed here"
        note = "" if name in top else ", imported only inside functions"
        lines.append(f"{dist}  # {version}{note}")
    return "\n".join(lines) + "\n"
