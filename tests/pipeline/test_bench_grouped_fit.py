"""bench/grouped_fit.py: both paths give the same bytes and the pruned answer passes every check."""
from __future__ import annotations

import json

import pytest

from bench.grouped_fit import main


@pytest.mark.slow
def test_grouped_fit_bench_checks_hold_on_a_small_state(tmp_path, capsys):
    out = tmp_path / "g.json"
    result = main(["--layers", "1", "--vocab", "64", "--level", "1", "--target-drop", "0.01", "--no-before-prune",
                   "--out", str(out)])
    checks = dict(result["checks"])
    assert checks.pop("pruned_blob_identical") is None  # the before path's pruning was skipped
    assert checks == {"unpruned_blob_identical": True, "final_equals_fresh_encode": True,
                      "final_within_target": True, "one_fewer_misses": True, "final_round_trips": True}
    after = result["after"]
    assert after["fits"] and 0 < after["pruned"] < after["candidates"]
    assert after["pruned_bytes"] <= after["target_bytes"] < after["bytes"] == result["before"]["bytes"]
    assert json.loads(out.read_text()) == result
    assert "before" in capsys.readouterr().out
