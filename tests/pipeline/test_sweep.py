"""The daily loop: a full `dvc repro`, then a queued sweep of a quantisation param.

Runs the real dvc.yaml in a scratch git+DVC repo on a tiny configuration
(the committed conf/ with tiny overrides, so DVC's Hydra composition on
`dvc exp run` produces the same tiny params.yaml) and proves that the sweep
re-ran only the stages after training, and that `dvc exp show` shows the key
metrics as top-level columns.
"""
from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers.sweep import RERUN, make_project, run


@pytest.mark.slow
def test_queued_quantize_sweep_reruns_only_post_training_stages(tmp_path):
    root = make_project(tmp_path / "proj")
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    train_out = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}

    run(["dvc", "exp", "run", "--queue", "-S", "quantize.damp=0.02,0.05"], root)
    log = run(["dvc", "exp", "run", "--run-all", "-j", "1"], root)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root))
    exps = [e for entry in shown for group in entry.get("experiments") or [] for e in group["revs"]]
    assert len(exps) == 2, f"expected 2 experiments, got {len(exps)}"
    damps = set()
    for exp in exps:
        data = exp["data"]
        damps.add(data["params"]["params.yaml"]["data"]["quantize"]["damp"])
        metrics = data["metrics"]
        # Key metrics are top-level keys of small metric files (readable `dvc exp show` columns).
        assert "val_bpb" in metrics["artifacts/eval_sliding/metrics.json"]["data"]
        assert "val_bpb" in metrics["artifacts/eval_ttt/metrics.json"]["data"]
        assert {"total_bytes", "fits"} <= set(metrics["artifacts/size.json"]["data"])
        # Training was reused, not re-run: identical train outputs in every experiment.
        deps = exp["data"]["deps"]
        reused = [p for p in train_out if p in deps]
        assert reused, f"no train output among the experiment's deps: {sorted(deps)}"
        for path in reused:
            assert deps[path]["hash"] == train_out[path], f"{path} changed: train re-ran"
    assert damps == {0.02, 0.05}
    for stage in ["corpus", "tokenizer", "shards", "train", "hessians"]:
        assert f"Running stage '{stage}'" not in log, f"{stage} re-ran in the sweep"
    for stage in RERUN:
        assert log.count(f"Running stage '{stage}'") == 2, f"{stage} should run once per experiment"
    table = run(["dvc", "exp", "show", "--md"], root)
    assert "val_bpb" in table and "quantize.damp" in table
