"""The statistics of the verdict rules (verdicts.py, rules 2 and 3 and the power line): a
paired interval read against the paper's side, the paired t test's p value (the exact sign
test where the pairs have no spread), the Benjamini-Hochberg adjustment, and the seeds a
comparison would need."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from lab.reports.seeds import CONFIDENCE, Interval

ALPHA = 1 - CONFIDENCE   # the test level, the same as the intervals' 95%
POWER = 0.8
SEEDS_LIMIT = 1000  # the power line says "> 1000" beyond


def judge(difference: Interval | None, expect: str, band: float) -> str:
    if difference is None:
        return "not in this grid"
    if difference.low is None:
        return "one seed"
    low, high = difference.low, difference.high
    if expect == "≈":
        return "as the paper" if -band <= low and high <= band else \
            "opposite" if high < -band or low > band else "unresolved"
    if expect == ">":
        low, high = -high, -low
    return "as the paper" if high < 0 else "opposite" if low > 0 else "unresolved"


def p_value(difference: Interval) -> float:
    """Two-sided p of the paired t test of mean 0 (the test whose 95% interval `judge`
    reads). A zero spread (a discrete measure such as a spike count or an LR rung, the same
    difference in every pair) leaves the t test undefined; then the exact sign test: every one
    of n pairs on the same side has p = 2 x 0.5^n (1 for a zero mean), so two or three seeds
    that agree resolve nothing alone, as they should not."""
    if difference.std == 0:
        if difference.mean == 0:
            return 1.0
        return float(stats.binomtest(difference.n, difference.n, 0.5).pvalue)
    t = difference.mean / (difference.std / math.sqrt(difference.n))
    return float(2 * stats.t.sf(abs(t), difference.n - 1))


def seeds_for_effect(effect: float, std: float, alpha: float = ALPHA, power: float = POWER,
                     limit: int = SEEDS_LIMIT) -> int | None:
    """The fewest seeds at which a paired t test at `alpha` two-sided detects a true mean
    difference `effect` with probability `power`, the differences having spread `std`: the
    power is P(|T| > t_crit) for T noncentral t with n-1 degrees of freedom and noncentrality
    effect * sqrt(n) / std. None when even `limit` seeds do not reach it."""
    if std == 0:
        return 2
    n = np.arange(2, limit + 1)
    critical = stats.t.ppf(1 - alpha / 2, n - 1)
    shift = abs(effect) * np.sqrt(n) / std
    reached = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift)
    hits = np.nonzero(reached >= power)[0]
    return int(n[hits[0]]) if len(hits) else None


def seeds_for_band(band: float, std: float, limit: int = SEEDS_LIMIT) -> int | None:
    """The fewest seeds at which the 95% half-width at spread `std` fits in ±`band`."""
    n = np.arange(2, limit + 1)
    hits = np.nonzero(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / np.sqrt(n) <= band)[0]
    return int(n[hits[0]]) if len(hits) else None


def benjamini_hochberg(p_values: dict) -> dict:
    """Rule 3's adjustment: each key's p value adjusted by Benjamini-Hochberg over all of them
    (`scipy.stats.false_discovery_control`)."""
    if not p_values:
        return {}
    adjusted = stats.false_discovery_control(list(p_values.values()), method="bh")
    return {key: float(p) for key, p in zip(p_values, adjusted)}
