"""The report's tables: the variants' table (report.md, report.csv), the short one a terminal
shows, the stability tables over an LR ladder, the Δ against a control grid (control.csv),
and the sink through training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from lab.reports.rows import SINK_HISTORY, row_label, variant_order
from lab.reports.seeds import BASELINE, Interval, Row, paired_delta, t_interval
from lab.reports.trends.measures import BROKE_MARGIN, broken_runs, largest_stable_lr
from lab.training.spikes import GRAD_NORM_MAX_AFTER_WARMUP


def _paper_cell(reference: tuple[float, float] | None) -> str:
    if reference is None:
        return "-"
    delta, baseline = reference
    return f"{delta:+.3f} ({100 * delta / baseline:+.1f}%)"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_interval(interval: Interval | None, signed: bool = False) -> tuple[str, str]:
    if interval is None:
        return "-", "-"
    sign = "+" if signed else ""
    centre = f"{interval.mean:{sign}.3f}" + ("" if interval.std is None else f" ± {interval.std:.3f}")
    ci = "-" if interval.low is None else f"[{interval.low:{sign}.3f}, {interval.high:{sign}.3f}]"
    return centre, ci


def _percent(value: float | None, pattern: str, missing: str = "") -> str:
    return missing if value is None else pattern.format(value)


def markdown_head(header: list[str]) -> list[str]:
    """A Markdown table's first two lines: the column names and the rule under them."""
    return [markdown_row(header), "|" + "---|" * len(header)]


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(rows: list[Row]) -> str:
    extras = sorted({k for r in rows for k in r.extra})
    header = ["variant", "lr", "seeds", "val PPL (mean ± std)", "95% CI", "Δ PPL vs baseline",
              "Δ 95% CI", "Δ %", "paper Δ PPL (%)", "same sign", "spikes", "diverged", *extras,
              "paper Δ from", "paper Δ, MoE (%)", "paper Δ, dense (%)"]
    lines = markdown_head(header)
    for row in rows:
        ppl, ppl_ci = _fmt_interval(row.ppl)
        delta, delta_ci = ("0 (reference)", "-") if row.variant == BASELINE else \
            _fmt_interval(row.delta, signed=True)
        paper = "-" if row.paper_delta is None else "0 (reference)" if row.variant == BASELINE \
            else f"{row.paper_delta:+.3f}" + _percent(row.paper_delta_percent, " ({:+.1f}%)")
        percent = "-" if row.variant == BASELINE else _percent(row.delta_percent, "{:+.1f}%", "-")
        cells = [row.variant, f"{row.lr:g}", str(len(row.runs)), ppl, ppl_ci, delta, delta_ci,
                 percent, paper, row.direction, str(row.spikes), f"{row.diverged}/{len(row.runs)}",
                 *[_fmt(row.extra.get(k), 4) for k in extras], row.paper_table or "-",
                 _paper_cell(row.paper_moe), _paper_cell(row.paper_dense)]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def stability_table(all_rows: list[Row], margin: float = BROKE_MARGIN) -> str:
    """Per variant over a learning-rate ladder: the largest LR at which no seed diverged, the
    largest at which no seed diverged or spiked, and the smallest that diverged (the paper's
    claim 4: the gate trains at LRs where the baseline breaks); then the largest LR at which
    at least 2 seeds ran and none broke (lab/reports/trends/measures.py: diverged, or a final
    loss `margin` nats above the variant's best rung) and the first LR at which a run broke."""
    header = ["variant", "LRs tried", "max LR, no divergence", "max LR, no divergence or spike",
              "first LR that diverged", "largest attention logit (at max stable LR)",
              "largest stable LR (>= 2 seeds, none broke)", "first LR where a run broke"]
    lines = markdown_head(header)
    for variant in sorted({r.variant for r in all_rows}, key=variant_order):
        ladder = sorted((r for r in all_rows if r.variant == variant), key=lambda r: r.lr)
        stable = [r for r in ladder if r.diverged == 0]
        calm = [r for r in stable if r.spikes == 0]
        broke = [r for r in ladder if r.diverged > 0]
        logit = stable[-1].extra.get("attn/logit_max") if stable else None
        largest = largest_stable_lr(ladder, margin)
        broken = broken_runs(ladder, margin)
        first_broke = min((lr for (lr, _), hit in broken.items() if hit), default=None)
        lines.append(markdown_row([
            variant, str(len(ladder)), f"{stable[-1].lr:g}" if stable else "none",
            f"{calm[-1].lr:g}" if calm else "none", f"{broke[0].lr:g}" if broke else "none",
            _fmt(logit, 1), "none" if largest is None else f"{largest:g}",
            "none" if first_broke is None else f"{first_broke:g}"]))
    return "\n".join(lines)


