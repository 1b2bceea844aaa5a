"""Stage budget: the challenge's two 600 s budgets from the stages' metrics → artifacts/budget.json.

Training (steps + weight choice + Hessian calibration) and evaluation (every
pass over validation tokens, projected to 8 GPUs); what is inside each is
defined in pgolf/submission/budget.py. Over a budget the stage exits non-zero
when ``budget.enforce`` is true, saying by how much; otherwise ``fits: false``
is recorded.
"""
from __future__ import annotations

from pathlib import Path

from pgolf.config import from_params
from pgolf.errors import PgolfError
from pgolf.io import write_json_atomic
from pgolf.submission.budget import BudgetConfig, budget_lines, budget_report, over_budget_message
from pgolf.tools.run_metrics import read_metrics_file
from pgolf.pipeline.launch import params, stage_main
from pgolf.pipeline.paths import BUDGET_JSON, EVAL_SLIDING_DIR, EVAL_TTT_DIR, HESSIANS_DIR, TRAIN_DIR

TRAIN = TRAIN_DIR / "metrics.json"
HESSIANS = HESSIANS_DIR / "metrics.json"
SLIDING = EVAL_SLIDING_DIR / "metrics.json"
TTT = EVAL_TTT_DIR / "metrics.json"
OUT = BUDGET_JSON


def run(p: dict, root: Path = Path(".")) -> dict:
    """Measure, write ``budget.json`` under ``root`` and return it; PgolfError if over and enforced."""
    cfg = from_params(BudgetConfig, p, "budget")
    sources = (TRAIN, HESSIANS, SLIDING, TTT)
    metrics = [read_metrics_file(root / s) for s in sources]
    report = budget_report(*metrics, where=tuple(map(str, sources)))
    report["artifact_sha256"] = metrics[2].get("artifact_sha256")  # which artifact's evals were timed
    write_json_atomic(root / OUT, report)
    message = over_budget_message(report)
    if message is not None and cfg.enforce:
        raise PgolfError(f"{OUT}: {message}")
    return report


@stage_main
def main() -> None:
    report = run(params())
    for line in budget_lines(report):
        print(line)


if __name__ == "__main__":
    main()
