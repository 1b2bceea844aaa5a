"""The docs stay true to the tree: README size, recipe and frontier citations, DESIGN's module map and stage contracts.

Everything is computed from the repository itself, so adding a module, a stage, a
stage output or a citation without its documentation fails here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RECIPE = ROOT / "docs" / "RECIPE.md"
FRONTIER = ROOT / "docs" / "FRONTIER.md"
DESIGN = ROOT / "docs" / "DESIGN.md"
MAX_README_LINES = 200

SECTION_SIGN = "\u00a7"  # the section sign, <S> in comments: this file holds no citation of its own
_NUM = r"\d+(?:\.\d+)?"
# "docs/RECIPE.md <S>2.3" (or docs/FRONTIER.md), with more sections: ", <S>6.11", " and <S>6.9", "-<S>2.7",
# or a range "–5"
CITATION = re.compile(
    rf"docs/(RECIPE|FRONTIER)\.md {SECTION_SIGN}({_NUM})"
    rf"((?:(?:,\s*|\s+and\s+|\s*[-–]\s*){SECTION_SIGN}{_NUM}|[-–]{_NUM})*)")
SECTION_ID = re.compile(_NUM)
# a pointer to the notes outside the repository, or a frontier citation without its docs/ file
OUTSIDE_POINTER = re.compile(r"shared/(?:RECIPE|FRONTIER)|(?<!docs/)FRONTIER(?:\.md)?\s*" + SECTION_SIGN)
SKIP_DIRS = {".git", ".dvc", ".venv", "venv", "data", "artifacts", "__pycache__", ".pytest_cache", "build",
             "node_modules", ".carry", ".whl"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh"}


def text_files() -> list[Path]:
    """Every text file of the repository that can hold a citation (sources, docs, configs, CI)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        # pruned in place, so virtual environments and stage outputs are never walked
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or path.relative_to(ROOT).parts[0] == ".ci":
                out.append(path)
    return out


def doc_sections(doc: Path) -> set[str]:
    """Section numbers of a doc's headings: "## 3. Training" → "3", "### 3.2 ..." → "3.2"."""
    return {m.group(1) for m in re.finditer(rf"^#{{2,3}} ({_NUM})\.?\s", doc.read_text(encoding="utf-8"),
                                             flags=re.M)}


def recipe_sections() -> set[str]:
    return doc_sections(RECIPE)


def cited_sections(line: str) -> list[tuple[str, str]]:
    """(doc, section) of every citation in ``line``: doc is "RECIPE" or "FRONTIER"."""
    out = []
    for match in CITATION.finditer(line):
        out += [(match.group(1), n) for n in [match.group(2)] + SECTION_ID.findall(match.group(3))]
    return out


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def test_readme_is_a_front_door_of_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (limit {MAX_README_LINES}): move details to docs/ and link them")


def test_recipe_has_the_numbering_the_code_cites():
    sections = recipe_sections()
    expected = {str(n) for n in range(1, 10)} | {f"6.{i}" for i in range(1, 13)}
    assert expected <= sections, f"missing sections: {sorted(expected - sections)}"


def test_frontier_has_the_sections_the_code_cites_most():
    sections = doc_sections(FRONTIER)
    expected = {"1", "1.1", "1.3", "1.4", "1.5", "2", "2.3", "3", "3.2", "3.3"}
    assert expected <= sections, f"missing sections: {sorted(expected - sections)}"


def test_every_recipe_citation_points_to_a_section_of_docs_recipe():
    sections = {"RECIPE": recipe_sections(), "FRONTIER": doc_sections(FRONTIER)}
    unknown, dangling, outside = [], [], []
    for path in text_files():
        rel = path.relative_to(ROOT).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE_POINTER.search(line):
                outside.append(f"{rel}:{number}: {line.strip()}")
            if path in (RECIPE, FRONTIER):  # their own cross-references are bare: <S>N.M
                own = "RECIPE" if path == RECIPE else "FRONTIER"
                # a bare reference is to the doc itself, unless the line names the other doc
                cited = cited_sections(line) + [(own, c) for c in re.findall(rf"{SECTION_SIGN}({_NUM})",
                                                                              CITATION.sub("", line))]
                rest = ""
            else:
                cited = cited_sections(line)
                rest = CITATION.sub("", line)
            unknown += [f"{rel}:{number}: docs/{doc}.md {SECTION_SIGN}{c}" for doc, c in cited
                        if c not in sections[doc]]
            if SECTION_SIGN in rest:
                dangling.append(f"{rel}:{number}: {line.strip()}")
    problems = ([f"points outside the repository: {x}" for x in outside]
                + [f"not of the form 'docs/RECIPE.md {SECTION_SIGN}N' or 'docs/FRONTIER.md {SECTION_SIGN}N': {x}"
                   for x in dangling]
                + [f"a section its doc lacks: {x}" for x in unknown])
    assert not problems, "\n".join(problems)