def stability_pairs_table(all_rows: list[Row], margin: float = BROKE_MARGIN) -> str:
    """Each variant against the baseline at the same LR and seed, rung by rung: the pairing
    of the paper's Table 2 (models side by side at one LR), which trend 11 pools."""
    ladders: dict[str, list[Row]] = {}
    for row in all_rows:
        ladders.setdefault(row.variant, []).append(row)
    header = ["variant", "lr", "seeds paired", "spikes (variant / baseline)",
              "largest grad norm after warmup (variant / baseline, mean)",
              "Δ final loss, nats (mean [95% CI])", "broke (variant / baseline)"]
    lines = markdown_head(header)
    if BASELINE not in ladders:
        return "\n".join(lines)
    base = {r.lr: {run.seed: run for run in r.runs} for r in ladders[BASELINE]}
    base_broken = broken_runs(ladders[BASELINE], margin)
    for variant in sorted(ladders, key=variant_order):
        if variant == BASELINE:
            continue
        broken = broken_runs(ladders[variant], margin)
        for rung in sorted(ladders[variant], key=lambda r: r.lr):
            pairs = [(run, base[rung.lr][run.seed]) for run in rung.runs
                     if run.seed in base.get(rung.lr, {})]
            if not pairs:
                continue
            norms = [[p.metrics.get(GRAD_NORM_MAX_AFTER_WARMUP, math.nan) for p in side]
                     for side in zip(*pairs)]
            finals = [a.metrics["val/final_loss"] - b.metrics["val/final_loss"] for a, b in pairs
                      if not (a.diverged or b.diverged)
                      and "val/final_loss" in a.metrics and "val/final_loss" in b.metrics]
            centre, ci = _fmt_interval(t_interval(finals), signed=True)
            spikes = [sum(int(p.metrics.get("spikes/count", 0)) for p in side)
                      for side in zip(*pairs)]
            hits = [sum(table[(rung.lr, p.seed)] for p in side)
                    for table, side in zip((broken, base_broken), zip(*pairs))]
            lines.append(markdown_row([
                variant, f"{rung.lr:g}", str(len(pairs)), f"{spikes[0]} / {spikes[1]}",
                " / ".join(_fmt(float(np.nanmean(n)) if np.isfinite(n).any() else None, 2)
                           for n in norms),
                centre if ci == "-" else f"{centre.split(' ± ')[0]} {ci}",
                f"{hits[0]} / {hits[1]}"]))
    return "\n".join(lines)


def control_deltas(rows: list[Row], controls: list[Row]) -> list[tuple[Row, Row, Interval | None, str]]:
    """Per variant of this grid, one factor at a time (a control changes ONE setting): (the
    variant, the control grid's row it is set against, the Δ PPL of the first against the
    second paired by seed, the factors that change). That row is the control's same variant
    where the control has it (the Δ is the control's setting on that variant: "setting"), else
    the control's baseline ("setting + variant", two factors at once); a variant the control
    has neither for gets none. Both at their best LR."""
    by_variant = {reference.variant: reference for reference in controls}
    pairs = []
    for row in rows:
        reference = by_variant.get(row.variant) or by_variant.get(BASELINE)
        if reference is None:
            continue
        factors = "setting" if reference.variant == row.variant else "setting + variant"
        pairs.append((row, reference, paired_delta(row, reference), factors))
    return pairs


def control_interaction(row: Row, reference: Row, rows: list[Row],
                        controls: list[Row]) -> Interval | None:
    """For a variant the control also has: how much its Δ vs the baseline changes with the
    control's setting, (variant - baseline here) - (variant - baseline in the control) per
    seed in all four, then its t interval. A gain that the setting takes away shows as a Δ
    of the opposite sign (docs/results.md: at `base` the depth-scaled init takes 5-6 PPL of
    G1's gain). None for the baseline itself, or where a baseline is missing."""
    base = next((r for r in rows if r.variant == BASELINE), None)
    control_base = next((r for r in controls if r.variant == BASELINE), None)
    if row.variant == BASELINE or reference.variant != row.variant or not (base and control_base):
        return None
    ppl = [{r.seed: r.val_ppl for r in side.runs if r.val_ppl is not None}
           for side in (row, base, reference, control_base)]
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in ppl)))
    return t_interval([(ppl[0][s] - ppl[1][s]) - (ppl[2][s] - ppl[3][s]) for s in seeds])


