"""lab/reports/trends.py: the paper's trends as paired tests over seeds, on made-up runs
whose intervals are worked out here by hand (no training)."""

from __future__ import annotations

import math

import pytest

from gridkit import store  # noqa: F401 (fixture)
from lab.reports import trends
from lab.reports.seeds import Interval, Row, RunRecord, t_interval

T_975_DF2 = 4.302652729911275  # two-sided 95% t quantile, 2 degrees of freedom


def rows_of(values: dict[tuple[str, float], list[dict]]) -> tuple[list[Row], list[Row]]:
    """(best rows, every row) from {(variant, lr): [metrics of seed 0, 1, ...]}; the best LR
    of a variant is the one with the lowest mean val/ppl among its undiverged runs."""
    all_rows = []
    for (variant, lr), per_seed in values.items():
        runs = [RunRecord(f"{variant}-{lr}-{seed}", variant, lr, seed, metrics,
                          diverged=metrics.get("diverged", False))
                for seed, metrics in enumerate(per_seed)]
        all_rows.append(Row(variant, lr, runs,
                            t_interval([r.val_ppl for r in runs if r.val_ppl is not None])))
    best = {}
    for row in all_rows:
        score = row.ppl.mean if row.ppl else math.inf
        if row.variant not in best or score < (best[row.variant].ppl.mean if best[row.variant].ppl
                                                else math.inf):
            best[row.variant] = row
    return list(best.values()), all_rows


def outcome(results, number: str, label: str, measure: str = "val/ppl"):
    trend = next(r for r in results if r.trend.number == number)
    return next(o for o in trend.outcomes
                if o.comparison.label == label and o.comparison.measure.label == measure)


def verdict(results, number: str) -> str:
    return next(r.verdict for r in results if r.trend.number == number)


def test_judge_reads_the_interval_against_the_papers_side():
    def interval(low, high):
        return Interval((low + high) / 2, 1.0, low, high, 3)

    assert trends.judge(interval(-2.0, -0.1), "<", 0.1) == "as the paper"
    assert trends.judge(interval(0.1, 2.0), "<", 0.1) == "opposite"
    assert trends.judge(interval(-1.0, 1.0), "<", 0.1) == "unresolved"
    assert trends.judge(interval(0.1, 2.0), ">", 0.1) == "as the paper"
    assert trends.judge(interval(-2.0, -0.1), ">", 0.1) == "opposite"
    # '≈': inside the band, wholly outside it, or neither.
    assert trends.judge(interval(-0.05, 0.08), "≈", 0.1) == "as the paper"
    assert trends.judge(interval(0.2, 0.5), "≈", 0.1) == "opposite"
    assert trends.judge(interval(0.05, 0.5), "≈", 0.1) == "unresolved"
    assert trends.judge(Interval(-1.0, None, None, None, 1), "<", 0.1) == "one seed"
    assert trends.judge(None, "<", 0.1) == "not in this grid"


