"""The submission bundle: one self-extracting ``train_gpt.py`` that carries every module a submission runs.

The challenge counts all the code of a submission, and all of it should live
in ``train_gpt.py`` (docs/RECIPE.md §4.7). The bundle is that file:

* a short, readable decoder stub (standard library only: ``lzma``);
* one string, ``ARCHIVE``: the raw LZMA2 compression (preset 9e, ``pb=0``, the
  best measured: docs/LOG.md) of an archive, a first line of JSON ``{"format",
  "version", "driver", "params", "files": [[path, nbytes], ...]}`` followed by
  the files' bytes in that order.

The string is written in base 124: every 13 bytes become 15 characters from
the 124 ASCII codes 1..127 other than CR, ``"`` and backslash, all of which a
triple-quoted literal holds as they are (no escapes, every Python 3) and each
counts one byte. That is 15/13 = 1.154 characters a byte, where base85 takes
1.25 and base64 1.33. The decoder is one piece of source (``DECODER``) that
the stub carries and this module runs, so the two cannot differ.

The files are the import closure of the driver module
(:mod:`pgolf.submission.driver`, computed by
:func:`pgolf.submission.size.counted_code_files`); ``params`` is the run's
resolved params.yaml. With ``bundle.strip_docstrings`` the modules are packed
minified (pgolf/submission/minify.py: no docstrings, comments, argument
annotations or definitions the driver cannot reach, one-space indents; the
same behaviour). ``--unpack`` shows what was packed.

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
import hashlib
import json
import lzma
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pgolf.errors import DataError
from pgolf.submission.minify import minify_sources, strip_docstrings
from pgolf.submission.size import counted_code_files

__all__ = ["build_bundle", "read_bundle", "unpacked_sources", "requirements", "strip_docstrings"]

FORMAT = "pgolf-bundle"
VERSION = 2
DRIVER_MODULE = "pgolf.submission.driver"
DRIVER_FILE = "pgolf/submission/driver.py"
# The stub's first line: how `pgolf inspect` recognises a bundle.
FIRST_LINE = "# pgolf submission bundle"
DIGITS = [c for c in range(1, 128) if c not in (13, 34, 92)]  # base-124 digits: no CR, quote or backslash
_DIGITS_SOURCE = "(c for c in range(1, 128) if c not in (13, 34, 92))"  # the same, in the decoder
BLOCK_BYTES, BLOCK_CHARS = 13, 15  # 124**15 >= 256**13
LZMA2 = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 22, "lc": 3, "lp": 0,
         "pb": 0, "nice_len": 273}

# Run by the stub and by read_bundle: ARCHIVE (base 124, NBYTES long) -> the archive's bytes.
DECODER = """def blob():
    digit = {{chr(c): i for i, c in enumerate({digits})}}
    out = bytearray()
    for i in range(0, len(ARCHIVE), {chars}):
        n = 0
        for c in ARCHIVE[i:i + {chars}]:
            n = n * {base} + digit[c]
        out += n.to_bytes({nbytes}, "big")
    return lzma.decompress(bytes(out[:NBYTES]), lzma.FORMAT_RAW, filters=[{{"id": lzma.FILTER_LZMA2, "dict_size": {dict_size}}}])
""".format(digits=_DIGITS_SOURCE, chars=BLOCK_CHARS, base=len(DIGITS), nbytes=BLOCK_BYTES, dict_size=LZMA2["dict_size"])

STUB = '''{first_line} v{version}: the whole pgolf run (train, calibrate, quantise, evaluate) in one file.
"""torchrun --standalone --nproc_per_node=8 train_gpt.py [--set section.key=value ...] in a records folder with the
challenge's data. ARCHIVE: base124(raw LZMA2(JSON index + pgolf sources)); see --unpack DIR, pgolf/submission/bundle.py"""
import atexit, json, lzma, os, shutil, sys, tempfile


{decoder}

def unpack(folder):
    head, _, body = blob().partition(b"\\n")
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
        return unpack(sys.argv[2])
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


NBYTES = {nbytes}
ARCHIVE = """{archive}"""

