"""lab/reports/trends/: the paper's trends as paired tests over seeds, on made-up runs
whose intervals are worked out here by hand (no training)."""

from __future__ import annotations

import math

import pytest

from lab.reports.trends import definitions, measures, statistics, verdicts
from lab.reports.trends import table as trends_table
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


def test_the_trends_find_their_variants_in_the_registry_by_what_they_are():
    """A trend names each variant by its registry entry (its point of the gate space, its
    model settings, the paper's row), not by a re-spelled slug: a slug renamed in the
    registry is followed, a variant gone from it is an error, never a comparison that
    silently finds no runs."""
    from lab.model.gates import GateSpec
    from lab.model.variants import VARIANTS

    renamed = {("g1_renamed" if slug == definitions.G1 else slug): variant
               for slug, variant in VARIANTS.items()}
    assert definitions.variant_at(GateSpec(), variants=renamed) == "g1_renamed"
    assert definitions.variant_at(sdpa_transform="rmsnorm", variants=renamed) == \
        "sdpa_perhead_rmsnorm"
    assert definitions.variant_of_row("T1-2", renamed) == "baseline_kv8"
    without = {slug: v for slug, v in VARIANTS.items() if slug != definitions.G2}
    with pytest.raises(LookupError, match="0 registry variants are gate .*value.*: none"):
        definitions.variant_at(GateSpec(position="value"), variants=without)
    # The G1 gate inserted mid-training is the same gate point with one more model setting:
    # the lookup tells the two apart.
    assert definitions.G1 == "sdpa_elementwise_sigmoid_mul"
    assert definitions.GATE_ADDED_LATER == "sdpa_gate_added_in_continued_training"
    named = {side for trend in definitions.TRENDS for c in trend.comparisons
             for side in (c.left, c.right)}
    # the baseline, the 16 gates and nonlinearity controls, 4 capacity controls, 3 Switch Head
    # rows and the gate added later
    assert named <= set(VARIANTS) and len(named) == 25
    labels = {c.label for trend in definitions.TRENDS for c in trend.comparisons}
    assert "G2 value headwise < G2 value head-shared" in labels
    assert "G1 headwise < baseline_ffn_kv8params" in labels


def test_judge_reads_the_interval_against_the_papers_side():
    def interval(low, high):
        return Interval((low + high) / 2, 1.0, low, high, 3)

    assert statistics.judge(interval(-2.0, -0.1), "<", 0.1) == "as the paper"
    assert statistics.judge(interval(0.1, 2.0), "<", 0.1) == "opposite"
    assert statistics.judge(interval(-1.0, 1.0), "<", 0.1) == "unresolved"
    assert statistics.judge(interval(0.1, 2.0), ">", 0.1) == "as the paper"
    assert statistics.judge(interval(-2.0, -0.1), ">", 0.1) == "opposite"
    # '≈': inside the band, wholly outside it, or neither.
    assert statistics.judge(interval(-0.05, 0.08), "≈", 0.1) == "as the paper"
    assert statistics.judge(interval(0.2, 0.5), "≈", 0.1) == "opposite"
    assert statistics.judge(interval(0.05, 0.5), "≈", 0.1) == "unresolved"
    assert statistics.judge(Interval(-1.0, None, None, None, 1), "<", 0.1) == "one seed"
    assert statistics.judge(None, "<", 0.1) == "not in this grid"


