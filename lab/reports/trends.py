"""The paper's trends (../shared/paper/GATED_ATTENTION.md §6; docs/paper.md §10) as paired
tests on a grid's runs: the verdicts `gatelab report` prints under its table.

Each trend is a few comparisons. A comparison takes one measure of two variants (or two
measures of two variants), per seed, and its paired difference `left - right` with a 95% t
interval over seeds (the same seed gives both the same data order and the same draw of the
shared weights: lab/reports/grid_report.py). The stability comparisons pair by LR and seed
instead: one pair per rung of the LR ladder and seed that both variants ran. The paper
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

**Power line.** Each comparison also gives its paired standard deviation and the seeds that
would resolve the paper's effect at that spread: the smallest n at which a paired t test at
`ALPHA` two-sided has power `POWER` (noncentral t) against the paper's effect, taken as the
paper's relative difference between the two sides (left over right, minus 1) times our
right side's mean. For '≈', the n at which the 95% half-width at this spread fits in the band.
The paper's numbers come from its dense Table 2 for dense presets where it has both sides
(PAPER_DENSE_TABLE of lab/model/variants.py), else from its MoE tables (Tables 1, 3, 4); the
row says which. For the Gu share, which the paper does not measure, its F-Attn sets the
relative effect.

Trend 10 ("the gains hold across settings") is read across grids (docs/results.md), so no
single grid's report judges it. The band of '≈' is our choice: the paper calls headwise
(-0.234) and elementwise (-0.265) "close", 0.5% of its baseline PPL apart, against a gain of
4.4%. 1% by default; `gatelab report --equivalence-percent` changes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from lab.model.variants import VARIANTS
from lab.reports.seeds import BASELINE, CONFIDENCE, Interval, Row, t_interval

EQUIVALENCE_PERCENT = 1.0
ALPHA = 1 - CONFIDENCE   # the test level, the same as the intervals' 95%
POWER = 0.8
# The least share of the baseline's heads over 0.3 on position 0 that counts as a sink: above
# the near-zero shares of Gu et al.'s settings without a sink, below the 18% of their 60M
# default (ICLR 2025, "When attention sink emerges in language models", Sink^0.3 on 64-token
# windows). At `small` (36 heads) it takes two heads, at `base` (96 heads) five.
SINK_FLOOR = 0.05
# "Broke" on an LR ladder: diverged, or, above the variant's best rung (lowest mean final
# loss), a final validation loss this many nats above that rung's mean; `gatelab report
# --broke-margin`.
# 0.1 nats is 10.5% in PPL, more than the 0.06 between two neighbouring rungs of a healthy
# ladder (docs/results.md) and less than the 0.21 of the paper's 48-layer baseline at LR
# 8e-3 against 4e-3 (Table 2 rows 5-6).
BROKE_MARGIN = 0.1
SEEDS_LIMIT = 1000  # the power line says "> 1000" beyond

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

PerSeed = dict  # seed (or (lr, seed) for the ladder measures) -> value


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


# --- the LR ladder: runs paired by (LR, seed) --------------------------------------------

def on_ladder(name: str, log10: bool = False) -> Callable[[Row, list[Row]], PerSeed]:
    """A metric of every run of the ladder, keyed by (LR, seed), so that two variants pair at
    the same LR and seed (the paper's Table 2 sets models side by side at one LR). The final
    loss of a diverged run is left out (its breaking counts in `broke`)."""
    def measure(row: Row, ladder: list[Row]) -> PerSeed:
        out = {}
        for rung in ladder:
            for run in rung.runs:
                value = run.metrics.get(name)
                if value is None or not math.isfinite(value) or (run.diverged and "loss" in name):
                    continue
                if log10:
                    if value <= 0:
                        continue
                    value = math.log10(value)
                out[(rung.lr, run.seed)] = value
        return out
    measure.label = f"log10 {name}, by LR and seed" if log10 else f"{name}, by LR and seed"
    return measure


def broken_runs(ladder: list[Row], margin: float = BROKE_MARGIN) -> dict[tuple[float, int], bool]:
    """(LR, seed) -> whether that run broke: it diverged, or, at an LR above the variant's best
    rung (lowest mean final validation loss), its final loss is more than `margin` nats above
    that rung's mean. (Below the best rung a worse loss is under-training, not breaking.)"""
    finals = {rung.lr: [r.metrics["val/final_loss"] for r in rung.runs if not r.diverged
                        and math.isfinite(r.metrics.get("val/final_loss", math.nan))]
              for rung in ladder}
    means = {lr: float(np.mean(v)) for lr, v in finals.items() if v}
    best_lr = min(means, key=means.get, default=None)
    out = {}
    for rung in ladder:
        for run in rung.runs:
            final = run.metrics.get("val/final_loss")
            worse = best_lr is not None and rung.lr > best_lr and final is not None \
                and final > means[best_lr] + margin
            out[(rung.lr, run.seed)] = run.diverged or worse
    return out


def largest_stable_lr(ladder: list[Row], margin: float = BROKE_MARGIN,
                      min_seeds: int = 2) -> float | None:
    """The largest LR of the ladder at which at least `min_seeds` seeds ran and none broke."""
    broken = broken_runs(ladder, margin)
    stable = [rung.lr for rung in ladder if len(rung.runs) >= min_seeds
              and not any(broken[(rung.lr, run.seed)] for run in rung.runs)]
    return max(stable, default=None)


def max_stable_lr(margin: float = BROKE_MARGIN) -> Callable[[Row, list[Row]], PerSeed]:
    """Per seed, log10 of the largest LR of the ladder at which that seed's run did not
    break (the paper's Table 2: the baseline breaks at LRs where the gate trains). A seed that
    broke at every LR counts one step of the ladder below its lowest LR, so that it stays in
    the pairing instead of dropping out of it."""
    def measure(row: Row, ladder: list[Row]) -> PerSeed:
        best: PerSeed = {}
        lrs = sorted({rung.lr for rung in ladder})
        if len(lrs) < 2:
            return best  # one LR: no ladder to find a breaking point on
        below = 2 * math.log10(lrs[0]) - math.log10(lrs[1])
        for (lr, seed), broke in broken_runs(ladder, margin).items():
            best[seed] = max(best.get(seed, -math.inf), below if broke else math.log10(lr))
        return best
    measure.label = "log10 max LR that did not break"
    return measure


def broke_or_spiked(margin: float = BROKE_MARGIN) -> Callable[[Row, list[Row]], PerSeed]:
    """Per seed, 1 where a run of that seed broke or spiked at some LR of the ladder."""
    def measure(row: Row, ladder: list[Row]) -> PerSeed:
        broken = broken_runs(ladder, margin)
        out: PerSeed = {}
        for rung in ladder:
            for run in rung.runs:
                hit = broken[(rung.lr, run.seed)] or run.metrics.get("spikes/count", 0) > 0
                out[run.seed] = max(out.get(run.seed, 0.0), float(hit))
        return out
    measure.label = "runs that broke or spiked"
    return measure


# --- comparisons and trends ----------------------------------------------------------------

def sink_premise(measure_label: str) -> str | None:
    """The baseline's measure that must show a sink for a comparison on `measure_label` to
    count (rule 1 above), or None for a measure that is not a sink measure."""
    if not measure_label.startswith(("sink/first_token_attn", "sink/head_share")):
        return None
    return "sink/head_share_short_random" if measure_label.endswith("_random") \
        else "sink/head_share_short"


@dataclass(frozen=True)
class Comparison:
    left: str
    right: str
    expect: str                          # '<', '>' or '≈' for left - right
    measure: Callable = metric("val/ppl")
    right_measure: Callable | None = None  # another measure of the right variant
    paper: str = ""                       # what the paper says, where no registry number does

    @property
    def label(self) -> str:
        if self.right_measure is None:
            return f"{short(self.left)} {self.expect} {short(self.right)}"
        right = "" if self.right == self.left else f"{short(self.right)} "
        return (f"{short(self.left)} {self.measure.label} {self.expect} "
                f"{right}{self.right_measure.label}")

    @property
    def key(self) -> tuple:
        """The comparison's identity: trends that share one test it once."""
        return (self.left, self.right, self.expect, self.measure.label,
                self.right_measure.label if self.right_measure else None)

    @property
    def premise(self) -> str | None:
        labels = [self.measure.label] + ([self.right_measure.label] if self.right_measure else [])
        return next((p for p in map(sink_premise, labels) if p), None)


# The registry field (lab/model/variants.py) that holds the paper's number for a measure.
PAPER_FIELDS = {"val/ppl": "paper_ppl", "gate/mean": "paper_gate_mean",
                "sink/first_token_attn": "paper_first_token_attn",
                "act/max_mean": "paper_max_activation"}


def paper_values(comparison: Comparison, dense: bool) -> tuple[float, float, str] | None:
    """(the paper's left, right, which table) for a comparison of one measure between two
    registry variants; for a sink share, the paper's F-Attn (the only sink measure it has)."""
    if comparison.right_measure is not None:
        return None
    label = comparison.measure.label
    name = "paper_first_token_attn" if sink_premise(label) else PAPER_FIELDS.get(label)
    left, right = VARIANTS.get(comparison.left), VARIANTS.get(comparison.right)
    if name is None or left is None or right is None:
        return None
    if name == "paper_ppl" and dense and left.paper_dense_ppl and right.paper_dense_ppl:
        return left.paper_dense_ppl, right.paper_dense_ppl, "dense, Table 2"
    a, b = getattr(left, name), getattr(right, name)
    if a is None or b is None:
        return None
    return a, b, ("MoE, Table 4 F-Attn" if name == "paper_first_token_attn" and
                  label != "sink/first_token_attn" else "MoE")


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
GU_SHARE = metric("sink/head_share_short")                # 64-token windows opening with BOS
GU_SHARE_NO_BOS = metric("sink/head_share_short_random")  # 64-token windows without BOS


def _sink_comparisons(measure: Callable) -> tuple[Comparison, ...]:
    """Trend 7's pairs: both G1 gates below the baseline, and G1 below the gates that keep
    the sink in the paper (value, input-independent, NS-sigmoid)."""
    pairs = ((G1, BASELINE), (G1_HEADWISE, BASELINE), (G1, G2), (G1, INPUT_INDEPENDENT),
             (G1, NS_SIGMOID))
    return tuple(Comparison(left, right, "<", measure) for left, right in pairs)


def _stability(margin: float) -> tuple[Comparison, ...]:
    """Trend 11's pairs, for each G1 gate against the baseline: spikes, the largest gradient
    norm (log10: excursions are multiplicative, 0.3 against 42 in the probe of
    docs/results.md) and the final loss, paired at the same LR and seed over the ladder; and
    the largest LR that did not break, paired by seed."""
    out = []
    for gate in (G1, G1_HEADWISE):
        out += [Comparison(gate, BASELINE, "<", on_ladder("spikes/count"),
                           paper="no spikes against about 12 above 0.5 nats (§7.5)"),
                Comparison(gate, BASELINE, "<", on_ladder("train/grad_norm_max", log10=True)),
                Comparison(gate, BASELINE, "<", on_ladder("val/final_loss"),
                           paper="7.325 vs 9.195 at LR 8e-3 (Table 2 rows 6, 10)"),
                Comparison(gate, BASELINE, ">", max_stable_lr(margin),
                           paper="8e-3 trains, the baseline breaks (Table 2)")]
    return tuple(out)


def build_trends(broke_margin: float = BROKE_MARGIN) -> tuple[Trend, ...]:
    return (
        Trend("1", "position ranking: G1 > G2 >> G4 ≈ G3 ≈ G5 ≈ no gate (Table 1)", (
            Comparison(G1, BASELINE, "<"),
            Comparison(G2, BASELINE, "<"),
            Comparison(G1, G2, "<"),
            Comparison(G2, G3, "<"),
            Comparison(G2, G4, "<"),
            Comparison(G2, G5, "<"),
            Comparison(G3, BASELINE, "≈"),
            Comparison(G4, BASELINE, "≈"),
            Comparison(G5, BASELINE, "≈"))),
        Trend("2", "the gate beats parameter-matched capacity (Table 1 rows 2-4)", (
            Comparison(G1_HEADWISE, "baseline_kv8", "<"),
            Comparison(G1_HEADWISE, "baseline_q48", "<"),
            Comparison(G1_HEADWISE, "baseline_add4experts", "<"),
            Comparison(G1_HEADWISE, "baseline_ffn_kv8params", "<", paper="(our control)"),
            Comparison(G1, "baseline_q48", "<"))),
        Trend("3", "head-specific matters more than granularity (Tables 1, 4)", (
            Comparison(G1_HEADWISE, G1, "≈"),
            Comparison(G1, G1_HEADSHARED, "<"),
            Comparison(G1, G1_HEADSHARED, "<", GATE),
            Comparison(G1, G1_HEADSHARED, "<", FATTN),
            Comparison(G2_HEADWISE, G2_HEADSHARED, "<"))),
        Trend("4", "multiplicative sigmoid > additive SiLU ≈ multiplicative SiLU (Table 1)", (
            Comparison(G1, SILU_ADD, "<"),
            Comparison(G1, SILU_MUL, "<"),
            Comparison(SILU_ADD, SILU_MUL, "≈"))),
        Trend("5", "non-linearity alone helps, less than the gate (Table 3)", (
            Comparison(RMSNORM, BASELINE, "<"),
            Comparison(G1, RMSNORM, "<"),
            Comparison(IDENTITY_ADD, BASELINE, "<"),
            Comparison(SILU_NOPARAM, BASELINE, "<"))),
        Trend("6", "sparsity and query dependence matter; the gate-mean ordering (Table 4)", (
            Comparison(G1, INPUT_INDEPENDENT, "<"),
            Comparison(G1, NS_SIGMOID, "<"),
            Comparison(G1, G1_HEADWISE, "<", GATE),
            Comparison(G1_HEADWISE, G2, "<", GATE),
            Comparison(G2, G1_HEADSHARED, "<", GATE),
            Comparison(G1_HEADSHARED, INPUT_INDEPENDENT, "<", GATE),
            Comparison(INPUT_INDEPENDENT, NS_SIGMOID, "<", GATE))),
        Trend("7", "the attention sink is removed by G1 only (§5; measured as Gu et al.'s "
              "Sink^0.3 share on 64-token windows, with BOS and without)",
              _sink_comparisons(GU_SHARE) + (Comparison(G1, BASELINE, "<", GU_SHARE_NO_BOS),
                                             Comparison(G1_HEADWISE, BASELINE, "<",
                                                        GU_SHARE_NO_BOS))),
        Trend("7f", "the same on F-Attn, 1,024-token BOS windows (Table 4's measure)",
              _sink_comparisons(FATTN)),
        Trend("8", "massive activations are reduced (Table 4, M-Act)", (
            Comparison(G1, BASELINE, "<", MACT),
            Comparison(G1_HEADWISE, BASELINE, "<", MACT),
            Comparison(G2, BASELINE, "<", MACT),
            Comparison(G1, G1_HEADSHARED, "<", MACT),
            Comparison(G1, INPUT_INDEPENDENT, "<", MACT),
            Comparison(G1, NS_SIGMOID, "<", MACT))),
        # Not "gated |Y'| below pre-gate |Y|" in one model: a sigmoid below 1 makes it true
        # by construction. Against the ungated baseline's SDPA output it can fail (the model
        # can grow Y to undo the gate), and the sparsity is set against a constant scaling of
        # the same mean, which shrinks values as much on average.
        Trend("9", "gated SDPA outputs are small and sparse (§5.1)", (
            Comparison(G1, BASELINE, "<", metric("sdpa/abs_mean_gated"), metric("sdpa/abs_mean"),
                       paper="mean |Y'| 0.05 (§5.1)"),
            Comparison(G1, G1, ">", metric("sdpa/sparsity_1e-2_gated"),
                       metric("sdpa/sparsity_1e-2_average_gate"),
                       paper="sparser than a constant scaling of the same mean"),
            Comparison(G1_HEADWISE, G1_HEADWISE, ">", metric("sdpa/sparsity_1e-2_gated"),
                       metric("sdpa/sparsity_1e-2_average_gate")))),
        Trend("11", "stability: fewer spikes, smaller gradient excursions, lower loss and more "
              "LR headroom with the gate (Table 2, §7.4-7.5)", _stability(broke_margin),
              Premise(broke_or_spiked(broke_margin), 0.0,
                      f"breaking point (no baseline run diverged, ended more than "
                      f"{broke_margin:g} nats above its best rung, or spiked, at any LR)")),
        Trend("12", "length extrapolation: PPL beyond the trained length (Table 5)", (
            Comparison(G1, BASELINE, "<", ratio("long/ppl_8x", "long/ppl_1x"), paper="RULER"),
            Comparison(G1, BASELINE, "<", ratio("long/ppl_8x_yarn", "long/ppl_1x"),
                       paper="YaRN"),
            Comparison(G1_HEADWISE, BASELINE, "<", ratio("long/ppl_8x", "long/ppl_1x")),
            Comparison(G1_HEADWISE, BASELINE, "<", ratio("long/ppl_8x_yarn", "long/ppl_1x")))),
        Trend("13", "Switch Head's gain comes from the gate (Table 6)", (
            Comparison("switchhead_v_1top1", "switchhead_v_4top4", "<"),
            Comparison("switchhead_v_1top1", "switchhead_kv_8top8", "<"))),
        Trend("14", "the gate must be there from scratch (NeurIPS A.7)", (
            Comparison(G1, "sdpa_gate_added_in_continued_training", "<"),
            Comparison(G1, "sdpa_gate_added_in_continued_training", "<", FATTN))),
    )


TRENDS = build_trends()

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
    if not family:
        return
    adjusted = dict(zip(family, stats.false_discovery_control(list(family.values()),
                                                              method="bh")))
    for o in outcomes:
        if o.p_value is None:
            continue
        o.p_adjusted = float(adjusted[o.comparison.key])
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