if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class Bundle:
    text: str                 # the whole train_gpt.py
    files: list[str]          # repository-relative paths of the packed modules
    source_bytes: int         # the modules' files as in the repository
    raw_bytes: int            # the archive uncompressed: packed sources + the index line with params
    archive_bytes: int        # the raw LZMA2 stream
    params: dict[str, Any]
    packed_bytes: dict[str, int]  # each module's bytes as packed (minified)

    @property
    def counted_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def metrics(self) -> dict[str, Any]:
        return {"counted_bytes": self.counted_bytes, "source_bytes": self.source_bytes, "raw_bytes": self.raw_bytes,
                "archive_bytes": self.archive_bytes, "stub_bytes": self.counted_bytes - self.archive_chars,
                "num_modules": len(self.files), "modules": self.files, "driver": DRIVER_MODULE,
                "sha256": self.sha256}

    @property
    def archive_chars(self) -> int:
        return -(-self.archive_bytes // BLOCK_BYTES) * BLOCK_CHARS


def encode_base124(data: bytes) -> str:
    """``data`` as base-124 digits, 15 characters per 13 bytes (the last block zero-padded)."""
    out = []
    for i in range(0, len(data), BLOCK_BYTES):
        n = int.from_bytes(data[i:i + BLOCK_BYTES].ljust(BLOCK_BYTES, b"\0"), "big")
        block = []
        for _ in range(BLOCK_CHARS):
            n, d = divmod(n, len(DIGITS))
            block.append(chr(DIGITS[d]))
        out.append("".join(reversed(block)))
    return "".join(out)


def decode_archive(archive: str, nbytes: int) -> bytes:
    """The archive's bytes from the ARCHIVE string and NBYTES of a bundle: the stub's own DECODER."""
    scope: dict[str, Any] = {"lzma": lzma, "ARCHIVE": archive, "NBYTES": nbytes}
    exec(DECODER, scope)  # our constant, the source the stub carries
    return scope["blob"]()


def pack_archive(root: Path, files: list[str], params: Mapping[str, Any], strip: bool
                 ) -> tuple[bytes, int, dict[str, int]]:
    """(raw LZMA2 archive, its uncompressed size, {packed file: its packed size}) of ``files`` under ``root``
    and ``params`` (minified, a file the driver no longer imports is left out)."""
    sources = [(root / f).read_bytes() for f in files]
    if strip:  # the stub imports the driver and calls driver.main
        minified = minify_sources(dict(zip(files, sources)), keep=["main"], entry=DRIVER_FILE)
        files = [f for f in files if f in minified]
        sources = [minified[f] for f in files]
    head = json.dumps({"format": FORMAT, "version": VERSION, "driver": DRIVER_MODULE, "params": params,
                       "files": [[f, len(s)] for f, s in zip(files, sources)]},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw = head + b"\n" + b"".join(sources)
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[LZMA2]), len(raw), {f: len(s) for f, s in zip(files, sources)}


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
    files = [f for f in counted_code_files(root, [DRIVER_FILE], params) if f.startswith("pgolf/")]
    archive, raw_bytes, packed = pack_archive(root, files, params, strip)
    files = list(packed)
    text = STUB.format(first_line=FIRST_LINE, version=VERSION, decoder=DECODER, nbytes=len(archive),
                       archive=encode_base124(archive))
    return Bundle(text=text, files=files, source_bytes=sum((root / f).stat().st_size for f in files),
                  raw_bytes=raw_bytes, archive_bytes=len(archive), params=params, packed_bytes=packed)


def _archive_blob(path: Path, text: str) -> bytes:
    """The decompressed archive of bundle ``text``; DataError if it is not one."""
    if not text.startswith(FIRST_LINE):
        raise DataError(f"{path}: not a pgolf bundle (first line is not '{FIRST_LINE} ...')")
    start, end = text.find('\nARCHIVE = """'), text.rfind('"""')
    size_at = text.rfind("\nNBYTES = ", 0, max(start, 0))
    if start < 0 or end <= start or size_at < 0:
        raise DataError(f"{path}: bundle has no ARCHIVE string")
    try:
        return decode_archive(text[start + 14:end], int(text[size_at + 10:start]))
    except (ValueError, KeyError, OverflowError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: corrupt bundle archive ({type(exc).__name__})") from None


def read_bundle(path: str | Path) -> dict[str, Any]:
    """The archive index of a bundle file (format, driver, params, files) plus its byte counts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the bundle ({type(exc).__name__})") from None
    blob = _archive_blob(path, text)
    try:
        head, _, body = blob.partition(b"\n")
        index = json.loads(head)
        files = [(str(f), int(n)) for f, n in index["files"]]
    except (ValueError, KeyError, TypeError) as exc:
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
    body = _archive_blob(path, path.read_text(encoding="utf-8")).partition(b"\n")[2]
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