def test_paired_differences_and_the_verdicts_after_adjustment():
    base = [{"val/ppl": p, "act/max_mean": a} for p, a in ((10.0, 300.0), (10.4, 320.0),
                                                           (10.2, 310.0))]
    g1 = [{"val/ppl": p, "act/max_mean": a} for p, a in ((9.5, 100.0), (9.8, 110.0),
                                                         (9.9, 90.0))]
    headwise = [{"val/ppl": p} for p in (9.55, 9.85, 9.95)]   # G1 + 0.05 in every seed
    value = [{"val/ppl": p} for p in (9.0, 10.6, 9.1)]       # G1 - (0.5, -0.8, 0.8)
    rows, all_rows = rows_of({("baseline", 3e-3): base,
                              (definitions.G1, 3e-3): g1,
                              (definitions.G1_HEADWISE, 3e-3): headwise,
                              (definitions.G2, 3e-3): value})
    results = verdicts.evaluate(rows, all_rows)

    # G1 - baseline per seed: (-0.5, -0.6, -0.3), its 95% t interval by hand.
    first = outcome(results, "1", "G1 elementwise < baseline")
    std = 0.1527525
    half = T_975_DF2 * std / math.sqrt(3)
    assert first.difference.mean == pytest.approx(-1.4 / 3)
    assert (first.difference.low, first.difference.high) == pytest.approx(
        (-1.4 / 3 - half, -1.4 / 3 + half), rel=1e-6)
    assert first.raw == "as the paper"
    # Its p value by hand: with 2 degrees of freedom P(|T| > t) = 1 - t / sqrt(2 + t^2).
    t = (1.4 / 3) / (std / math.sqrt(3))
    assert first.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-5)
    # G1 - G2 (+0.5, -0.8, +0.8) and G2 - baseline (-1.0, +0.2, -1.1) span zero; key, query
    # and dense-out are not in this grid.
    assert outcome(results, "1", "G1 elementwise < G2 value").verdict == "unresolved"
    assert outcome(results, "1", "G2 value < baseline").verdict == "unresolved"
    assert outcome(results, "1", "G3 key ≈ baseline").verdict == "not in this grid"

    # Headwise - elementwise is +0.05 in every seed: a zero-width interval at +0.05, inside
    # a 1% band of G1's mean (0.097) but outside a 0.1% one. '≈' is not adjusted.
    close = outcome(results, "3", "G1 headwise ≈ G1 elementwise")
    assert close.difference.mean == pytest.approx(0.05) and close.verdict == "as the paper"
    assert close.p_value is None and close.p_adjusted is None
    narrow = verdicts.evaluate(rows, all_rows, equivalence_percent=0.1)
    assert outcome(narrow, "3", "G1 headwise ≈ G1 elementwise").verdict == "opposite"

    # M-Act: (-200, -210, -220) per seed.
    assert outcome(results, "8", "G1 elementwise < baseline", "act/max_mean").verdict \
        == "as the paper"
    assert verdict(results, "13") == "not in this grid"


def test_a_trend_of_one_testable_comparison_cannot_hold():
    """Trend 8 here has one comparison (G1's M-Act below the baseline's, in every seed and
    clear of zero); the rest of its variants are not in the grid."""
    base = [{"val/ppl": 10.0, "act/max_mean": a} for a in (300.0, 320.0, 310.0)]
    g1 = [{"val/ppl": 9.0, "act/max_mean": a} for a in (100.0, 110.0, 90.0)]
    results = verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): g1}))
    assert outcome(results, "8", "G1 elementwise < baseline", "act/max_mean").verdict \
        == "as the paper"
    assert verdict(results, "8") == ("too few comparisons here: 1 of 1 as the paper, 0 "
                                     "opposite, 0 unresolved (adjusted)")
    # With a second comparison of the trend, also as the paper, it holds.
    headwise = [{"val/ppl": 9.0, "act/max_mean": a} for a in (120.0, 130.0, 100.0)]
    results = verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): g1,
                                        (definitions.G1_HEADWISE, 3e-3): headwise}))
    assert verdict(results, "8") == "holds"


def test_an_adjusted_away_comparison_flips_a_verdict():
    """Trend 2 (G1 headwise below the capacity controls) on two comparisons, each with p =
    0.0339 (the paired differences -0.5, -0.6, -0.3): alone, Benjamini-Hochberg leaves both
    at 0.0339 and the trend holds. A third comparison in the same report with a large p
    lifts both to 0.0339 x 3/2 = 0.0509 >= 0.05: unresolved, and so is the trend, while
    their raw outcomes stay "as the paper"."""
    control = [{"val/ppl": p} for p in (10.0, 10.4, 10.2)]
    headwise = [{"val/ppl": p} for p in (9.5, 9.8, 9.9)]
    t = (1.4 / 3) / (0.1527525 / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)
    grid = {("baseline_kv8", 3e-3): control, ("baseline_q48", 3e-3): control,
            (definitions.G1_HEADWISE, 3e-3): headwise}
    results = verdicts.evaluate(*rows_of(grid))
    kv8 = outcome(results, "2", "G1 headwise < baseline_kv8")
    assert kv8.p_adjusted == pytest.approx(p, rel=1e-5) and kv8.verdict == "as the paper"
    assert verdict(results, "2") == "holds"

    grid[("baseline_ffn_kv8params", 3e-3)] = [{"val/ppl": p} for p in (9.0, 10.7, 9.6)]
    results = verdicts.evaluate(*rows_of(grid))
    for label in ("G1 headwise < baseline_kv8", "G1 headwise < baseline_q48"):
        adjusted = outcome(results, "2", label)
        assert adjusted.raw == "as the paper" and adjusted.verdict == "unresolved"
        assert adjusted.p_adjusted == pytest.approx(p * 3 / 2, rel=1e-5)
    assert verdict(results, "2").startswith("unresolved")
    text = trends_table.markdown(results)
    assert "| 2 | G1 headwise < baseline_kv8 | val/ppl | 5.792 vs 5.979 (MoE) | -0.4667 | " \
           in text
    assert "| 3 | as the paper | unresolved | 0.0339 | 0.0509 | 0.153 |" in text
    assert "Benjamini-Hochberg over the 3 directional comparisons" in text


