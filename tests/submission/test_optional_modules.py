"""pgolf/submission/optional.py: the bundle packs a feature's modules exactly when the run's params need them,
and a bundle that meets a module it left out says so in one line."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from pgolf.submission import driver
from pgolf.submission.optional import OPTIONAL_GROUPS, excluded_modules, group_of, missing_modules, needed
from pgolf.submission.size import EAGER, _module_file, _module_imports, counted_code_files
from pgolf.tools.profiles import compose

REPO = Path(__file__).resolve().parents[2]
DRIVER = "pgolf/submission/driver.py"
PROFILES = sorted(p.stem for p in (REPO / "conf/profile").glob("*.yaml"))
OPTIONAL = {m for _, modules in OPTIONAL_GROUPS.values() for m in modules}


def path_of(module: str) -> str:
    return _module_file(REPO, module).relative_to(REPO).as_posix()


def eager_closure(start: list[str]) -> set[str]:
    """What importing ``start`` runs for certain: module-level imports only, followed through."""
    todo, seen = [REPO / f for f in start], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, kind in _module_imports(REPO, path).items():
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = _module_file(REPO, ".".join(parts[:depth]))
                if found is not None and kind == EAGER:
                    todo.append(found)
    return {p.relative_to(REPO).as_posix() for p in seen}


def test_every_listed_module_exists_and_every_condition_reads_real_params():
    p = compose("cpu")
    for condition, modules in OPTIONAL_GROUPS.values():
        for module in modules:
            assert _module_file(REPO, module) is not None, module
        sections = {name: type("S", (), dict(values)) for name, values in p.items() if isinstance(values, dict)}
        eval(condition, {"__builtins__": {}}, sections)  # an unknown section or key raises here


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_packs_its_needed_groups_and_leaves_out_the_rest(profile):
    p = compose(profile)
    files = set(counted_code_files(REPO, [DRIVER], p))
    assert eager_closure([DRIVER]) <= files  # whatever the driver imports for certain is packed
    for condition, modules in OPTIONAL_GROUPS.values():
        if needed(condition, p):
            assert {path_of(m) for m in modules} <= files, (profile, condition)
        else:  # off: no packed module imports them at module level, so none is packed
            assert not {path_of(m) for m in modules} & files, (profile, condition)
    # Without params every import is followed: the pipeline's closure holds every optional module.
    assert {path_of(m) for m in OPTIONAL} <= set(counted_code_files(REPO, [DRIVER]))


def test_the_record_profile_leaves_the_frontier_modules_out():
    files = set(counted_code_files(REPO, [DRIVER], compose("record")))
    for left_out in ("pgolf/eval/doc_ttt.py", "pgolf/eval/lora.py", "pgolf/eval/ngram_tilt.py",
                     "pgolf/quant/lqer.py", "pgolf/quant/grouped.py", "pgolf/quant/compression.py", "pgolf/quant/awq.py",
                     "pgolf/model/fused_mlp.py", "pgolf/model/fused_loss.py"):
        assert left_out not in files
    on = compose("record", ["eval_ttt.mode=doc_lora", "quantize.compression=grouped"])
    assert {"pgolf/eval/doc_ttt.py", "pgolf/quant/grouped.py"} <= set(counted_code_files(REPO, [DRIVER], on))


def test_a_module_in_no_group_is_always_followed(tmp_path):
    """A lazy import of a module the table does not name is packed whatever the params: a forgotten
    entry costs bytes, never a broken bundle."""
    (tmp_path / "pgolf").mkdir()
    (tmp_path / "pgolf/__init__.py").write_text("")
    (tmp_path / "pgolf/entry.py").write_text("def f():\n    from pgolf import helper\n    return helper\n")
    (tmp_path / "pgolf/helper.py").write_text("")
    assert "pgolf/helper.py" in counted_code_files(tmp_path, ["pgolf/entry.py"], compose("record"))


def test_type_checking_imports_are_never_packed_by_params():
    files = set(counted_code_files(REPO, ["pgolf/quant/artifact.py"], compose("record")))
    assert "pgolf/quant/lqer_factors.py" not in files and "pgolf/quant/grouped.py" not in files
    assert {"pgolf/quant/lqer_factors.py", "pgolf/quant/grouped.py"} <= set(
        counted_code_files(REPO, ["pgolf/quant/artifact.py"]))


def test_excluded_modules_is_the_union_of_the_off_groups():
    p = compose("cpu")
    assert excluded_modules(p) == OPTIONAL
    on = copy.deepcopy(p)
    on["eval_sliding"]["ngram_tilt"] = True
    assert excluded_modules(on) == OPTIONAL - {"pgolf.eval.ngram_tilt"}
    partial = {k: v for k, v in p.items() if k != "eval_ttt"}  # a condition that cannot be read packs its modules
    assert "pgolf.eval.doc_ttt" not in excluded_modules(partial) and "pgolf.eval.ngram_tilt" not in excluded_modules(
        partial)


def test_params_needing_an_unpacked_module_are_refused_before_any_work(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pgolf.eval.ngram_tilt" else real(name, *a))
    p = compose("cpu")
    assert missing_modules(p) == []
    p["eval_ttt"]["ngram_tilt"] = True  # as a run-time --set would
    assert missing_modules(p) == [("pgolf.eval.ngram_tilt", "eval_sliding.ngram_tilt or eval_ttt.ngram_tilt")]
    monkeypatch.setattr(driver, "shutdown", lambda: None)
    assert driver.main(p, ["--set", "launch.device=cpu"], str(REPO / "README.md")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: eval_sliding.ngram_tilt or eval_ttt.ngram_tilt needs pgolf.eval.ngram_tilt, which this "
                   "bundle does not carry (build it with these params)"]


def test_a_left_out_module_reached_anyway_is_one_error_line(monkeypatch, capsys):
    def run(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pgolf.quant.grouped'", name="pgolf.quant.grouped")
    monkeypatch.setattr(driver, "run", run)
    monkeypatch.setattr(driver, "shutdown", lambda: None)
    assert driver.main({}, [], "train_gpt.py") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this bundle does not carry pgolf.quant.grouped (packed only when quantize.compression != 'plain' "
        "or quantize.compressor not in ('zstd', 'lzma'))"]
    assert group_of("pgolf.model.gpt") is None

    def third_party(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'brotli'", name="brotli")
    monkeypatch.setattr(driver, "run", third_party)
    with pytest.raises(ModuleNotFoundError):  # not ours: the real error, untouched
        driver.main({}, [], "train_gpt.py")


def test_the_artifact_reader_needs_grouped_or_lqer_only_for_artifacts_that_use_them(monkeypatch):
    """A plain artifact decodes without either module; a grouped one names the missing module (which the
    driver turns into the line above), so old artifacts still decode wherever the feature's modules are."""
    from pgolf.quant import artifact
    from pgolf.quant.roles import role_grouping
    import pgolf.quant

    t = artifact.StoredTensor("w", (2, 3), "float32", "passthrough", raw=torch.arange(6.0).reshape(2, 3))
    plain = artifact.encode([t], {}, {}, "zstd", 3)
    grouped = artifact.encode([t], {}, {}, "zstd", 3, grouping=role_grouping())
    assert artifact.decode(grouped).tensors[0].raw.equal(t.raw)  # with the module: decodes
    for name in ("pgolf.quant.grouped", "pgolf.quant.lqer_factors"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delattr(pgolf.quant, name.rpartition(".")[2], raising=False)
    assert artifact.decode(plain).tensors[0].raw.equal(t.raw)
    with pytest.raises(ModuleNotFoundError) as info:
        artifact.decode(grouped)
    assert info.value.name == "pgolf.quant.grouped" and group_of(info.value.name) is not None


def test_each_feature_left_out_of_the_record_bundle_comes_back_when_turned_on():
    off = set(counted_code_files(REPO, [DRIVER], compose("record")))
    turned_on = {  # section.key: value that needs the module
        "pgolf/train/context.py": ("train", "seq_len_schedule", ["1024@0.5", "2048@1.0"]),
        "pgolf/model/sampling.py": ("hessians", "source", "autoregressive"),
        "pgolf/eval/frozen_blocks.py": ("eval_ttt", "freeze_blocks", 1),
        "pgolf/quant/protected.py": ("quantize", "awq_top_k", 1),
    }
    for path, (section, key, value) in turned_on.items():
        assert path not in off
        p = compose("record")
        p[section][key] = value
        assert path in set(counted_code_files(REPO, [DRIVER], p)), path
    packed_rows = compose("record")
    packed_rows["train"]["packed_rows"] = True
    assert "pgolf/train/context.py" in set(counted_code_files(REPO, [DRIVER], packed_rows))
    assert "pgolf/train/resume.py" not in off  # the driver never resumes (tests/submission/test_lazy_paths.py)
    assert "pgolf/train/resume.py" in set(counted_code_files(REPO, [DRIVER]))  # the pipeline's closure has it
