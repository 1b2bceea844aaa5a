"""Is a candidate a record? One-sided Welch t-test against a margin.

The challenge accepts a record only if it beats the current best by at least
0.005 nats at p < 0.01, usually over 3 seeds. We test
H0: mean(baseline) - mean(candidate) <= margin  against
H1: mean(baseline) - mean(candidate) >  margin
on per-run validation losses (nats per token), with Welch's unequal-variance
t statistic and Welch–Satterthwaite degrees of freedom. The Student-t tail is
computed from the regularised incomplete beta function, so no SciPy is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, stdev


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only on one side of the mean.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass(frozen=True)
class SignificanceResult:
    candidate_mean: float
    candidate_std: float
    baseline_mean: float
    baseline_std: float
    improvement: float  # baseline - candidate, same unit as the inputs
    margin: float
    t_stat: float
    df: float
    p_value: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.improvement > self.margin and self.p_value < self.alpha


def welch_improvement_test(candidate: list[float], baseline: list[float],
                           margin: float = 0.005, alpha: float = 0.01) -> SignificanceResult:
    """One-sided Welch test that ``baseline - candidate`` exceeds ``margin`` (lower is better)."""
    if len(candidate) < 2 or len(baseline) < 2:
        raise ValueError(f"need at least 2 runs on each side for a t-test "
                         f"(candidate {len(candidate)}, baseline {len(baseline)})")
    if not all(math.isfinite(v) for v in (*candidate, *baseline)):
        raise ValueError("every value must be a finite number (NaN/Inf means a broken run)")
    mc, mb = mean(candidate), mean(baseline)
    sc, sb = stdev(candidate), stdev(baseline)
    vc, vb = sc * sc / len(candidate), sb * sb / len(baseline)
    improvement = mb - mc
    se = math.sqrt(vc + vb)
    if se == 0.0:
        t, df = (math.inf if improvement > margin else -math.inf), float("inf")
        p = 0.0 if improvement > margin else 1.0
    else:
        t = (improvement - margin) / se
        df = (vc + vb) ** 2 / (vc * vc / (len(candidate) - 1) + vb * vb / (len(baseline) - 1))
        p = student_t_sf(t, df)
    return SignificanceResult(mc, sc, mb, sb, improvement, margin, t, df, p, alpha)
