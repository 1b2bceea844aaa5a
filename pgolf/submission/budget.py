"""The challenge's two ten-minute budgets, measured from the stages' metrics, and their gate.

**Training budget (600 s)**: everything after start-up that produces the
weights and touches training data (docs/RECIPE.md §3.6): the training steps
(the loop's clock, ``train_seconds``: compile warm-up and logging excluded,
as in the records), the live/EMA/SWA weight choice (``choice_seconds``: it
scores held-out *train* tokens after the clock stops) and the Hessian
calibration (the hessians stage's ``seconds``, counted whatever its source:
the artifact cannot be made without it).

**Evaluation budget (600 s)**: every pass that reads validation tokens: the
sliding-window scoring, the non-overlapping diagnostic and legal TTT, each
with its compile warm-up (``compile_seconds``), since a warm-up scores (and
discards) the first validation batch. Not inside: process start-up, imports,
reading and dequantising the artifact. The projected 8-GPU figure assumes
scoring scales with the number of GPUs and compilation does not:
``compile + seconds · world_size / 8``; TTT's gradient all-reduce on 8 GPUs
is not modelled. The eval gate uses the projection (on 8 GPUs it equals the
measurement).

Over either budget, :func:`check_budget` fails when ``budget.enforce`` is true
and otherwise reports ``fits: false`` with the overshoot in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pgolf.errors import DataError
from pgolf.submission.limits import EVAL_BUDGET_SECONDS, RECORD_GPUS, TRAIN_BUDGET_SECONDS



@dataclass(frozen=True)
class BudgetConfig:
    """Section ``budget`` of params.yaml."""

    enforce: bool  # over a budget → the budget stage fails (else it records fits: false)


def projected_8gpu_seconds(scoring_seconds: float, compile_seconds: float, world_size: int) -> float:
    """An eval's time on the challenge's 8 GPUs: scoring scales with the GPU count, compilation does not."""
    return compile_seconds + scoring_seconds * world_size / RECORD_GPUS


def eval_timer(scoring_seconds: float, compile_seconds: float, world_size: int) -> dict:
    """The eval metrics' timer fields: what the challenge's eval timer sees here (every scoring pass and
    its compile warm-up, which scores a discarded val batch) and its 8-GPU projection."""
    return {"timer_seconds": round(scoring_seconds + compile_seconds, 3),
            "projected_8gpu_seconds": round(projected_8gpu_seconds(scoring_seconds, compile_seconds, world_size), 3)}


def _seconds(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise DataError(f"{where}: key '{key}' missing or not a non-negative number")
    return float(value)


def training_budget(train: Mapping[str, Any], hessians: Mapping[str, Any],
                    where: tuple[str, str] = ("train metrics", "hessians metrics")) -> dict[str, Any]:
    parts = {"train_seconds": _seconds(train, "train_seconds", where[0]),
             "choice_seconds": _seconds(train, "choice_seconds", where[0]),
             "calibration_seconds": _seconds(hessians, "seconds", where[1])}
    total = sum(parts.values())
    return {**parts, "seconds": total, "limit": TRAIN_BUDGET_SECONDS, "over_by": total - TRAIN_BUDGET_SECONDS,
            "fits": total <= TRAIN_BUDGET_SECONDS, "world_size": train.get("world_size")}


def eval_budget(sliding: Mapping[str, Any], ttt: Mapping[str, Any] | None,
                where: tuple[str, str] = ("eval_sliding metrics", "eval_ttt metrics")) -> dict[str, Any]:
    world = sliding.get("world_size")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise DataError(f"{where[0]}: key 'world_size' missing or not a positive integer")
    scoring = _seconds(sliding, "seconds", where[0]) + _seconds(sliding, "nonoverlap_seconds", where[0])
    compile_s = _seconds(sliding, "compile_seconds", where[0])
    if ttt is not None:
        scoring += _seconds(ttt, "seconds", where[1])
        compile_s += _seconds(ttt, "compile_seconds", where[1])
    projected = projected_8gpu_seconds(scoring, compile_s, world)
    return {"scoring_seconds": scoring, "compile_seconds": compile_s, "seconds": scoring + compile_s,
            "world_size": world, "projected_8gpu_seconds": projected, "limit": EVAL_BUDGET_SECONDS,
            "over_by": projected - EVAL_BUDGET_SECONDS, "fits": projected <= EVAL_BUDGET_SECONDS,
            "ttt": ttt is not None}


def budget_report(train: Mapping, hessians: Mapping, sliding: Mapping, ttt: Mapping | None,
                  where: tuple[str, str, str, str] = ("train metrics", "hessians metrics",
                                                      "eval_sliding metrics", "eval_ttt metrics")) -> dict[str, Any]:
    """Both budgets; ``where`` names the four sources in error messages."""
    t, e = training_budget(train, hessians, where[:2]), eval_budget(sliding, ttt, where[2:])
    return {"training": t, "eval": e, "fits": t["fits"] and e["fits"]}


def budget_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per budget: the figure, its parts and the verdict with the overshoot."""
    t, e = report["training"], report["eval"]

    def verdict(part: Mapping) -> str:
        return f"fits, {-part['over_by']:.1f} s spare" if part["fits"] else f"OVER by {part['over_by']:.1f} s"
    return [f"budget training: {t['seconds']:.1f} s of {t['limit']:.0f} (train {t['train_seconds']:.1f} + "
            f"weight choice {t['choice_seconds']:.1f} + calibration {t['calibration_seconds']:.1f}, "
            f"world {t['world_size']}): {verdict(t)}",
            f"budget eval: {e['seconds']:.1f} s on {e['world_size']} process(es) (scoring "
            f"{e['scoring_seconds']:.1f} + compile warm-up {e['compile_seconds']:.1f}); projected on "
            f"{RECORD_GPUS} GPUs {e['projected_8gpu_seconds']:.1f} s of {e['limit']:.0f}: {verdict(e)}"]


def over_budget_message(report: Mapping[str, Any]) -> str | None:
    """The gate's one line when a budget is exceeded, else None."""
    over = [(name, report[name]) for name in ("training", "eval") if not report[name]["fits"]]
    if not over:
        return None
    return "; ".join(f"{name} takes {part.get('projected_8gpu_seconds', part['seconds']):.1f} s, over the "
                     f"{part['limit']:.0f}-s budget by {part['over_by']:.1f} s" for name, part in over)
