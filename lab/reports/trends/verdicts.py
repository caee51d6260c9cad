"""The verdict rules of the paper's trends (../shared/paper/GATED_ATTENTION.md §6;
docs/paper.md §10; the trends and their comparisons: definitions.py): paired tests on a
grid's runs, and the verdicts `gatelab report` prints under its table.

Each trend is a few comparisons. A comparison takes one measure of two variants (or two
measures of two variants), per seed, and its paired difference `left - right` with a 95% t
interval over seeds (the same seed gives both the same data order and the same draw of the
shared weights: lab/reports/grid_report.py). The stability comparisons pair by LR and seed
instead: one pair per rung of the LR ladder and seed that both variants ran, at the rungs
where the baseline broke or spiked (measures.py unstable_rungs). The paper
expects the difference below zero ('<'), above ('>'), or near zero ('≈': inside
±`equivalence_percent` of the right side's mean).

The rules, in the order they apply:

1. **Premises.** A comparison on a sink measure (F-Attn, a head share) counts only when the
   baseline has a sink: Gu et al.'s Sink^0.3 share (heads whose mean attention on position 0
   exceeds 0.3) on 64-token windows, averaged over the baseline's seeds, at least
   `SINK_FLOOR` (`sink/head_share_short` for measures on windows that open with BOS,
   `sink/head_share_short_random` for those on windows without). The rule is the same in
   every trend (3, 7, 7f and any other); otherwise the comparison is "no sink in the
   baseline" and is not tested. The stability trend needs a baseline run that broke or
   spiked somewhere on the ladder.
2. **Raw outcome**, from the 95% interval: "as the paper" (on the paper's side; for '≈',
   inside the band), "opposite" (wholly on the other side; for '≈', wholly outside the band),
   "unresolved" (anything between); "one seed" (no interval); "not in this grid".
3. **Adjusted outcome.** Every directional comparison ('<', '>') of one report with at least
   two pairs gets the two-sided p value of its paired t test, and the p values of all of
   them together (each distinct comparison once, whichever trends share it) are adjusted by
   Benjamini-Hochberg (`scipy.stats.false_discovery_control`). A comparison is "as the paper"
   or "opposite" (by the sign of its mean) when its adjusted p is below `ALPHA`, else
   "unresolved". Why BH and not Holm: a report makes some 60 comparisons with 3 seeds each,
   and what a reader needs is that few of the claims it calls resolved are wrong (the false
   discovery rate), not that none is (Holm's family-wise rate, which at 60 comparisons and 2
   degrees of freedom would leave almost none resolved). BH holds its rate for independent
   or positively dependent tests (Benjamini and Yekutieli 2001); comparisons that share a
   variant are positively dependent. '≈' comparisons are equivalence claims, judged by their
   95% interval against the band (stricter than the two one-sided tests at 5%); they are not
   in the adjustment and their adjusted outcome is their raw one.
4. **Verdict**, from the adjusted outcomes of the comparisons that are tested: "holds" only
   when at least two are tested and all are as the paper; "does not hold" when at least two
   are and all are opposite; "unresolved" when all are unresolved; "partly" with the counts
   otherwise; "too few comparisons here" when only one is tested (one comparison cannot carry
   a trend of several claims); "not testable here" when a premise removed every comparison.

No comparison may hold by construction: trend 9 compares the gated output with the ungated
baseline's, not with its own pre-gate output (a sigmoid below 1 makes that one always true).

**Power line** (statistics.py, with `ALPHA` and `POWER`). Each comparison also gives its
paired standard deviation and the seeds that would resolve the paper's effect at that
spread: the smallest n at which a paired t test at `ALPHA` two-sided has power `POWER`
(noncentral t) against the paper's effect, taken as the paper's relative difference between
the two sides (left over right, minus 1) times our right side's mean. For '≈', the n at
which the 95% half-width at this spread fits in the band. The paper's numbers come from its
dense Table 2 for dense presets where it has both sides (PAPER_DENSE_TABLE of
lab/model/variants.py), else from its MoE tables (Tables 1, 3, 4); the row says which. For the
Gu share, which the paper does not measure, its F-Attn sets the relative effect.

Trend 10 ("the gains hold across settings") is read across grids (docs/results.md), so no
single grid's report judges it. The band of '≈' is our choice: the paper calls headwise
(-0.234) and elementwise (-0.265) "close", 0.5% of its baseline PPL apart, against a gain of
4.4%. 1% by default; `gatelab report --equivalence-percent` changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lab.reports.seeds import BASELINE, Interval, Row, t_interval
from lab.reports.trends.definitions import TRENDS, Comparison, Trend, build_trends, paper_values
from lab.reports.trends.measures import BROKE_MARGIN, metric
from lab.reports.trends.statistics import (ALPHA, benjamini_hochberg, judge, p_value,
                                           seeds_for_band, seeds_for_effect)

EQUIVALENCE_PERCENT = 1.0
# The least share of the baseline's heads over 0.3 on position 0 that counts as a sink: above
# the near-zero shares of Gu et al.'s settings without a sink, below the 18% of their 60M
# default (ICLR 2025, "When attention sink emerges in language models", Sink^0.3 on 64-token
# windows). At `small` (36 heads) it takes two heads, at `base` (96 heads) five.
SINK_FLOOR = 0.05

TESTED = ("as the paper", "opposite", "unresolved")
NO_SINK = "no sink in the baseline"


@dataclass
class Outcome:
    comparison: Comparison
    difference: Interval | None
    raw: str                       # from the 95% interval alone
    verdict: str = ""              # after the multiplicity adjustment: what the verdict uses
    p_value: float | None = None
    p_adjusted: float | None = None
    paper: tuple[float, float, str] | None = None  # the paper's left, right and table
    effect: float | None = None    # the paper's relative effect on our right side's scale
    band: float = 0.0
    seeds_needed: int | None = None  # None: no paper effect or no spread to size it on

    @property
    def paper_text(self) -> str:
        if self.comparison.paper:
            return self.comparison.paper
        if self.paper is None:
            return "-"
        left, right, table = self.paper
        return f"{left:g} vs {right:g} ({table})"


@dataclass
class TrendResult:
    trend: Trend
    outcomes: list[Outcome]
    verdict: str


def baseline_sink(premise: str, rows: dict[str, Row], ladders: dict[str, list[Row]],
                  ) -> tuple[bool | None, str]:
    """(whether the baseline has a sink by rule 1, None where nothing tells, the evidence)."""
    if BASELINE not in rows:
        return None, "no baseline in this grid"
    values = metric(premise)(rows[BASELINE], ladders[BASELINE])
    if not values:
        return None, f"the baseline's runs do not log {premise}"
    mean = float(np.mean(list(values.values())))
    return mean >= SINK_FLOOR, (f"the baseline's {premise}: mean {mean:.3g} over "
                                f"{len(values)} seeds, floor {SINK_FLOOR:g}")


def compare(comparison: Comparison, rows: dict[str, Row], ladders: dict[str, list[Row]],
            equivalence_percent: float, dense: bool = True,
            sinks: dict[str, tuple[bool, str]] | None = None) -> Outcome:
    if comparison.left not in rows or comparison.right not in rows:
        return Outcome(comparison, None, "not in this grid", "not in this grid")
    premise = comparison.premise
    if premise is not None:
        has_sink = (sinks or {}).get(premise) or baseline_sink(premise, rows, ladders)
        if has_sink[0] is None:  # no baseline, or no sink measure logged: nothing to test
            return Outcome(comparison, None, "not in this grid", "not in this grid")
        if not has_sink[0]:
            return Outcome(comparison, None, NO_SINK, NO_SINK)
    right_measure = comparison.right_measure or comparison.measure
    left = comparison.measure(rows[comparison.left], ladders[comparison.left])
    right = right_measure(rows[comparison.right], ladders[comparison.right])
    pairs = sorted(set(left) & set(right))
    rungs = getattr(comparison.measure, "rungs", None)
    if rungs is not None:  # a ladder measure paired only at some of the baseline's LRs
        kept = rungs(ladders.get(BASELINE, []))
        pairs = [key for key in pairs if key[0] in kept]
    difference = t_interval([left[k] - right[k] for k in pairs])
    right_mean = float(np.mean([right[k] for k in pairs])) if pairs else 0.0
    band = equivalence_percent / 100 * abs(right_mean)
    raw = judge(difference, comparison.expect, band)
    outcome = Outcome(comparison, difference, raw, raw, band=band,
                      paper=paper_values(comparison, dense))
    if outcome.paper is not None and outcome.paper[1]:
        outcome.effect = (outcome.paper[0] / outcome.paper[1] - 1) * right_mean
    if raw in TESTED:
        std = difference.std
        if comparison.expect == "≈":
            outcome.seeds_needed = seeds_for_band(band, std) if band > 0 else None
        else:
            outcome.p_value = p_value(difference)
            if outcome.effect:
                outcome.seeds_needed = seeds_for_effect(outcome.effect, std)
    return outcome


def adjust(outcomes: list[Outcome]) -> None:
    """Rule 3: Benjamini-Hochberg over every distinct directional comparison with a p value;
    each outcome's `verdict` becomes its adjusted outcome."""
    family: dict[tuple, float] = {}
    for o in outcomes:
        if o.p_value is not None:
            family.setdefault(o.comparison.key, o.p_value)
    adjusted = benjamini_hochberg(family)
    for o in outcomes:
        if o.p_value is None:
            continue
        o.p_adjusted = adjusted[o.comparison.key]
        if o.p_adjusted >= ALPHA:
            o.verdict = "unresolved"
        else:
            below = o.difference.mean < 0
            o.verdict = "as the paper" if below == (o.comparison.expect == "<") else "opposite"