def test_paired_differences_verdicts_and_the_baselines_premise():
    base = [{"val/ppl": p, "sink/head_share": 0.0, "sink/first_token_attn": 0.02,
             "act/max_mean": a} for p, a in ((10.0, 300.0), (10.4, 320.0), (10.2, 310.0))]
    g1 = [{"val/ppl": p, "sink/head_share": 0.0, "sink/first_token_attn": 0.01,
           "act/max_mean": a} for p, a in ((9.5, 100.0), (9.8, 110.0), (9.9, 90.0))]
    headwise = [{"val/ppl": p} for p in (9.55, 9.85, 9.95)]   # G1 + 0.05 in every seed
    value = [{"val/ppl": p} for p in (9.0, 10.6, 9.1)]       # G1 - (0.5, -0.8, 0.8)
    rows, all_rows = rows_of({("baseline", 3e-3): base,
                              (trends.G1, 3e-3): g1,
                              (trends.G1_HEADWISE, 3e-3): headwise,
                              (trends.G2, 3e-3): value})
    results = trends.evaluate(rows, all_rows)

    # G1 - baseline per seed: (-0.5, -0.6, -0.3), its 95% t interval by hand.
    first = outcome(results, "1", "G1 elementwise < baseline")
    std = 0.1527525
    half = T_975_DF2 * std / math.sqrt(3)
    assert first.difference.mean == pytest.approx(-1.4 / 3)
    assert (first.difference.low, first.difference.high) == pytest.approx(
        (-1.4 / 3 - half, -1.4 / 3 + half), rel=1e-6)
    assert first.verdict == "as the paper"
    # G1 - G2 (+0.5, -0.8, +0.8) and G2 - baseline (-1.0, +0.2, -1.1) span zero; key, query
    # and dense-out are not in this grid.
    assert outcome(results, "1", "G1 elementwise < G2 value").verdict == "unresolved"
    assert outcome(results, "1", "G2 value < baseline").verdict == "unresolved"
    assert outcome(results, "1", "G3 key ≈ baseline").verdict == "not in this grid"
    assert verdict(results, "1") == "partly: 1 of 3 as the paper, 0 opposite, 2 unresolved"

    # Headwise - elementwise is +0.05 in every seed: a zero-width interval at +0.05, inside
    # a 1% band of G1's mean (0.097) but outside a 0.1% one.
    close = outcome(results, "3", "G1 headwise ≈ G1 elementwise")
    assert close.difference.mean == pytest.approx(0.05) and close.verdict == "as the paper"
    narrow = trends.evaluate(rows, all_rows, equivalence_percent=0.1)
    assert outcome(narrow, "3", "G1 headwise ≈ G1 elementwise").verdict == "opposite"

    # M-Act: (-200, -210, -220) per seed.
    assert outcome(results, "8", "G1 elementwise < baseline", "act/max_mean").verdict \
        == "as the paper"
    # No head of the baseline passes 0.3 on position 0: the sink trend is not testable,
    # whatever the comparisons say.
    assert verdict(results, "7").startswith("not testable here: no sink in the baseline")
    assert verdict(results, "13") == "not in this grid"

    base[1]["sink/head_share"] = 0.25
    rows, all_rows = rows_of({("baseline", 3e-3): base, (trends.G1, 3e-3): g1})
    assert not verdict(trends.evaluate(rows, all_rows), "7").startswith("not testable")


def test_lr_headroom_over_a_ladder():
    """The baseline diverges at 1e-1 in seeds 0 and 1 and at 3e-1 in seed 2; G1 trains at
    every LR: log10 headroom per seed (log10 0.3 - log10 0.03, twice, then - log10 0.1)."""
    def ladder(broken_from: list[float]) -> dict:
        out = {}
        for lr in (3e-2, 1e-1, 3e-1):
            out[lr] = [{"val/ppl": 10.0 + lr, "diverged": lr >= first, "spikes/count": 0}
                       for first in broken_from]
        return out

    values = {("baseline", lr): runs for lr, runs in ladder([1e-1, 1e-1, 3e-1]).items()}
    values |= {(trends.G1, lr): runs for lr, runs in ladder([1.0, 1.0, 1.0]).items()}
    rows, all_rows = rows_of(values)
    results = trends.evaluate(rows, all_rows)
    headroom = outcome(results, "11", "G1 elementwise > baseline",
                       "log10 max LR without divergence")
    gains = [math.log10(0.3) - math.log10(0.03)] * 2 + [math.log10(0.3) - math.log10(0.1)]
    assert headroom.difference.mean == pytest.approx(sum(gains) / 3)
    assert headroom.difference.n == 3
    # A seed that diverged at every LR sits one ladder step below the lowest LR.
    values = {("baseline", lr): runs for lr, runs in ladder([1e-1, 1e-1, 3e-2]).items()}
    values |= {(trends.G1, lr): runs for lr, runs in ladder([1.0, 1.0, 1.0]).items()}
    rows2, all_rows2 = rows_of(values)
    base_ladder = [r for r in all_rows2 if r.variant == "baseline"]
    below = 2 * math.log10(3e-2) - math.log10(1e-1)
    assert trends.max_stable_lr(base_ladder[0], base_ladder) == pytest.approx(
        {0: math.log10(3e-2), 1: math.log10(3e-2), 2: below})
    # The baseline broke, so the trend is testable; the spike counts (all 0) stay unresolved.
    assert verdict(results, "11").startswith("partly: 1 of 2 as the paper")
    # One LR only: no ladder, no headroom, and no breaking point to test against.
    rows, all_rows = rows_of({("baseline", 3e-3): [{"val/ppl": 10.0, "spikes/count": 0}] * 2,
                              (trends.G1, 3e-3): [{"val/ppl": 9.0, "spikes/count": 0}] * 2})
    results = trends.evaluate(rows, all_rows)
    assert outcome(results, "11", "G1 elementwise > baseline",
                   "log10 max LR without divergence").verdict == "not in this grid"
    assert verdict(results, "11").startswith("not testable here: no breaking point")


