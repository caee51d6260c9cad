"""The paper's trends (../shared/paper/GATED_ATTENTION.md §6; docs/paper.md §10) as paired
tests on a grid's runs: the verdicts `gatelab report` prints under its table.

Each trend is a few comparisons. A comparison takes one measure of two variants (or two
measures of one), per seed, and its paired difference `left - right` with a 95% t interval
over seeds (the same seed gives both the same data order and the same draw of the shared
weights: lab/reports/grid_report.py). The paper expects that difference below zero ('<'),
above ('>'), or near zero ('≈': inside ±`equivalence_percent` of the right side's mean).
A comparison comes out

- "as the paper": the interval lies on the paper's side (for '≈', inside the band);
- "opposite": it lies wholly on the other side (for '≈', wholly outside the band);
- "unresolved": anything between; "one seed": no interval; "not in this grid".

A trend holds when every comparison this grid can make comes out as the paper, does not
hold when every one comes out opposite, and is "partly" otherwise, with the counts. A trend
whose premise the baseline does not show (no sink to remove, no spike to avoid) is "not
testable here", with the evidence. Trend 10 ("the gains hold across settings") is read
across grids (docs/results.md), so no single grid's report judges it.

The band of '≈' is our choice: the paper calls headwise (-0.234) and elementwise (-0.265)
"close", 0.5% of its baseline PPL apart, against a gain of 4.4%. 1% by default;
`gatelab report --equivalence-percent` changes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from lab.reports.seeds import BASELINE, Interval, Row, t_interval

EQUIVALENCE_PERCENT = 1.0

G1 = "sdpa_elementwise_sigmoid_mul"
G1_HEADWISE = "sdpa_headwise_sigmoid_mul"
G1_HEADSHARED = "sdpa_elementwise_headshared_sigmoid_mul"
G2 = "value_elementwise_sigmoid_mul"
G2_HEADWISE = "value_headwise_sigmoid_mul"
G2_HEADSHARED = "value_elementwise_headshared_sigmoid_mul"
G3 = "key_elementwise_sigmoid_mul"
G4 = "query_elementwise_sigmoid_mul"
G5 = "denseout_elementwise_sigmoid_mul"
SILU_ADD = "sdpa_elementwise_silu_add"
SILU_MUL = "sdpa_elementwise_silu_mul"
RMSNORM = "sdpa_perhead_rmsnorm"
IDENTITY_ADD = "sdpa_elementwise_identity_add"
SILU_NOPARAM = "sdpa_silu_noparam"
INPUT_INDEPENDENT = "sdpa_input_independent_sigmoid_mul"
NS_SIGMOID = "sdpa_elementwise_nssigmoid_mul"

PerSeed = dict[int, float]


def metric(name: str) -> Callable[[Row, list[Row]], PerSeed]:
    """A logged metric of each seed's run at the variant's best LR (val/ppl: none for a
    diverged run, as in the report's table)."""
    def measure(row: Row, ladder: list[Row]) -> PerSeed:
        if name == "val/ppl":
            return {r.seed: r.val_ppl for r in row.runs if r.val_ppl is not None}
        return {r.seed: r.metrics[name] for r in row.runs
                if name in r.metrics and math.isfinite(r.metrics[name])}
    measure.label = name
    return measure


def ratio(numerator: str, denominator: str) -> Callable[[Row, list[Row]], PerSeed]:
    """One metric over another, per run: long-context PPL relative to the trained length,
    so that extrapolation is judged apart from the gain at the trained length."""
    top, bottom = metric(numerator), metric(denominator)

    def measure(row: Row, ladder: list[Row]) -> PerSeed:
        a, b = top(row, ladder), bottom(row, ladder)
        return {seed: a[seed] / b[seed] for seed in a if seed in b and b[seed]}
    measure.label = f"{numerator} / {denominator}"
    return measure


def max_stable_lr(row: Row, ladder: list[Row]) -> PerSeed:
    """Per seed, log10 of the largest LR of the ladder at which that seed's run did not
    diverge (the paper's Table 2: the baseline breaks at LRs where the gate trains). A seed
    that diverged at every LR counts one step of the ladder below its lowest LR, so that it
    stays in the pairing instead of dropping out of it."""
    best: PerSeed = {}
    lrs = sorted({rung.lr for rung in ladder})
    if len(lrs) < 2:
        return best  # one LR: no ladder to find a breaking point on
    below = 2 * math.log10(lrs[0]) - math.log10(lrs[1])
    for rung in ladder:
        for run in rung.runs:
            stable = math.log10(rung.lr) if not run.diverged else below
            best[run.seed] = max(best.get(run.seed, -math.inf), stable)
    return best


max_stable_lr.label = "log10 max LR without divergence"


def broke(row: Row, ladder: list[Row]) -> PerSeed:
    """Per seed, 1 where a run of that seed diverged or spiked at some LR of the ladder."""
    out: PerSeed = {}
    for rung in ladder:
        for run in rung.runs:
            hit = run.diverged or run.metrics.get("spikes/count", 0) > 0
            out[run.seed] = max(out.get(run.seed, 0.0), float(hit))
    return out


broke.label = "runs that diverged or spiked"


@dataclass(frozen=True)
class Comparison:
    left: str
    right: str
    expect: str                          # '<', '>' or '≈' for left - right
    measure: Callable = metric("val/ppl")
    right_measure: Callable | None = None  # another measure of the right variant
    paper: str = ""                       # the paper's numbers, for the reader

    @property
    def label(self) -> str:
        if self.right_measure is None:
            return f"{short(self.left)} {self.expect} {short(self.right)}"
        return (f"{short(self.left)}: {self.measure.label} {self.expect} "
                f"{self.right_measure.label}")


@dataclass(frozen=True)
class Premise:
    """What the baseline must show for the trend to be testable: its measure above a floor
    in some seed; `missing` names what is absent otherwise."""
    measure: Callable
    floor: float
    missing: str


@dataclass(frozen=True)
class Trend:
    number: str
    claim: str
    comparisons: tuple[Comparison, ...]
    premise: Premise | None = None


def short(variant: str) -> str:
    return NAMES.get(variant, variant)


NAMES = {BASELINE: "baseline", G1: "G1 elementwise", G1_HEADWISE: "G1 headwise",
         G1_HEADSHARED: "G1 head-shared", G2: "G2 value", G2_HEADWISE: "G2 value headwise",
         G2_HEADSHARED: "G2 value head-shared", G3: "G3 key", G4: "G4 query", G5: "G5 dense-out",
         SILU_ADD: "SiLU additive", SILU_MUL: "SiLU multiplicative", RMSNORM: "per-head RMSNorm",
         IDENTITY_ADD: "identity additive", SILU_NOPARAM: "parameter-free SiLU",
         INPUT_INDEPENDENT: "input-independent", NS_SIGMOID: "NS-sigmoid"}

GATE, FATTN, MACT = metric("gate/mean"), metric("sink/first_token_attn"), metric("act/max_mean")


def _sink_comparisons(measure: Callable, papers: tuple[str, ...]) -> tuple[Comparison, ...]:
    """Trend 7's pairs: both G1 gates below the baseline, and G1 below the gates that keep
    the sink in the paper (value, input-independent, NS-sigmoid)."""
    pairs = ((G1, BASELINE), (G1_HEADWISE, BASELINE), (G1, G2), (G1, INPUT_INDEPENDENT),
             (G1, NS_SIGMOID))
    return tuple(Comparison(left, right, "<", measure, paper=paper)
                 for (left, right), paper in zip(pairs, papers))

TRENDS = (
    Trend("1", "position ranking: G1 > G2 >> G4 ≈ G3 ≈ G5 ≈ no gate (Table 1)", (
        Comparison(G1, BASELINE, "<", paper="-0.265"),
        Comparison(G2, BASELINE, "<", paper="-0.206"),
        Comparison(G1, G2, "<", paper="5.761 vs 5.820"),
        Comparison(G2, G3, "<", paper="5.820 vs 6.016"),
        Comparison(G2, G4, "<", paper="5.820 vs 5.981"),
        Comparison(G2, G5, "<", paper="5.820 vs 6.017"),
        Comparison(G3, BASELINE, "≈", paper="-0.010"),
        Comparison(G4, BASELINE, "≈", paper="-0.045"),
        Comparison(G5, BASELINE, "≈", paper="-0.009"))),
    Trend("2", "the gate beats parameter-matched capacity (Table 1 rows 2-4)", (
        Comparison(G1_HEADWISE, "baseline_kv8", "<", paper="5.792 vs 5.979"),
        Comparison(G1_HEADWISE, "baseline_q48", "<", paper="5.792 vs 5.953"),
        Comparison(G1_HEADWISE, "baseline_add4experts", "<", paper="5.792 vs 5.964"),
        Comparison(G1_HEADWISE, "baseline_ffn_kv8params", "<", paper="(our control)"),
        Comparison(G1, "baseline_q48", "<", paper="5.761 vs 5.953, equal added parameters"))),
    Trend("3", "head-specific matters more than granularity (Tables 1, 4)", (
        Comparison(G1_HEADWISE, G1, "≈", paper="5.792 vs 5.761"),
        Comparison(G1, G1_HEADSHARED, "<", paper="5.761 vs 5.801"),
        Comparison(G1, G1_HEADSHARED, "<", GATE, paper="gate mean 0.116 vs 0.271"),
        Comparison(G1, G1_HEADSHARED, "<", FATTN, paper="F-Attn 0.048 vs 0.301"),
        Comparison(G2_HEADWISE, G2_HEADSHARED, "<", paper="5.808 vs 5.867"))),
    Trend("4", "multiplicative sigmoid > additive SiLU ≈ multiplicative SiLU (Table 1)", (
        Comparison(G1, SILU_ADD, "<", paper="5.761 vs 5.821"),
        Comparison(G1, SILU_MUL, "<", paper="5.761 vs 5.822"),
        Comparison(SILU_ADD, SILU_MUL, "≈", paper="5.821 vs 5.822"))),
    Trend("5", "non-linearity alone helps, less than the gate (Table 3)", (
        Comparison(RMSNORM, BASELINE, "<", paper="-0.179"),
        Comparison(G1, RMSNORM, "<", paper="5.761 vs 5.847"),
        Comparison(IDENTITY_ADD, BASELINE, "<", paper="-0.144"),
        Comparison(SILU_NOPARAM, BASELINE, "<", paper="-0.051"))),
    Trend("6", "sparsity and query dependence matter; the gate-mean ordering (Table 4)", (
        Comparison(G1, INPUT_INDEPENDENT, "<", paper="5.761 vs 5.917"),
        Comparison(G1, NS_SIGMOID, "<", paper="5.761 vs 5.900"),
        Comparison(G1, G1_HEADWISE, "<", GATE, paper="0.116 vs 0.172"),
        Comparison(G1_HEADWISE, G2, "<", GATE, paper="0.172 vs 0.221"),
        Comparison(G2, G1_HEADSHARED, "<", GATE, paper="0.221 vs 0.271"),
        Comparison(G1_HEADSHARED, INPUT_INDEPENDENT, "<", GATE, paper="0.271 vs 0.335"),
        Comparison(INPUT_INDEPENDENT, NS_SIGMOID, "<", GATE, paper="0.335 vs 0.653"))),
    Trend("7", "the attention sink is removed by G1 only (Table 4, F-Attn)",
          _sink_comparisons(FATTN, ("0.048 vs 0.467", "0.073 vs 0.467", "0.048 vs 0.297",
                                    "0.048 vs 0.364", "0.048 vs 0.451")),
          Premise(metric("sink/head_share"), 0.0, "sink in the baseline (Gu et al.: no head's "
                  "mean attention to position 0 exceeds 0.3 on the BOS windows)")),
    Trend("7s", "the same on 64-token windows (`sink/*_short`)",
          _sink_comparisons(metric("sink/head_share_short"), ("(Gu et al.)",) + ("",) * 4),
          Premise(metric("sink/head_share_short"), 0.0, "sink in the baseline on 64-token "
                  "windows (no head's mean attention to position 0 exceeds 0.3)")),
    Trend("8", "massive activations are reduced (Table 4, M-Act)", (
        Comparison(G1, BASELINE, "<", MACT, paper="94 vs 1053"),
        Comparison(G1_HEADWISE, BASELINE, "<", MACT, paper="98 vs 1053"),
        Comparison(G2, BASELINE, "<", MACT, paper="125 vs 1053"),
        Comparison(G1, G1_HEADSHARED, "<", MACT, paper="94 vs 286"),
        Comparison(G1, INPUT_INDEPENDENT, "<", MACT, paper="94 vs 471"),
        Comparison(G1, NS_SIGMOID, "<", MACT, paper="94 vs 892"))),
    Trend("9", "gated SDPA outputs are small and sparse (§5.1)", (
        Comparison(G1, G1, "<", metric("sdpa/abs_mean_gated"), metric("sdpa/abs_mean"),
                   paper="0.05 vs 0.71"),
        Comparison(G1, G1, ">", metric("sdpa/sparsity_1e-2_gated"),
                   metric("sdpa/sparsity_1e-2_average_gate"),
                   paper="sparser than a constant scaling of the same mean"))),
    Trend("11", "stability: no spikes, and more LR headroom with the gate (Table 2, §4.5)", (
        Comparison(G1, BASELINE, "<", metric("spikes/count"), paper="0 vs about 12"),
        Comparison(G1_HEADWISE, BASELINE, "<", metric("spikes/count")),
        Comparison(G1, BASELINE, ">", max_stable_lr, paper="8e-3 trains, the baseline not"),
        Comparison(G1_HEADWISE, BASELINE, ">", max_stable_lr)),
        Premise(broke, 0.0, "breaking point: no baseline run diverged or spiked at any LR")),
    Trend("12", "length extrapolation: PPL beyond the trained length (Table 5)", (
        Comparison(G1, BASELINE, "<", ratio("long/ppl_8x", "long/ppl_1x"), paper="RULER"),
        Comparison(G1, BASELINE, "<", ratio("long/ppl_8x_yarn", "long/ppl_1x"), paper="YaRN"),
        Comparison(G1_HEADWISE, BASELINE, "<", ratio("long/ppl_8x", "long/ppl_1x")),
        Comparison(G1_HEADWISE, BASELINE, "<", ratio("long/ppl_8x_yarn", "long/ppl_1x")))),
    Trend("13", "Switch Head's gain comes from the gate (Table 6)", (
        Comparison("switchhead_v_1top1", "switchhead_v_4top4", "<", paper="5.808 vs 5.820"),
        Comparison("switchhead_v_1top1", "switchhead_kv_8top8", "<", paper="5.808 vs 5.847"))),
    Trend("14", "the gate must be there from scratch (NeurIPS A.7)", (
        Comparison(G1, "sdpa_gate_added_in_continued_training", "<"),
        Comparison(G1, "sdpa_gate_added_in_continued_training", "<", FATTN))),
)


@dataclass
class Outcome:
    comparison: Comparison
    difference: Interval | None
    verdict: str


@dataclass
class TrendResult:
    trend: Trend
    outcomes: list[Outcome]
    verdict: str


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


def compare(comparison: Comparison, rows: dict[str, Row], ladders: dict[str, list[Row]],
            equivalence_percent: float) -> Outcome:
    if comparison.left not in rows or comparison.right not in rows:
        return Outcome(comparison, None, "not in this grid")
    right_measure = comparison.right_measure or comparison.measure
    left = comparison.measure(rows[comparison.left], ladders[comparison.left])
    right = right_measure(rows[comparison.right], ladders[comparison.right])
    seeds = sorted(set(left) & set(right))
    difference = t_interval([left[s] - right[s] for s in seeds])
    band = equivalence_percent / 100 * abs(sum(right[s] for s in seeds) / len(seeds)) \
        if seeds else 0.0
    return Outcome(comparison, difference, judge(difference, comparison.expect, band))


def evaluate(rows: list[Row], all_rows: list[Row],
             equivalence_percent: float = EQUIVALENCE_PERCENT) -> list[TrendResult]:
    """Every trend on a grid's rows (one per variant at its best LR) and every (variant, LR)."""
    by_variant = {row.variant: row for row in rows}
    ladders: dict[str, list[Row]] = {}
    for row in all_rows:
        ladders.setdefault(row.variant, []).append(row)
    results = []
    for trend in TRENDS:
        outcomes = [compare(c, by_variant, ladders, equivalence_percent)
                    for c in trend.comparisons]
        results.append(TrendResult(trend, outcomes, _verdict(trend, outcomes, by_variant,
                                                             ladders)))
    return results


def _verdict(trend: Trend, outcomes: list[Outcome], rows: dict[str, Row],
             ladders: dict[str, list[Row]]) -> str:
    counts = {v: sum(o.verdict == v for o in outcomes)
              for v in ("as the paper", "opposite", "unresolved", "one seed")}
    tested = counts["as the paper"] + counts["opposite"] + counts["unresolved"]
    if not tested and not counts["one seed"]:
        return "not in this grid"
    if trend.premise is not None and BASELINE in rows:
        values = trend.premise.measure(rows[BASELINE], ladders[BASELINE])
        if values and max(values.values()) <= trend.premise.floor:
            return (f"not testable here: no {trend.premise.missing}; the baseline's "
                    f"{trend.premise.measure.label}: at most {max(values.values()):.3g} "
                    f"over {len(values)} seeds")
    if not tested:
        return "one seed only"
    if counts["as the paper"] == tested:
        return "holds"
    if counts["opposite"] == tested:
        return "does not hold"
    if counts["unresolved"] == tested:
        return "unresolved (every interval spans the paper's side and the other)"
    return (f"partly: {counts['as the paper']} of {tested} as the paper, "
            f"{counts['opposite']} opposite, {counts['unresolved']} unresolved")


def markdown(results: list[TrendResult], equivalence_percent: float = EQUIVALENCE_PERCENT,
             ) -> str:
    """The verdicts, then every comparison this grid could make, with its interval."""
    lines = ["| # | the paper's trend | verdict here |", "|---|---|---|"]
    lines += [f"| {r.trend.number} | {r.trend.claim} | {r.verdict} |" for r in results]
    lines += ["", f"Each comparison: the paired difference left - right over seeds, its 95% "
              f"t interval, and the side the paper puts it on ('≈': within "
              f"±{equivalence_percent:g}% of the right side's mean).", "",
              "| # | comparison | measure | paper | Δ (mean) | 95% CI | seeds | outcome |",
              "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for o in result.outcomes:
            if o.verdict == "not in this grid":
                continue
            c, d = o.comparison, o.difference
            measure = c.measure.label if c.right_measure is None else "(two measures)"
            ci = "-" if d.low is None else f"[{d.low:+.4g}, {d.high:+.4g}]"
            lines.append(f"| {result.trend.number} | {c.label} | {measure} | {c.paper or '-'} "
                         f"| {d.mean:+.4g} | {ci} | {d.n} | {o.verdict} |")
    return "\n".join(lines)


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
    for n, trend in enumerate(TRENDS):
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