def evaluate(rows: list[Row], all_rows: list[Row],
             equivalence_percent: float = EQUIVALENCE_PERCENT, dense: bool = True,
             broke_margin: float = BROKE_MARGIN) -> list[TrendResult]:
    """Every trend on a grid's rows (one per variant at its best LR) and every (variant, LR);
    `dense`: the grid's preset has a dense FFN (the paper's reference table, rule 4)."""
    by_variant = {row.variant: row for row in rows}
    ladders: dict[str, list[Row]] = {}
    for row in all_rows:
        ladders.setdefault(row.variant, []).append(row)
    trends = TRENDS if broke_margin == BROKE_MARGIN else build_trends(broke_margin)
    sinks = {p: baseline_sink(p, by_variant, ladders)
             for p in ("sink/head_share_short", "sink/head_share_short_random")}
    per_trend = [[compare(c, by_variant, ladders, equivalence_percent, dense, sinks)
                  for c in trend.comparisons] for trend in trends]
    missing = [_missing_premise(trend, by_variant, ladders) for trend in trends]
    for outcomes, absent in zip(per_trend, missing):
        for o in outcomes:  # a trend without its premise tests nothing (and adds no p value)
            if absent and o.raw in TESTED:
                o.verdict, o.p_value, o.seeds_needed = "premise not met", None, None
    adjust([o for outcomes in per_trend for o in outcomes])
    return [TrendResult(trend, outcomes, absent or _verdict(outcomes, sinks))
            for trend, outcomes, absent in zip(trends, per_trend, missing)]