def control_table(rows: list[Row], control: str, controls: list[Row]) -> str:
    header = ["variant", "lr", "Δ PPL vs baseline", "control", "factors changed",
              "control val PPL", "Δ PPL vs control", "Δ 95% CI", "seeds paired",
              "Δ vs baseline, here - control [95% CI]"]
    lines = markdown_head(header)
    for row, reference, delta, factors in control_deltas(rows, controls):
        own = "0 (reference)" if row.variant == BASELINE else _fmt_interval(row.delta, signed=True)[0]
        centre, ci = _fmt_interval(delta, signed=True)
        change = control_interaction(row, reference, rows, controls)
        lines.append(markdown_row([
            row.variant, f"{row.lr:g}", own, f"{control}:{reference.variant} lr={reference.lr:g}",
            factors, _fmt_interval(reference.ppl)[0], centre, ci,
            str(delta.n if delta else 0),
            " ".join(_fmt_interval(change, signed=True)) if change else "-"]))
    return "\n".join(lines)


def write_control_csv(rows: list[Row], control: str, controls: list[Row], path: Path) -> None:
    # factors_changed and the change of the Δ vs baseline after the columns users read since the
    # first version, which stay as they were.
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "lr", "control_grid", "control_variant", "control_lr",
                         "control_val_ppl_mean", "delta_ppl_mean", "delta_ppl_std",
                         "delta_ppl_ci_low", "delta_ppl_ci_high", "seeds_paired",
                         "factors_changed", "delta_vs_baseline_change_mean",
                         "delta_vs_baseline_change_ci_low", "delta_vs_baseline_change_ci_high"])
        for row, reference, d, factors in control_deltas(rows, controls):  # (None: an empty cell)
            change = control_interaction(row, reference, rows, controls)
            writer.writerow([row.variant, row.lr, control, reference.variant, reference.lr,
                             reference.ppl and reference.ppl.mean,
                             d and d.mean, d and d.std, d and d.low, d and d.high,
                             d.n if d else 0, factors,
                             change and change.mean, change and change.low, change and change.high])


def write_csv(rows: list[Row], path: Path) -> None:
    extras = sorted({k for r in rows for k in r.extra})
    columns = ["variant", "lr", "n_runs", "n_ppl", "val_ppl_mean", "val_ppl_std", "val_ppl_ci_low",
               "val_ppl_ci_high", "delta_ppl_mean", "delta_ppl_std", "delta_ppl_ci_low",
               "delta_ppl_ci_high", "n_paired", "delta_percent", "paper_delta_ppl",
               "paper_delta_percent", "same_sign", "spikes",
               "max_spike_excess", "diverged", *extras,
               "paper_delta_table", "paper_moe_delta_ppl", "paper_dense_delta_ppl"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            p, d = row.ppl, row.delta
            writer.writerow([row.variant, row.lr, len(row.runs), p.n if p else 0,
                             p and p.mean, p and p.std, p and p.low, p and p.high,
                             d and d.mean, d and d.std, d and d.low, d and d.high,
                             d.n if d else 0, row.delta_percent, row.paper_delta,
                             row.paper_delta_percent, row.direction, row.spikes,
                             row.max_spike_excess, row.diverged,
                             *[row.extra.get(k) for k in extras],
                             row.paper_table, row.paper_moe and row.paper_moe[0],
                             row.paper_dense and row.paper_dense[0]])


def sink_history_table(histories: dict) -> str:
    """Per variant and logged step, the mean over seeds of each sink measure."""
    names = [(n, title) for n, title in SINK_HISTORY if n in histories]
    variants = sorted({v for n, _ in names for v in histories[n]}, key=variant_order)
    header = ["variant", "tokens trained", *[f"{title} (mean over seeds)" for _, title in names],
              "seeds"]
    lines = markdown_head(header)
    for variant in variants:
        runs = {n: histories[n].get(variant, {}) for n, _ in names}
        points = sorted({t for by_seed in runs.values() for h in by_seed.values() for t in h})
        for tokens in points:
            cells, seeds = [], 0
            for name, _ in names:
                values = [h[tokens] for h in runs[name].values() if tokens in h]
                seeds = max(seeds, len(values))
                cells.append(_fmt(float(np.mean(values)) if values else None, 3))
            lines.append(markdown_row([variant, f"{tokens:.3g}", *cells, str(seeds)]))
    return "\n".join(lines)


def summary_rows(rows: list[Row]) -> list[list[str]]:
    """The short table: variant (with its LR when the grid has several), seeds, val PPL
    (mean ± std), Δ vs the baseline and its 95% CI."""
    table = [["variant", "seeds", "val PPL", "Δ vs baseline", "Δ 95% CI"]]
    for row in rows:
        ppl = _fmt_interval(row.ppl)[0]
        if row.variant == BASELINE:
            delta, ci = "(reference)", ""
        else:
            delta, ci = _fmt_interval(row.delta, signed=True)
            delta = delta.split(" ± ")[0]
        table.append([row_label(row, rows), str(len(row.runs)), ppl, delta, ci])
    return table