def test_the_power_line_against_hand_arithmetic():
    """Seeds for a paired t test at alpha 0.05 two-sided and power 0.8: Guenther's
    approximation n = (z_0.975 + z_0.8)^2 / d^2 + z_0.975^2 / 2 (d = effect / std) gives
    7.849 + 1.921 = 9.77 for d = 1 and 31.40 + 1.92 = 33.32 for d = 0.5, so 10 and 34
    (Cohen's tables agree); '≈': the n at which t_0.975(n-1) / sqrt(n) <= band / std, for
    band = std: 2.447 / sqrt(7) = 0.925 but 2.571 / sqrt(6) = 1.050, so 7."""
    assert statistics.seeds_for_effect(1.0, 1.0) == 10
    assert statistics.seeds_for_effect(-0.5, 1.0) == 34
    assert statistics.seeds_for_effect(0.5, 2.0) == statistics.seeds_for_effect(0.25, 1.0)
    assert statistics.seeds_for_effect(1e-4, 1.0) is None   # beyond the limit: "> 1000"
    assert statistics.seeds_for_band(1.0, 1.0) == 7

    # In a comparison: the paper's G1 against its baseline in the MoE table (an MoE preset)
    # is 5.761 / 6.026 - 1 = -4.40%, scaled to our baseline's mean 10.2: -0.4486; with the
    # paired std 0.1528, d = 2.94: 4 seeds (Guenther: 7.849 / 8.62 + 1.92 = 2.83, and the
    # exact t test needs one more at so few degrees of freedom).
    base = [{"val/ppl": p} for p in (10.0, 10.4, 10.2)]
    g1 = [{"val/ppl": p} for p in (9.5, 9.8, 9.9)]
    results = verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): g1}),
                              dense=False)
    first = outcome(results, "1", "G1 elementwise < baseline")
    assert first.paper == (5.761, 6.026, "MoE")
    assert first.effect == pytest.approx((5.761 / 6.026 - 1) * 10.2)
    assert first.seeds_needed == statistics.seeds_for_effect(first.effect, 0.1527525) == 4
    # A dense preset takes Table 2's 48-layer pair: 7.288 / 7.421 - 1 = -1.79%.
    dense = outcome(verdicts.evaluate(*rows_of({("baseline", 3e-3): base,
                                              (definitions.G1, 3e-3): g1})),
                    "1", "G1 elementwise < baseline")
    assert dense.paper == (7.288, 7.421, "dense, Table 2")
    assert dense.effect == pytest.approx((7.288 / 7.421 - 1) * 10.2)