def _missing_premise(trend: Trend, rows: dict[str, Row], ladders: dict[str, list[Row]],
                     ) -> str | None:
    """The verdict of a trend whose premise the baseline does not show, else None."""
    if trend.premise is None or BASELINE not in rows:
        return None
    values = trend.premise.measure(rows[BASELINE], ladders[BASELINE])
    if values and max(values.values()) <= trend.premise.floor:
        return (f"not testable here: no {trend.premise.missing}; the baseline's "
                f"{trend.premise.measure.label}: at most {max(values.values()):.3g} "
                f"over {len(values)} seeds")
    return None


def _verdict(outcomes: list[Outcome], sinks: dict[str, tuple[bool, str]]) -> str:
    counts = {v: sum(o.verdict == v for o in outcomes) for v in TESTED + ("one seed", NO_SINK)}
    tested = sum(counts[v] for v in TESTED)
    if not tested and not counts["one seed"] and not counts[NO_SINK]:
        return "not in this grid"
    if not tested and counts[NO_SINK]:
        evidence = "; ".join(sinks[p][1] for p in dict.fromkeys(
            o.comparison.premise for o in outcomes if o.verdict == NO_SINK))
        return ("not testable here: no sink in the baseline by Gu et al.'s Sink^0.3 share; "
                + evidence)
    if not tested:
        return "one seed only"
    summary = (f"{counts['as the paper']} of {tested} as the paper, {counts['opposite']} "
               f"opposite, {counts['unresolved']} unresolved (adjusted)")
    if tested < 2:
        return f"too few comparisons here: {summary}"
    if counts["as the paper"] == tested:
        return "holds"
    if counts["opposite"] == tested:
        return "does not hold"
    if counts["unresolved"] == tested:
        return "unresolved (every adjusted comparison spans the paper's side and the other)"
    return f"partly: {summary}"


