"""Small-sample statistics shared by the study's analysis and the final training's comparison of arms.

Final trainings have 3–10 seeds and studies a handful of trials per group: Student-t intervals (a percentile
bootstrap is too narrow below n ≈ 10), paired t-tests on the seeds two arms share, and Holm's correction when
several arms are compared with one reference. Rank correlations (how well ASHA's early comparisons predict
the final ones) over the few trials a scheduler promotes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

CONFIDENCE = 0.95
# Any two points are perfectly rank-correlated: a rank correlation says something from three pairs on.
MIN_RANK_PAIRS = 3


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """mean, sample std and the two-sided Student-t interval (n − 1 df); NaN where n is too small."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def paired_t_p_value(differences: Sequence[float]) -> float:
    """Two-sided p of the paired t-test that the mean difference is 0; NaN below 2 pairs. Identical
    differences (std 0) give p = 0 when their mean is not 0, and 1 when it is."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return math.nan
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and does not
    count in the family (an arm without two pairs tests nothing)."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values (tied values share their mean rank); NaN below
    MIN_RANK_PAIRS pairs, or when either side does not vary (no ranking to compare)."""
    from scipy import stats

    if len(x) < MIN_RANK_PAIRS or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)