def test_the_sink_premise_is_the_same_in_every_trend():
    """A sink measure counts only where the baseline's Gu share on 64-token windows (with
    BOS for measures on BOS windows, without for the others) averages at least 0.05: trend
    3's F-Attn comparison, trend 7's shares and trend 7f's F-Attn alike."""
    def grid(share_bos: list[float], share_no_bos: list[float]):
        base = [{"val/ppl": 10.0 + s, "gate/mean": 0.5, "sink/first_token_attn": 0.03,
                 "sink/head_share_short": b, "sink/head_share_short_random": n}
                for s, b, n in zip((0.0, 0.4, 0.2), share_bos, share_no_bos)]
        gated = [{"val/ppl": 9.5 + s, "gate/mean": 0.3 + s / 10, "sink/first_token_attn": 0.01,
                  "sink/head_share_short": 0.0, "sink/head_share_short_random": 0.0}
                 for s in (0.0, 0.3, 0.4)]
        shared = [{"val/ppl": 9.8 + s, "gate/mean": 0.5 + s / 10,
                   "sink/first_token_attn": 0.02 + s / 100,
                   "sink/head_share_short": 0.02, "sink/head_share_short_random": 0.0}
                  for s in (0.0, 0.3, 0.3)]
        return verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): gated,
                                         (definitions.G1_HEADSHARED, 3e-3): shared}))

    sink_rows = (("3", "G1 elementwise < G1 head-shared", "sink/first_token_attn"),
                 ("7", "G1 elementwise < baseline", "sink/head_share_short"),
                 ("7f", "G1 elementwise < baseline", "sink/first_token_attn"))
    # A share of 0.04 in the mean (0.03, 0.05, 0.04): below the floor.
    results = grid([0.03, 0.05, 0.04], [0.0, 0.0, 0.0])
    for number, label, measure in sink_rows:
        assert outcome(results, number, label, measure).verdict == "no sink in the baseline"
    assert outcome(results, "3", "G1 elementwise < G1 head-shared", "gate/mean").verdict \
        in verdicts.TESTED  # the trend's other comparisons are tested as before
    assert verdict(results, "7").startswith(
        "not testable here: no sink in the baseline by Gu et al.'s Sink^0.3 share; the "
        "baseline's sink/head_share_short: mean 0.04 over 3 seeds, floor 0.05")
    assert verdict(results, "7f").startswith("not testable here: no sink in the baseline")

    # 0.06 in the mean: every sink comparison on BOS windows is tested, in every trend; the
    # share without BOS is still 0, so its comparisons are not.
    results = grid([0.05, 0.07, 0.06], [0.0, 0.0, 0.0])
    for number, label, measure in sink_rows:
        assert outcome(results, number, label, measure).raw in verdicts.TESTED
    assert outcome(results, "7", "G1 elementwise < baseline",
                   "sink/head_share_short_random").verdict == "no sink in the baseline"
    assert not verdict(results, "7").startswith("not testable")
    results = grid([0.05, 0.07, 0.06], [0.1, 0.0, 0.08])
    assert outcome(results, "7", "G1 elementwise < baseline",
                   "sink/head_share_short_random").raw in verdicts.TESTED


def test_trend_9_compares_the_gated_output_with_the_ungated_baselines():
    """No comparison may hold by construction: the gated |Y'| is set against the baseline's
    SDPA output, which a gated model can exceed."""
    base = [{"val/ppl": 10.0, "sdpa/abs_mean": 0.5} for _ in range(3)]
    g1 = [{"val/ppl": 9.0, "sdpa/abs_mean": 2.0, "sdpa/abs_mean_gated": a,
           "sdpa/sparsity_1e-2_gated": 0.3, "sdpa/sparsity_1e-2_average_gate": 0.1}
          for a in (0.8, 0.9, 0.85)]
    results = verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): g1}))
    trend = next(r for r in results if r.trend.number == "9")
    assert all(not (c.left == c.right and c.measure.label == "sdpa/abs_mean_gated")
               for c in trend.trend.comparisons)
    smaller = next(o for o in trend.outcomes
                   if o.comparison.measure.label == "sdpa/abs_mean_gated")
    assert smaller.comparison.label == \
        "G1 elementwise sdpa/abs_mean_gated < baseline sdpa/abs_mean"
    assert smaller.raw == "opposite"  # 0.85 above the baseline's 0.5: it can fail


def ladder_rows(cells: dict) -> tuple[list[Row], list[Row]]:
    """{(variant, lr): [(final loss, diverged, spikes, grad norm max) per seed]}."""
    # (the whole run's largest norm is the initialisation's, the same in every run here: the
    # comparison must read the one after warmup)
    values = {key: [{"val/ppl": math.exp(loss), "val/final_loss": loss, "diverged": diverged,
                     "spikes/count": spikes, "train/grad_norm_max": 5.0,
                     "train/grad_norm_max_after_warmup": norm}
                    for loss, diverged, spikes, norm in runs] for key, runs in cells.items()}
    return rows_of(values)


# The baseline breaks at 1e-1: seed 0 diverges, seed 1 ends 0.3 nats above the best rung
# (3e-2, mean 3.5); the gate trains at every LR. Grad norms: the baseline's 10x the gate's.
LADDER = {("baseline", 1e-2): [(3.58, False, 0, 1.0), (3.58, False, 0, 1.0)],
          ("baseline", 3e-2): [(3.5, False, 1, 2.0), (3.5, False, 0, 2.0)],
          ("baseline", 1e-1): [(9.0, True, 3, 20.0), (3.8, False, 2, 20.0)],
          (definitions.G1, 1e-2): [(3.5, False, 0, 0.1), (3.52, False, 0, 0.1)],
          (definitions.G1, 3e-2): [(3.4, False, 0, 0.2), (3.4, False, 0, 0.2)],
          (definitions.G1, 1e-1): [(3.45, False, 0, 2.0), (3.46, False, 0, 2.0)]}