def test_citation_pattern_reads_lists_and_ranges():
    s = SECTION_SIGN
    line = (f"(docs/RECIPE.md {s}2.3, {s}6.11) and docs/RECIPE.md {s}2.5-{s}2.7 and docs/RECIPE.md {s}2–5; "
            f"docs/RECIPE.md {s}3.3 and {s}6.9, 969,088 windows")
    cited = [[m.group(2)] + SECTION_ID.findall(m.group(3)) for m in CITATION.finditer(line)]
    assert cited == [["2.3", "6.11"], ["2.5", "2.7"], ["2", "5"], ["3.3", "6.9"]]
    assert s not in CITATION.sub("", line)
    both = f"(docs/RECIPE.md {s}1.4, docs/FRONTIER.md {s}1.5, {s}6.1) and docs/FRONTIER.md {s}2–3"
    assert cited_sections(both) == [("RECIPE", "1.4"), ("FRONTIER", "1.5"), ("FRONTIER", "6.1"),
                                    ("FRONTIER", "2"), ("FRONTIER", "3")]
    assert s not in CITATION.sub("", both) and not OUTSIDE_POINTER.search(both)
    outside = "../" + "shared" + "/RECIPE.md"  # split: this file itself points nowhere outside
    assert s in CITATION.sub("", f"RECIPE {s}4.4 and {outside} {s}1.1")
    assert OUTSIDE_POINTER.search(outside) and OUTSIDE_POINTER.search("FRONTIER " + s + "2")
    assert OUTSIDE_POINTER.search("../" + "shared" + "/FRONTIER.md " + s + "2")
    assert OUTSIDE_POINTER.search("(FRONTIER.md " + s + "2.3)")


def design_module_lines() -> list[str]:
    body = section(DESIGN.read_text(encoding="utf-8"), "Module map")
    return re.findall(r"^- `(pgolf/[^`]+\.py)` — \S", body, flags=re.M)


def test_design_module_map_lists_exactly_the_modules_of_pgolf():
    listed = design_module_lines()
    tree = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pgolf").rglob("*.py")
                  if "__pycache__" not in p.parts)
    duplicates = sorted({m for m in listed if listed.count(m) > 1})
    assert not duplicates, f"listed more than once in docs/DESIGN.md: {duplicates}"
    assert not sorted(set(tree) - set(listed)), (
        f"modules missing from docs/DESIGN.md's module map: {sorted(set(tree) - set(listed))}")
    assert not sorted(set(listed) - set(tree)), (
        f"docs/DESIGN.md lists modules that do not exist: {sorted(set(listed) - set(tree))}")


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_contract(name: str) -> str:
    body = section(DESIGN.read_text(encoding="utf-8"), "Stage contracts")
    match = re.search(rf"^### `{re.escape(name)}`.*?$(.*?)(?=^### |\Z)", body, flags=re.M | re.S)
    assert match, f"docs/DESIGN.md has no contract '### `{name}`' for the dvc.yaml stage {name}"
    return match.group(1)


def _entries(items: list | None) -> list[str]:
    """Paths or keys of a dvc.yaml list whose items are strings or one-key mappings."""
    out = []
    for item in items or []:
        out += list(item) if isinstance(item, dict) else [item]
    return out


def _param_keys(items: list | None) -> list[str]:
    """Params keys of a stage: plain keys, or ``{file: [keys]}`` for another params file."""
    out = []
    for item in items or []:
        if isinstance(item, dict):
            for keys in item.values():
                out += list(keys or [])
        else:
            out.append(item)
    return out


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_every_dvc_stage_has_a_design_contract(name):
    stage = dvc_stages()[name]
    contract = stage_contract(name)
    files = _entries(stage.get("outs")) + _entries(stage.get("metrics")) + _entries(stage.get("plots"))
    missing = [f for f in files if Path(f).name not in contract]
    assert not missing, f"the '{name}' contract in docs/DESIGN.md does not name these outputs: {missing}"
    keys = _param_keys(stage.get("params"))
    unnamed = [k for k in keys if f"`{k}`" not in contract and f"`{k.split('.')[0]}.*`" not in contract]
    assert not unnamed, f"the '{name}' contract in docs/DESIGN.md does not name these params: {unnamed}"


def test_design_contracts_name_only_real_stages():
    body = section(DESIGN.read_text(encoding="utf-8"), "Stage contracts")
    documented = set(re.findall(r"^### `([^`]+)`", body, flags=re.M))
    stale = sorted(documented - set(dvc_stages()))
    assert not stale, f"docs/DESIGN.md has contracts of stages dvc.yaml does not have: {stale}"
