import json
import math

import pytest

from pgolf.tools.significance import (regularized_incomplete_beta, student_t_sf,
                                welch_improvement_test)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, -1.7])
def test_t_sf_closed_forms(t):
    # df=1 is the Cauchy distribution; df=2 has a closed form too.
    assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)
    assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)


def test_t_sf_table_values():
    # Classic table quantiles: one-sided 0.05 at df=4 (2.132), 0.01 at df=10 (2.764).
    assert student_t_sf(2.131847, 4) == pytest.approx(0.05, abs=1e-6)
    assert student_t_sf(2.763769, 10) == pytest.approx(0.01, abs=1e-6)
    # Large df approaches the normal tail: P(Z > 1.96) = 0.0249979.
    assert student_t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)


def test_incomplete_beta_symmetry():
    for a, b, x in [(2.0, 3.0, 0.3), (0.5, 5.0, 0.9), (7.0, 1.5, 0.5)]:
        lhs = regularized_incomplete_beta(a, b, x)
        assert lhs == pytest.approx(1 - regularized_incomplete_beta(b, a, 1 - x), abs=1e-13)
    # I_x(1, 1) = x
    assert regularized_incomplete_beta(1.0, 1.0, 0.37) == pytest.approx(0.37, abs=1e-14)


def test_hand_computed_case():
    cand = [1.900, 1.902, 1.904]      # mean 1.902, sd 0.002
    base = [1.920, 1.924, 1.922]      # mean 1.922, sd 0.002
    r = welch_improvement_test(cand, base, margin=0.005, alpha=0.01)
    assert r.improvement == pytest.approx(0.020, abs=1e-12)
    se = math.sqrt(0.002 ** 2 / 3 * 2)
    assert r.t_stat == pytest.approx(0.015 / se, rel=1e-9)      # 9.1856
    assert r.df == pytest.approx(4.0, rel=1e-9)                  # equal variances, n=3 each
    # P(T_4 > 9.1856) by the df=4 closed form of the t CDF.
    t = r.t_stat
    x = t / math.sqrt(t * t + 4)
    expected = 0.5 - 0.5 * (x * (1 + 0.5 * (1 - x * x)))
    assert r.p_value == pytest.approx(expected, rel=1e-9)
    assert r.significant


def test_not_significant_when_below_margin():
    r = welch_improvement_test([1.918, 1.92, 1.922], [1.920, 1.924, 1.922])
    assert r.improvement < r.margin and not r.significant and r.p_value > 0.5


def test_cli_on_metric_files(tmp_path, capsys):
    import json

    from pgolf.tools.cli import main
    files = {}
    for side, losses in {"c": [1.900, 1.902, 1.904], "b": [1.920, 1.924, 1.922]}.items():
        files[side] = []
        for i, loss in enumerate(losses):
            p = tmp_path / f"{side}{i}.json"
            p.write_text(json.dumps({"val_loss": loss, "val_bpb": loss / 1.7}))
            files[side].append(str(p))
    assert main(["significance", "--candidate", *files["c"], "--baseline", *files["b"]]) == 0
    out = capsys.readouterr().out
    assert "improvement: +0.020000 nats, +0.011765 bpb" in out
    assert "verdict: SIGNIFICANT" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["significance", "--candidate", str(bad), files["c"][0], "--baseline", *files["b"]]) == 1
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_experiment_lookup_from_exp_show_json():
    from pgolf.tools.run_metrics import dvc_experiment_metrics
    show = [{"rev": "workspace", "data": {"metrics": {}}},
            {"rev": "abc123", "name": "main", "experiments": [
                {"revs": [{"rev": "e1", "name": "seed-1", "data": {"metrics": {
                    "artifacts/eval_sliding/metrics.json": {"data": {"val_loss": 2.5}},
                    "artifacts/eval_ttt/metrics.json": {"data": {"val_loss": 2.4}}}}}]}]}]
    assert dvc_experiment_metrics("seed-1", show)["val_loss"] == 2.4
    import pytest as _pytest
    from pgolf.errors import DataError
    with _pytest.raises(DataError, match="not found"):
        dvc_experiment_metrics("seed-9", show)


def test_a_bpb_metric_is_reported_in_bpb(tmp_path, capsys):
    from pgolf.tools.cli import main
    paths = {}
    for side, values in (("c", (1.430, 1.432, 1.431)), ("b", (1.440, 1.441, 1.442))):
        paths[side] = []
        for i, v in enumerate(values):
            f = tmp_path / f"{side}{i}.json"
            f.write_text(json.dumps({"val_bpb": v, "val_loss": 3.0}))
            paths[side].append(str(f))
    assert main(["significance", "--candidate", *paths["c"], "--baseline", *paths["b"], "--metric", "val_bpb",
                 "--margin", "0"]) == 0
    out = capsys.readouterr().out
    assert "improvement: +0.010000 bpb\n" in out and "nats" not in out