def test_stability_pairs_by_lr_and_seed_and_reads_broke_with_its_margin():
    rows, all_rows = ladder_rows(LADDER)
    base = [r for r in all_rows if r.variant == "baseline"]
    gate = [r for r in all_rows if r.variant == definitions.G1]
    assert measures.broken_runs(base) == {(1e-2, 0): False, (1e-2, 1): False, (3e-2, 0): False,
                                        (3e-2, 1): False, (1e-1, 0): True, (1e-1, 1): True}
    # A wider margin than 0.3 nats keeps seed 1 at 1e-1; the divergence still breaks seed 0.
    assert measures.broken_runs(base, margin=0.5)[(1e-1, 1)] is False
    assert measures.largest_stable_lr(base) == 3e-2 and measures.largest_stable_lr(gate) == 1e-1
    # Two seeds at least: a rung of one seed does not count.
    assert measures.largest_stable_lr(gate + [Row(definitions.G1, 3e-1, gate[2].runs[:1], None)]) \
        == 1e-1

    results = verdicts.evaluate(rows, all_rows)
    # The pairs count at the rungs where the baseline broke or spiked: 3e-2 (seed 0 spiked)
    # and 1e-1 (both broke), not 1e-2, where it trained well.
    where = "by LR and seed at the LRs where the baseline broke or spiked"
    assert measures.unstable_rungs()(base) == {3e-2, 1e-1}
    # Final loss, paired at the same LR and seed; the diverged pair (1e-1, seed 0) drops out:
    # (3.4-3.5, 3.4-3.5, 3.46-3.8) -> mean -0.54 / 3.
    final = outcome(results, "11", "G1 elementwise < baseline", f"val/final_loss, {where}")
    assert final.difference.n == 3
    assert final.difference.mean == pytest.approx(-0.54 / 3)
    # log10 of the largest gradient norm: -1 in every pair (a zero spread) -> the sign test's
    # p, 2 x 0.5^4 for 4 pairs on one side: as the paper raw, not after the adjustment over
    # this report's other comparisons.
    norm = outcome(results, "11", "G1 elementwise < baseline",
                   f"log10 train/grad_norm_max_after_warmup, {where}")
    assert norm.difference.n == 4 and norm.difference.mean == pytest.approx(-1.0)
    assert norm.p_value == pytest.approx(2 * 0.5 ** 4) and norm.raw == "as the paper"
    assert norm.p_adjusted > norm.p_value and norm.verdict == "unresolved"
    # Largest LR that did not break, per seed: 1e-1 for the gate, 3e-2 for the baseline.
    headroom = outcome(results, "11", "G1 elementwise > baseline",
                       "log10 max LR that did not break")
    assert headroom.difference.mean == pytest.approx(math.log10(1e-1) - math.log10(3e-2))
    assert not verdict(results, "11").startswith("not testable")

    from lab.reports.tables import stability_pairs_table, stability_table

    pairs = {tuple(line.split(" | ")[:2]): line for line in
             stability_pairs_table(all_rows).splitlines()[2:]}
    assert pairs[("| sdpa_elementwise_sigmoid_mul", "0.1")] == \
        "| sdpa_elementwise_sigmoid_mul | 0.1 | 2 | 0 / 5 | 2.00 / 20.00 | -0.340 | 0 / 2 |"
    table = {line.split(" | ")[0].strip("| "): line
             for line in stability_table(all_rows).splitlines()[2:]}
    assert table["baseline"].endswith("| 0.03 | 0.1 |")
    assert table[definitions.G1].endswith("| 0.1 | none |")


def test_no_breaking_point_leaves_stability_untested_and_out_of_the_adjustment():
    calm = {key: [(loss, False, 0, norm) for loss, _, _, norm in runs]
            for key, runs in LADDER.items() if key[1] < 1e-1}
    results = verdicts.evaluate(*ladder_rows(calm))
    assert verdict(results, "11").startswith("not testable here: no breaking point")
    assert all(o.p_value is None and o.verdict in ("premise not met", "not in this grid")
               for o in next(r for r in results if r.trend.number == "11").outcomes)
    # One LR only: no ladder, no headroom.
    rows, all_rows = rows_of({("baseline", 3e-3): [{"val/ppl": 10.0, "spikes/count": 0}] * 2,
                              (definitions.G1, 3e-3): [{"val/ppl": 9.0, "spikes/count": 0}] * 2})
    assert measures.max_stable_lr()(rows[0], [rows[0]]) == {}
    assert verdict(verdicts.evaluate(rows, all_rows), "11").startswith(
        "not testable here: no breaking point")


