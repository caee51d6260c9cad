"""What a trend's comparison measures, per seed of one variant: a logged metric, a ratio of
two, and over an LR ladder the runs paired by (LR, seed), which of them broke, and the
largest LR each seed trained at without breaking (the verdict rules: verdicts.py)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lab.reports.seeds import Row

# "Broke" on an LR ladder: diverged, or, above the variant's best rung (lowest mean final
# loss), a final validation loss this many nats above that rung's mean; `gatelab report
# --broke-margin`.
# 0.1 nats is 10.5% in PPL, more than the 0.06 between two neighbouring rungs of a healthy
# ladder (docs/results.md) and less than the 0.21 of the paper's 48-layer baseline at LR
# 8e-3 against 4e-3 (Table 2 rows 5-6).
BROKE_MARGIN = 0.1

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

def on_ladder(name: str, log10: bool = False, rungs: Callable[[list[Row]], set] | None = None
              ) -> Callable[[Row, list[Row]], PerSeed]:
    """A metric of every run of the ladder, keyed by (LR, seed), so that two variants pair at
    the same LR and seed (the paper's Table 2 sets models side by side at one LR). The final
    loss of a diverged run is left out (its breaking counts in `broke`). `rungs`: a function
    of the baseline's ladder giving the LRs at which the pairs count (verdicts.py compare
    reads it as the measure's `rungs`), e.g. `unstable_rungs`."""
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
    measure.label = (f"log10 {name}" if log10 else name) + ", by LR and seed" + \
        (f" {rungs.label}" if rungs is not None else "")
    measure.rungs = rungs
    return measure


def unstable_rungs(margin: float = BROKE_MARGIN) -> Callable[[list[Row]], set]:
    """The LRs of a ladder at which some run broke (`broken_runs`) or spiked: where trend 11
    pairs a gate with the baseline. The stability grid's criterion (ablations/stability.yaml,
    written before it ran) reads the paired comparisons "at the rungs where the baseline
    broke"; a rung where the baseline trains well says nothing of headroom, and pooled with
    the others it dilutes them. "Or spiked" as the trend's premise reads an instability. The
    selection is the baseline's, as the claim is ("the gate trains where the baseline
    breaks"): a gate's instability at a rung where the baseline was stable is not in these
    pairs, but it is in the gate's largest stable LR (max_stable_lr, the report's stability
    table)."""
    def rungs(ladder: list[Row]) -> set:
        broken = broken_runs(ladder, margin)
        return {rung.lr for rung in ladder for run in rung.runs
                if broken[(rung.lr, run.seed)] or run.metrics.get("spikes/count", 0) > 0}
    rungs.label = "at the LRs where the baseline broke or spiked"
    return rungs


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


def sink_premise(measure_label: str) -> str | None:
    """The baseline's measure that must show a sink for a comparison on `measure_label` to
    count (verdicts.py, rule 1), or None for a measure that is not a sink measure."""
    if not measure_label.startswith(("sink/first_token_attn", "sink/head_share")):
        return None
    return "sink/head_share_short_random" if measure_label.endswith("_random") \
        else "sink/head_share_short"
