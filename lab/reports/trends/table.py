"""The trends as report.md prints them: the verdict of each, then every comparison this grid
could make with its interval, raw and adjusted outcome and power line (verdicts.py); and,
across grids, each trend's verdict in each grid and the grids where it holds."""

from __future__ import annotations

from lab.reports.trends.definitions import TRENDS
from lab.reports.trends.statistics import ALPHA, POWER, SEEDS_LIMIT
from lab.reports.trends.verdicts import (EQUIVALENCE_PERCENT, NO_SINK, SINK_FLOOR, TESTED,
                                         Outcome, TrendResult)


def _seeds_text(o: Outcome) -> str:
    if o.seeds_needed is not None:
        return str(o.seeds_needed)
    sized = o.band > 0 if o.comparison.expect == "≈" else bool(o.effect)
    return f"> {SEEDS_LIMIT}" if o.raw in TESTED and sized else "-"


def markdown(results: list[TrendResult], equivalence_percent: float = EQUIVALENCE_PERCENT,
             ) -> str:
    """The verdicts, then every comparison this grid could make, with its interval, raw and
    adjusted outcome and power line."""
    lines = ["| # | the paper's trend | verdict here |", "|---|---|---|"]
    lines += [f"| {r.trend.number} | {r.trend.claim} | {r.verdict} |" for r in results]
    family = len({o.comparison.key for r in results for o in r.outcomes
                  if o.p_value is not None})
    lines += ["", f"Each comparison: the paired difference left - right over seeds (ladder "
              f"measures: over LR and seed), its 95% t interval, and the side the paper puts "
              f"it on ('≈': within ±{equivalence_percent:g}% of the right side's mean). "
              f"'outcome' is read from the interval alone; 'adjusted' after Benjamini-Hochberg "
              f"over the {family} directional comparisons of this report (p: two-sided paired "
              f"t test), and the verdicts above use it. 'seeds to resolve': the fewest seeds at "
              f"which a paired t test (alpha {ALPHA:g} two-sided, power {POWER:g}) detects "
              f"the paper's relative effect, scaled to the right side's mean here, at this "
              f"paired std ('≈': the seeds at which the 95% half-width fits in the band). A "
              f"sink measure counts only where the baseline's Gu share on 64-token windows "
              f"is at least {SINK_FLOOR:g} ('{NO_SINK}' otherwise).", "",
              "| # | comparison | measure | paper | Δ (mean) | 95% CI | seeds | outcome "
              "| adjusted | p | p adjusted | paired std | paper's effect here "
              "| seeds to resolve |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for o in result.outcomes:
            if o.raw == "not in this grid":
                continue
            c, d = o.comparison, o.difference
            measure = c.measure.label if c.right_measure is None else "(two measures)"
            if d is None:  # a premise left it out
                lines.append(f"| {result.trend.number} | {c.label} | {measure} | "
                             f"{o.paper_text} | - | - | - | {o.raw} | {o.verdict} | - | - | - "
                             f"| - | - |")
                continue
            ci = "-" if d.low is None else f"[{d.low:+.4g}, {d.high:+.4g}]"
            lines.append(
                f"| {result.trend.number} | {c.label} | {measure} | {o.paper_text} "
                f"| {d.mean:+.4g} | {ci} | {d.n} | {o.raw} | {o.verdict} "
                f"| {_number(o.p_value)} | {_number(o.p_adjusted)} | {_number(d.std)} "
                f"| {'-' if o.effect is None else format(o.effect, '+.4g')} "
                f"| {_seeds_text(o)} |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _where(verdicts: list[str], grids: list[str]) -> str:
    """The grids where a trend holds, among those that test it."""
    testable = [g for g, v in zip(grids, verdicts)
                if v != "not in this grid" and not v.startswith("not testable")]
    holding = [g for g, v in zip(grids, verdicts) if v == "holds"]
    return ("no grid tests it" if not testable else
            f"all {len(testable)} that test it" if len(holding) == len(testable) > 1 else
            ", ".join(holding) if holding else "none")


def across(by_grid: dict[str, list[TrendResult]]) -> str:
    """Trend 10 and the issue's "at both scales, at one, or at neither": each trend's verdict
    in each grid, and the grids where it holds."""
    grids = list(by_grid)
    lines = ["| # | the paper's trend | " + " | ".join(grids) + " | holds in |",
             "|---|---|" + "---|" * len(grids) + "---|"]
    for n, result in enumerate(by_grid[grids[0]]):
        trend = result.trend
        verdicts = [by_grid[g][n].verdict for g in grids]
        short = [v.split(";")[0] if v.startswith("not testable") else v for v in verdicts]
        lines.append(f"| {trend.number} | {trend.claim} | " + " | ".join(short)
                     + f" | {_where(verdicts, grids)} |")
    return "\n".join(lines)


def holds_in(by_grid: dict[str, list[TrendResult]]) -> list[str]:
    """across() for a terminal: a line a trend, the grids where it holds and its claim."""
    grids = list(by_grid)
    return [f"{trend.number:>3}. {_where([by_grid[g][n].verdict for g in grids], grids)}: "
            f"{trend.claim}" for n, trend in enumerate(TRENDS)]