@pytest.mark.slow
def test_report_prints_the_verdicts_and_checks_its_band(store, tmp_path, capsys):
    from test_report import write_grid

    from lab.cli import main

    write_grid(store)
    assert main(["report", "fake", "--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "  1. unresolved (every adjusted comparison spans" in printed  # a line a verdict
    assert max(len(line) for line in printed.splitlines()) <= 120
    trends_part = (tmp_path / "out" / "report.md").read_text().split("### The paper's trends")[1]
    assert "| 1 | G1 elementwise < baseline | val/ppl | 7.288 vs 7.421 (dense, Table 2) " \
           "| -0.4667 |" in trends_part
    assert "| as the paper |" in trends_part
    # Without --broke-margin the report uses the one constant, which the help names.
    from lab.cli import build_parser
    from lab.reports.trends.measures import BROKE_MARGIN

    assert f"ended more than {BROKE_MARGIN:g} nats above that rung's mean" in \
        (tmp_path / "out" / "report.md").read_text()
    report_help = build_parser()._subparsers._group_actions[0].choices["report"].format_help()
    assert f"else {BROKE_MARGIN:g}:" in " ".join(report_help.split())
    assert main(["report", "fake", "--tracking-uri", store, "--equivalence-percent", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report: --equivalence-percent must be above 0, not 0" in err[0]
    out = tmp_path / "margin"
    assert main(["report", "fake", "--tracking-uri", store, "--broke-margin", "-1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report: --broke-margin must be above 0 nats, not -1" in err[0]
    assert not out.exists()  # refused before anything is written
    # The margin reaches the stability section (the fake grid has two baseline LRs).
    assert main(["report", "fake", "--tracking-uri", store, "--broke-margin", "0.25",
                 "--out", str(out)]) == 0
    assert "ended more than 0.25 nats above that rung's mean" in (out / "report.md").read_text()


def test_across_grids_names_where_each_trend_holds():
    """Two scales: both G1 gates lower M-Act in every seed at one and raise it in every seed
    at the other (trend 8, two comparisons); neither baseline has a sink."""
    def grid(act: list[float]):
        base = [{"val/ppl": p, "act/max_mean": 300.0 + p, "sink/head_share_short": 0.0}
                for p in (10.0, 10.4, 10.2)]
        gated = [{"val/ppl": p, "act/max_mean": a, "sink/head_share_short": 0.0}
                 for p, a in zip((9.5, 9.8, 9.9), act)]
        headwise = [dict(run, **{"act/max_mean": run["act/max_mean"] + 5}) for run in gated]
        return verdicts.evaluate(*rows_of({("baseline", 3e-3): base, (definitions.G1, 3e-3): gated,
                                         (definitions.G1_HEADWISE, 3e-3): headwise}))

    text = trends_table.across({"small": grid([100.0, 120.0, 90.0]), "base": grid([500.0, 520.0, 490.0])})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert text.splitlines()[0] == "| # | the paper's trend | small | base | holds in |"
    assert lines["8"].endswith("| holds | does not hold | small |")
    assert lines["7"].endswith("| not testable here: no sink in the baseline by Gu et al.'s "
                               "Sink^0.3 share | not testable here: no sink in the baseline by "
                               "Gu et al.'s Sink^0.3 share | no grid tests it |")
    assert lines["13"].endswith("| not in this grid | not in this grid | no grid tests it |")
    both = trends_table.across({"a": grid([100.0, 120.0, 90.0]), "b": grid([110.0, 100.0, 95.0])})
    assert [line for line in both.splitlines() if line.startswith("| 8 |")][0].endswith(
        "| holds | holds | all 2 that test it |")


@pytest.mark.slow
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
    assert all(any(line.startswith(f"{t.number:>3}. ") for line in lines) for t in definitions.TRENDS)
    assert "side by side, with each grid's verdict: reports/trends-small+base.md" in out
    assert max(len(line) for line in out.splitlines()) <= 120
    side_by_side = (tmp_path / "reports" / "trends-small+base.md").read_text()
    assert "## The paper's trends across these grids" in side_by_side
    assert "| # | the paper's trend | small | base | holds in |" in side_by_side
    assert main(["report", "small", "base", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    assert "--out takes one grid" in capsys.readouterr().err