def test_report_prints_the_verdicts_and_checks_its_band(store, tmp_path, capsys):
    from test_report import write_grid

    from lab.cli import main

    write_grid(store)
    assert main(["report", "fake", "--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "  1. partly: 1 of 5 as the paper" in printed  # a line a verdict in the terminal
    assert max(len(line) for line in printed.splitlines()) <= 120
    trends_part = (tmp_path / "out" / "report.md").read_text().split("### The paper's trends")[1]
    assert "| 1 | G1 elementwise < baseline | val/ppl | -0.265 | -0.4667 |" in trends_part
    assert "| as the paper |" in trends_part
    assert main(["report", "fake", "--tracking-uri", store, "--equivalence-percent", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report: --equivalence-percent must be above 0, not 0" in err[0]


def test_across_grids_names_where_each_trend_holds():
    """Two scales: G1 beats the baseline in every seed at one and loses in every seed at the
    other; neither baseline has a sink."""
    def grid(g1: list[float]):
        base = [{"val/ppl": p, "sink/head_share": 0.0, "sink/first_token_attn": 0.02}
                for p in (10.0, 10.4, 10.2)]
        gated = [{"val/ppl": p, "sink/head_share": 0.0, "sink/first_token_attn": 0.01}
                 for p in g1]
        return trends.evaluate(*rows_of({("baseline", 3e-3): base, (trends.G1, 3e-3): gated}))

    text = trends.across({"small": grid([9.5, 9.8, 9.9]), "base": grid([10.5, 10.8, 10.9])})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert text.splitlines()[0] == "| # | the paper's trend | small | base | holds in |"
    assert lines["1"].endswith("| holds | does not hold | small |")
    assert lines["7"].endswith("| not testable here: no sink in the baseline (Gu et al.: no "
                               "head's mean attention to position 0 exceeds 0.3 on the BOS "
                               "windows) | not testable here: no sink in the baseline (Gu et "
                               "al.: no head's mean attention to position 0 exceeds 0.3 on "
                               "the BOS windows) | no grid tests it |")
    assert lines["13"].endswith("| not in this grid | not in this grid | no grid tests it |")
    both = trends.across({"a": grid([9.5, 9.8, 9.9]), "b": grid([9.6, 9.7, 9.8])})
    assert [line for line in both.splitlines() if line.startswith("| 1 |")][0].endswith(
        "| holds | holds | all 2 that test it |")


def test_report_of_several_grids_prints_the_verdicts_side_by_side(store, tmp_path, capsys,
                                                                  monkeypatch):
    from test_report import write_grid

    from lab.cli import main

    write_grid(store, "small")
    write_grid(store, "base")
    monkeypatch.chdir(tmp_path)  # (each report goes to reports/<grid>, the side-by-side beside)
    assert main(["report", "small", "base", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()  # a line a trend: the grids where it holds
    assert all(any(line.startswith(f"{t.number:>3}. ") for line in lines) for t in trends.TRENDS)
    assert "side by side, with each grid's verdict: reports/trends-small+base.md" in out
    assert max(len(line) for line in out.splitlines()) <= 120
    side_by_side = (tmp_path / "reports" / "trends-small+base.md").read_text()
    assert "## The paper's trends across these grids" in side_by_side
    assert "| # | the paper's trend | small | base | holds in |" in side_by_side
    assert main(["report", "small", "base", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    assert "--out takes one grid" in capsys.readouterr().err
