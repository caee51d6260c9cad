"""`gatelab report <grid>`: compare a grid's variants from what MLflow holds.

One row per variant: validation perplexity over seeds (mean +- sample std, and a 95%
confidence interval from the t-distribution with n-1 degrees of freedom), the difference
to the baseline paired by seed (the same seed gives every variant the same data order and
the same initial draw of the shared weights, so differences are far less noisy than the
spread of either), with its own t interval; loss spikes; divergences; the analysis metrics
where runs carry them; and the paper's delta-PPL beside ours with whether the sign agrees:
from its dense Table 2 for a dense preset where the table has the variant (the G1 gates;
PAPER_DENSE_TABLE in lab/model/gates.py), else from its MoE tables (1, 3, 4, 6), with the
table named and both numbers where the paper gives both.

With several learning rates in a grid, each variant's row is at its best LR (lowest mean
validation perplexity over seeds, diverged runs counting as worse than any); every
(variant, LR) pair is in `all_lrs.csv` and the LR plot.

Outputs go to `reports/<grid>/` (report.md, report.csv, loss_curves.png, delta_ppl.png,
per_layer.png; with several learning rates also all_lrs.csv, lr_vs_loss.png and ladder.png,
each rung's loss and gradient norm by seed: lab/reports/ladder.py) and are logged to the
grid's parent run under `report/`, with the summary table as the parent's description and
per-variant summary metrics (`log_summary`). With several learning rates report.md also
holds the table of every (variant, LR). Last in report.md, the paper's trends as this grid
tests them (lab/reports/trends.py): a verdict per trend and the paired comparison behind
each, with its raw and multiplicity-adjusted outcome and its power line. With several
learning rates, the stability section also pairs each gate with the baseline at the same LR
and seed (spikes, largest gradient norm, final loss, "broke"). Where runs logged the sink
measures through training (`train.analysis_every`), `sink_vs_tokens.png` plots them against
tokens trained, per variant (each seed and the mean), and report.md tabulates the means.

With a control grid (`--control GRID`: a grid that changes one setting of this one, such as
reproduce-base-init's depth-scaled init), report.md adds each variant's Δ against each of
the control's variants, paired by seed like every other Δ (the same seed gives the same data
order in both grids), and `control.csv` holds them: whether the gate's gain survives a
baseline that has the control's setting.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from lab import records
from lab.analysis.metrics import split_layer_metric
from lab.analysis.outputs import LAYER_TABLE, layer_metrics
from lab.errors import LabError
from lab.model.gates import PAPER_DENSE_BASELINE_PPL, VARIANTS
from lab.records import find_grid_parent, grid_cell_runs
from lab.progress import clip
from lab.records.lookup import no_grid
from lab.reports import trends
from lab.reports.ladder import finite_peaks, plot_ladder
from lab.reports.seeds import (BASELINE, Interval, Row, RunRecord, finished_records, paired_delta,
                               t_interval)

# Columns beside the perplexity, where runs carry them (lab/analysis/metrics.py, lab/training/callbacks.py);
# the long-context names are `long/ppl_<k>x[_yarn]` (MLflow rejects '@').
ANALYSIS_PREFIXES = ("gate/mean", "sink/first_token_attn", "sink/head_share",
                     "sink/bos_reliance", "act/max_mean", "attn/logit_max", "long/ppl_",
                     "train/grad_norm_max")
# Per-layer curves of the paper's Fig. 2 and 6: first-token attention and the largest hidden
# activation after each layer, logged as `<prefix>/layer_<i>`.
LAYER_METRICS = (("layers/sink/first_token_attn", "attention to the first token (BOS)"),
                 ("layers/act/max", "max |hidden activation|"))
@dataclass
class Report:
    grid: str
    rows: list[Row]
    all_rows: list[Row]
    markdown: str
    out_dir: Path
    files: list[Path]
    verdicts: list = field(default_factory=list)  # trends.TrendResult, one per trend


# --- reading the store ------------------------------------------------------------------

def run_metrics(client, run) -> dict[str, float]:
    """The run's metrics, its per-layer values as `layers/...` names whichever way it holds
    them: a run since 2026-12-05 as its table (lab/analysis/outputs.py LAYER_TABLE), which
    wins over the same names as metrics (a run with `train.analysis_every` also has them as
    time series); an older run, the committed snapshots' included, as metrics only."""
    metrics = dict(run.data.metrics)
    folder = LAYER_TABLE.rpartition("/")[0]
    if any(a.path == LAYER_TABLE for a in client.list_artifacts(run.info.run_id, folder)):
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, LAYER_TABLE, tmp)
            metrics.update(layer_metrics(json.loads(Path(path).read_text())))
    return metrics


def load_runs(grid: str, uri: str | None = None) -> tuple[object, str, list[RunRecord]]:
    """The grid's FINISHED child runs (the latest per config hash)."""
    uri = records.tracking_uri(uri)
    client = records.client(uri)
    found = grid_cell_runs(client, grid)
    if found is None:
        raise no_grid(grid, uri, [e.name for e in client.search_experiments()
                                  if find_grid_parent(client, e.experiment_id)])
    parent, cell_runs = found
    run_records = finished_records(cell_runs, lambda run: run_metrics(client, run))
    if not run_records:
        raise LabError(f"report: grid {grid!r} has no FINISHED runs yet")
    return client, parent, run_records


def _variant_order(variant: str) -> tuple:
    order = list(VARIANTS)
    return (variant != BASELINE, order.index(variant) if variant in order else len(order), variant)


# --- the table ------------------------------------------------------------------------------

def _rank(row: Row) -> tuple:
    # Lower is better; a group with diverged runs or no perplexity ranks after all others.
    return (row.diverged > 0, row.ppl is None, row.ppl.mean if row.ppl else 0.0)


def build_rows(run_records: list[RunRecord]) -> tuple[list[Row], list[Row]]:
    """(one row per variant at its best LR, one row per variant and LR)."""
    groups: dict[tuple[str, float], list[RunRecord]] = {}
    for record in run_records:
        groups.setdefault((record.variant, record.lr), []).append(record)
    all_rows = []
    for (variant, lr), runs in groups.items():
        runs.sort(key=lambda r: r.seed)
        row = Row(variant, lr, runs, t_interval([r.val_ppl for r in runs if r.val_ppl is not None]))
        if variant in VARIANTS:
            set_paper_reference(row, VARIANTS[variant], dense=is_dense(run_records))
        all_rows.append(row)
    best: dict[str, Row] = {}
    for row in all_rows:
        if row.variant not in best or _rank(row) < _rank(best[row.variant]):
            best[row.variant] = row
    baseline = best.get(BASELINE)
    for row in all_rows:
        if baseline is not None:
            row.delta = paired_delta(row, baseline)
            row.baseline_ppl = baseline.ppl.mean if baseline.ppl else None
        row.extra = analysis_metrics(row.runs)
    all_rows.sort(key=lambda r: (_variant_order(r.variant), r.lr))
    rows = sorted(best.values(), key=lambda r: _variant_order(r.variant))
    return rows, all_rows


def is_dense(run_records: list[RunRecord]) -> bool:
    return all(r.ffn != "moe" for r in run_records)


def set_paper_reference(row: Row, variant, dense: bool) -> None:
    """The paper's Δ for the row: the dense Table 2's for a dense preset where that table has
    the variant, else the MoE tables' (1, 3, 4, 6); both kept for the report's last columns.
    (A Table 2 row of the registry, the sandwich norm, is dense whatever the preset.)"""
    own = None if variant.paper_delta_ppl is None else \
        (variant.paper_delta_ppl, variant.paper_baseline_ppl)
    table_2 = variant.paper.startswith("T2")
    row.paper_moe = None if table_2 else own
    row.paper_dense = own if table_2 else None if variant.paper_dense_ppl is None else \
        (variant.paper_dense_delta_ppl, PAPER_DENSE_BASELINE_PPL)
    chosen, row.paper_table = ((row.paper_dense, "dense") if row.paper_dense and
                               (dense or row.paper_moe is None) else (row.paper_moe, "MoE"))
    if chosen is None:
        row.paper_table = ""
    else:
        row.paper_delta, row.paper_baseline_ppl = chosen


def _paper_cell(reference: tuple[float, float] | None) -> str:
    if reference is None:
        return "-"
    delta, baseline = reference
    return f"{delta:+.3f} ({100 * delta / baseline:+.1f}%)"


def analysis_metrics(runs: list[RunRecord]) -> dict[str, float]:
    """Mean over seeds of every analysis metric a run carries (another module logs them)."""
    names = sorted({k for r in runs for k in r.metrics if k.startswith(ANALYSIS_PREFIXES)})
    out = {}
    for name in names:
        values = [r.metrics[name] for r in runs if name in r.metrics and math.isfinite(r.metrics[name])]
        if values:
            out[name] = float(np.mean(values))
    return out


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


def markdown_table(rows: list[Row]) -> str:
    extras = sorted({k for r in rows for k in r.extra})
    header = ["variant", "lr", "seeds", "val PPL (mean ± std)", "95% CI", "Δ PPL vs baseline",
              "Δ 95% CI", "Δ %", "paper Δ PPL (%)", "same sign", "spikes", "diverged", *extras,
              "paper Δ from", "paper Δ, MoE (%)", "paper Δ, dense (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stability_table(all_rows: list[Row], margin: float = trends.BROKE_MARGIN) -> str:
    """Per variant over a learning-rate ladder: the largest LR at which no seed diverged, the
    largest at which no seed diverged or spiked, and the smallest that diverged (the paper's
    claim 4: the gate trains at LRs where the baseline breaks); then the largest LR at which
    at least 2 seeds ran and none broke (lab/reports/trends.py: diverged, or a final loss
    `margin` nats above the variant's best rung) and the first LR at which a run broke."""
    header = ["variant", "LRs tried", "max LR, no divergence", "max LR, no divergence or spike",
              "first LR that diverged", "largest attention logit (at max stable LR)",
              "largest stable LR (>= 2 seeds, none broke)", "first LR where a run broke"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in sorted({r.variant for r in all_rows}, key=_variant_order):
        ladder = sorted((r for r in all_rows if r.variant == variant), key=lambda r: r.lr)
        stable = [r for r in ladder if r.diverged == 0]
        calm = [r for r in stable if r.spikes == 0]
        broke = [r for r in ladder if r.diverged > 0]
        logit = stable[-1].extra.get("attn/logit_max") if stable else None
        largest = trends.largest_stable_lr(ladder, margin)
        broken = trends.broken_runs(ladder, margin)
        first_broke = min((lr for (lr, _), hit in broken.items() if hit), default=None)
        lines.append("| " + " | ".join([
            variant, str(len(ladder)), f"{stable[-1].lr:g}" if stable else "none",
            f"{calm[-1].lr:g}" if calm else "none", f"{broke[0].lr:g}" if broke else "none",
            _fmt(logit, 1), "none" if largest is None else f"{largest:g}",
            "none" if first_broke is None else f"{first_broke:g}"]) + " |")
    return "\n".join(lines)


def stability_pairs_table(all_rows: list[Row], margin: float = trends.BROKE_MARGIN) -> str:
    """Each variant against the baseline at the same LR and seed, rung by rung: the pairing
    of the paper's Table 2 (models side by side at one LR), which trend 11 pools."""
    ladders: dict[str, list[Row]] = {}
    for row in all_rows:
        ladders.setdefault(row.variant, []).append(row)
    header = ["variant", "lr", "seeds paired", "spikes (variant / baseline)",
              "largest grad norm (variant / baseline, mean)",
              "Δ final loss, nats (mean [95% CI])", "broke (variant / baseline)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if BASELINE not in ladders:
        return "\n".join(lines)
    base = {r.lr: {run.seed: run for run in r.runs} for r in ladders[BASELINE]}
    base_broken = trends.broken_runs(ladders[BASELINE], margin)
    for variant in sorted(ladders, key=_variant_order):
        if variant == BASELINE:
            continue
        broken = trends.broken_runs(ladders[variant], margin)
        for rung in sorted(ladders[variant], key=lambda r: r.lr):
            pairs = [(run, base[rung.lr][run.seed]) for run in rung.runs
                     if run.seed in base.get(rung.lr, {})]
            if not pairs:
                continue
            norms = [[p.metrics.get("train/grad_norm_max", math.nan) for p in side]
                     for side in zip(*pairs)]
            finals = [a.metrics["val/final_loss"] - b.metrics["val/final_loss"] for a, b in pairs
                      if not (a.diverged or b.diverged)
                      and "val/final_loss" in a.metrics and "val/final_loss" in b.metrics]
            centre, ci = _fmt_interval(t_interval(finals), signed=True)
            spikes = [sum(int(p.metrics.get("spikes/count", 0)) for p in side)
                      for side in zip(*pairs)]
            hits = [sum(table[(rung.lr, p.seed)] for p in side)
                    for table, side in zip((broken, base_broken), zip(*pairs))]
            lines.append("| " + " | ".join([
                variant, f"{rung.lr:g}", str(len(pairs)), f"{spikes[0]} / {spikes[1]}",
                " / ".join(_fmt(float(np.nanmean(n)) if np.isfinite(n).any() else None, 2)
                           for n in norms),
                centre if ci == "-" else f"{centre.split(' ± ')[0]} {ci}",
                f"{hits[0]} / {hits[1]}"]) + " |")
    return "\n".join(lines)


def control_deltas(rows: list[Row], controls: list[Row]) -> list[tuple[Row, Row, Interval | None]]:
    """(variant of this grid, variant of the control grid at its best LR, the Δ PPL of the
    first against the second paired by seed), for every pair."""
    return [(row, reference, paired_delta(row, reference)) for reference in controls
            for row in rows]


def control_table(rows: list[Row], control: str, controls: list[Row]) -> str:
    header = ["variant", "lr", "Δ PPL vs baseline", "control", "control val PPL",
              "Δ PPL vs control", "Δ 95% CI", "seeds paired"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, reference, delta in control_deltas(rows, controls):
        own = "0 (reference)" if row.variant == BASELINE else _fmt_interval(row.delta, signed=True)[0]
        centre, ci = _fmt_interval(delta, signed=True)
        lines.append("| " + " | ".join([
            row.variant, f"{row.lr:g}", own, f"{control}:{reference.variant} lr={reference.lr:g}",
            _fmt_interval(reference.ppl)[0], centre, ci, str(delta.n if delta else 0)]) + " |")
    return "\n".join(lines)


def write_control_csv(rows: list[Row], control: str, controls: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "lr", "control_grid", "control_variant", "control_lr",
                         "control_val_ppl_mean", "delta_ppl_mean", "delta_ppl_std",
                         "delta_ppl_ci_low", "delta_ppl_ci_high", "seeds_paired"])
        for row, reference, d in control_deltas(rows, controls):  # (None: an empty cell)
            writer.writerow([row.variant, row.lr, control, reference.variant, reference.lr,
                             reference.ppl and reference.ppl.mean,
                             d and d.mean, d and d.std, d and d.low, d and d.high,
                             d.n if d else 0])


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


# --- plots ---------------------------------------------------------------------------------

def _artifact_json(client, run_id: str, name: str):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
        except Exception:
            return None
        return json.loads(Path(path).read_text())


def loss_history(client, run_id: str) -> tuple[list[int], list[float]]:
    """The run's per-step training loss: the loss_history.json artifact (every step), else
    MLflow's train/loss history (every log interval)."""
    data = _artifact_json(client, run_id, "loss_history.json")
    if data and data.get("step"):
        return list(data["step"]), list(data["loss"])
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def run_history(client, run_id: str) -> dict:
    """loss_history.json (step, loss, grad_norm) with the spike peaks of spikes.json, for the
    ladder plot (lab/reports/ladder.py)."""
    data = _artifact_json(client, run_id, "loss_history.json") or {}
    data["spike_steps"] = spike_steps(client, run_id)
    return data


def spike_steps(client, run_id: str) -> list[int]:
    """The peak step of each loss spike the run's detector found (spikes.json)."""
    return [s["peak_step"] for s in _artifact_json(client, run_id, "spikes.json") or []]


def _row_label(row: Row, rows: list[Row]) -> str:
    """The variant, with the LR when `rows` hold more than one LR."""
    return f"{row.variant} lr={row.lr:g}" if len({r.lr for r in rows}) > 1 else row.variant


# Well-separated colours, one per variant (matplotlib's tab10, then the darker half of tab20
# and its lighter half), and one line style per learning rate.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
LINE_STYLES = ("-", "--", ":", "-.")


def row_styles(rows: list[Row]) -> tuple[dict[str, str], dict[float, str]]:
    """(colour by variant, line style by LR) for the plots and the MLflow runs' colours."""
    variants = sorted({r.variant for r in rows}, key=_variant_order)
    lrs = sorted({r.lr for r in rows})
    return ({v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)},
            {lr: LINE_STYLES[i % len(LINE_STYLES)] for i, lr in enumerate(lrs)})


def plot_loss_curves(client, rows: list[Row], path: Path) -> None:
    """Every run's training loss, one colour per variant and one line style per LR
    (labelled with its LR when the rows hold several), spike peaks marked with x."""
    fig, ax = plt.subplots(figsize=(10, 6))
    colours, styles = row_styles(rows)
    for row in rows:
        colour = colours[row.variant]
        for k, run in enumerate(row.runs):
            steps, losses = loss_history(client, run.run_id)
            if not steps:
                continue
            ax.plot(steps, losses, color=colour, linestyle=styles[row.lr], linewidth=1.0,
                    alpha=0.85, label=_row_label(row, rows) if k == 0 else None)
            by_step = dict(zip(steps, losses))
            peaks = finite_peaks(steps, losses, spike_steps(client, run.run_id))
            if peaks:
                ax.scatter(peaks, [by_step[p] for p in peaks], marker="x", s=40, color=colour,
                           zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("training loss per run (x: detected loss spikes)")
    legend = ax.legend(fontsize=8, ncol=2)
    for line in legend.get_lines():  # legend swatches thick enough to tell the colours apart
        line.set_linewidth(3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_deltas(rows: list[Row], path: Path) -> None:
    """Δ PPL vs baseline with 95% CIs (bars), and the paper's Δ (diamonds)."""
    shown = [r for r in rows if r.variant != BASELINE and r.delta is not None]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(shown) + 1.5))
    y = np.arange(len(shown))
    means = [r.delta.mean for r in shown]
    errors = [[r.delta.mean - r.delta.low if r.delta.low is not None else 0 for r in shown],
              [r.delta.high - r.delta.mean if r.delta.high is not None else 0 for r in shown]]
    ax.barh(y, means, xerr=errors, color="tab:blue", alpha=0.7, capsize=3, label="ours (95% CI)")
    paper = [(i, r.paper_delta) for i, r in enumerate(shown) if r.paper_delta is not None]
    if paper:
        ax.scatter([p for _, p in paper], [i for i, _ in paper], marker="D", color="tab:red",
                   zorder=3, label="paper (dense Table 2 where it has the variant, else MoE)")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [r.variant for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Δ validation PPL vs baseline (negative is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_profile(runs: list[RunRecord], prefix: str) -> list[float]:
    """Mean over seeds of `<prefix>/layer_<i>` (lab.analysis.layer_metric), by layer."""
    by_layer: dict[int, list[float]] = {}
    for run in runs:
        for name, value in run.metrics.items():
            parts = split_layer_metric(name)
            if parts is not None and parts[0] == prefix and math.isfinite(value):
                by_layer.setdefault(parts[1], []).append(value)
    return [float(np.mean(by_layer[i])) for i in sorted(by_layer)]


def plot_per_layer(rows: list[Row], path: Path) -> bool:
    """One panel per LAYER_METRICS entry, one line per variant (mean over seeds); False when
    no run carries per-layer metrics (nothing is written)."""

    profiles = [[(row, layer_profile(row.runs, prefix)) for row in rows]
                for prefix, _ in LAYER_METRICS]
    if not any(values for panel in profiles for _, values in panel):
        return False
    fig, axes = plt.subplots(1, len(LAYER_METRICS), figsize=(13, 5))
    colours, styles = row_styles(rows)
    for ax, (_, title), panel in zip(axes, LAYER_METRICS, profiles):
        for row, values in panel:
            if values:
                ax.plot(range(len(values)), values, marker="o", markersize=3,
                        color=colours[row.variant], linestyle=styles[row.lr],
                        label=_row_label(row, rows))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_xlabel("layer (0 = first)")
        ax.set_ylabel(title + " (mean over seeds)")
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_lr(all_rows: list[Row], path: Path) -> None:
    """Final validation loss against learning rate, one line per variant (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    variants = sorted({r.variant for r in all_rows}, key=_variant_order)
    for variant in variants:
        points = sorted((r.lr, np.mean([x.metrics["val/final_loss"] for x in r.runs
                                        if "val/final_loss" in x.metrics and not x.diverged]))
                        for r in all_rows if r.variant == variant
                        and any("val/final_loss" in x.metrics and not x.diverged for x in r.runs))
        if points:
            ax.plot(*zip(*points), marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats, mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The sink measures a run logs through training (`train.analysis_every`; lab/analysis/metrics.py):
# Gu et al.'s share on 64-token windows with and without BOS (trend 7's measure) and F-Attn.
SINK_HISTORY = (("sink/head_share_short", "Gu's Sink^0.3 share, 64-token BOS windows"),
                ("sink/head_share_short_random", "Gu's Sink^0.3 share, 64-token windows, no BOS"),
                ("sink/first_token_attn", "F-Attn, 1,024-token BOS windows"))


def sink_histories(client, rows: list[Row]) -> dict[str, dict[str, dict[int, dict[float, float]]]]:
    """metric -> variant -> seed -> {tokens trained: value}, for the runs that logged a sink
    measure at more than one step. Tokens per step: the run's `tokens/seen` over its step."""
    out: dict = {}
    for row in rows:
        for run in row.runs:
            seen = max(client.get_metric_history(run.run_id, "tokens/seen"),
                       key=lambda m: m.step, default=None)
            per_step = seen.value / seen.step if seen is not None and seen.step else None
            for name, _ in SINK_HISTORY:
                history = client.get_metric_history(run.run_id, name)
                if len(history) < 2 or per_step is None:
                    continue
                out.setdefault(name, {}).setdefault(row.variant, {})[run.seed] = {
                    m.step * per_step: m.value for m in sorted(history, key=lambda m: m.step)}
    return out


def sink_history_table(histories: dict) -> str:
    """Per variant and logged step, the mean over seeds of each sink measure."""
    names = [(n, title) for n, title in SINK_HISTORY if n in histories]
    variants = sorted({v for n, _ in names for v in histories[n]}, key=_variant_order)
    header = ["variant", "tokens trained", *[f"{title} (mean over seeds)" for _, title in names],
              "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        runs = {n: histories[n].get(variant, {}) for n, _ in names}
        points = sorted({t for by_seed in runs.values() for h in by_seed.values() for t in h})
        for tokens in points:
            cells, seeds = [], 0
            for name, _ in names:
                values = [h[tokens] for h in runs[name].values() if tokens in h]
                seeds = max(seeds, len(values))
                cells.append(_fmt(float(np.mean(values)) if values else None, 3))
            lines.append("| " + " | ".join([variant, f"{tokens:.3g}", *cells, str(seeds)]) + " |")
    return "\n".join(lines)


def plot_sink_histories(histories: dict, path: Path) -> None:
    """Sink measure against tokens trained, one panel per measure, one colour per variant:
    each seed thin, the mean over seeds (at the steps every seed logged) thick."""
    names = [(n, title) for n, title in SINK_HISTORY if n in histories]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    variants = sorted({v for n, _ in names for v in histories[n]}, key=_variant_order)
    colours = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)}
    for ax, (name, title) in zip(axes[0], names):
        for variant, by_seed in histories[name].items():
            for history in by_seed.values():
                ax.plot(list(history), list(history.values()), color=colours[variant],
                        linewidth=0.8, alpha=0.35)
            common = sorted(set.intersection(*(set(h) for h in by_seed.values())))
            ax.plot(common, [np.mean([h[t] for h in by_seed.values()]) for t in common],
                    color=colours[variant], linewidth=2.2, marker="o", markersize=3,
                    label=f"{variant} ({len(by_seed)} seeds)")
        ax.set_xlabel("tokens trained")
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=9)
        # shares and attention mass: 0 is their floor and the reference, shown just above the
        # axis so that a variant at 0 stays visible
        ax.set_ylim(bottom=-0.02 * ax.get_ylim()[1])
    axes[0][0].legend(fontsize=7)
    fig.suptitle("the sink through training (thin: each seed; thick: the mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the report ----------------------------------------------------------------------------

def build_report(grid: str, uri: str | None = None, out: str | Path | None = None,
                 log_to_parent: bool = True,
                 equivalence_percent: float = trends.EQUIVALENCE_PERCENT,
                 control: str | None = None,
                 broke_margin: float = trends.BROKE_MARGIN) -> Report:
    matplotlib.use("Agg")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one per artifact

    client, parent, run_records = load_runs(grid, uri)
    rows, all_rows = build_rows(run_records)
    if control == grid:
        raise LabError(f"report: --control {control} is the grid itself; name the grid that "
                       "changes one of its settings")
    controls = build_rows(load_runs(control, uri)[2])[0] if control else []
    out_dir = Path(out or Path("reports") / grid)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    n_lrs = len({r.lr for r in all_rows})
    note = (f"{len(run_records)} finished runs; rows at each variant's best of {n_lrs} learning rates"
            if n_lrs > 1 else f"{len(run_records)} finished runs")
    dense = is_dense(run_records)
    reference = ("its dense Table 2 (48 layers, 400B tokens, LR 4e-3) where it has the variant, "
                 "else its MoE-15A2B tables (1, 3, 4, 6)" if dense else
                 "its MoE-15A2B tables (1, 3, 4, 6)")
    markdown = (f"## Grid {grid}\n\n{note}. PPL: validation perplexity; CIs: 95%, t-distribution "
                f"over seeds; Δ paired by seed; paper Δ: {reference}, as 'paper Δ from' says; "
                "the last two columns give both where the paper has both.\n\n"
                f"{table}\n")
    if n_lrs > 1:
        markdown += ("\n### Every learning rate\n\nΔ against the baseline at its best LR.\n\n"
                     f"{markdown_table(all_rows)}\n"
                     "\n### Stability over the learning-rate ladder\n\n"
                     f"A run broke when it diverged or, at an LR above its variant's best "
                     f"rung, ended more than {broke_margin:g} nats above that rung's mean "
                     "final validation loss (`--broke-margin`).\n\n"
                     f"{stability_table(all_rows, broke_margin)}\n\n"
                     "Each variant against the baseline at the same LR and seed:\n\n"
                     f"{stability_pairs_table(all_rows, broke_margin)}\n")
    if control:
        markdown += (f"\n### Against the control grid {control}\n\nEach variant's Δ against "
                     f"{control}'s variants (each at its best LR), paired by seed.\n\n"
                     f"{control_table(rows, control, controls)}\n")
    histories = sink_histories(client, rows)
    if histories:
        markdown += ("\n### The sink through training\n\nThe sink measures the runs logged "
                     "every `train.analysis_every` steps (each variant at its best LR; the plot "
                     "is sink_vs_tokens.png).\n\n"
                     f"{sink_history_table(histories)}\n")
    verdicts = trends.evaluate(rows, all_rows, equivalence_percent, dense, broke_margin)
    markdown += ("\n### The paper's trends (spec §6), as this grid tests them\n\n"
                 f"{trends.markdown(verdicts, equivalence_percent)}\n")
    files = [out_dir / "report.md", out_dir / "report.csv", out_dir / "loss_curves.png",
             out_dir / "delta_ppl.png"]
    files[0].write_text(markdown)
    write_csv(rows, files[1])
    plot_loss_curves(client, all_rows if n_lrs > 1 else rows, files[2])
    plot_deltas(rows, files[3])
    if plot_per_layer(rows, out_dir / "per_layer.png"):
        files.append(out_dir / "per_layer.png")
    (out_dir / "sink_vs_tokens.png").unlink(missing_ok=True)  # (from an earlier report)
    if histories:
        files.append(out_dir / "sink_vs_tokens.png")
        plot_sink_histories(histories, files[-1])
    (out_dir / "control.csv").unlink(missing_ok=True)  # (from an earlier report with one)
    if control:
        files.append(out_dir / "control.csv")
        write_control_csv(rows, control, controls, files[-1])
    # With one LR every (variant, LR) is a row of report.csv already: no copy of it.
    (out_dir / "all_lrs.csv").unlink(missing_ok=True)
    if n_lrs > 1:
        files += [out_dir / "all_lrs.csv", out_dir / "lr_vs_loss.png"]
        write_csv(all_rows, files[-2])
        plot_lr(all_rows, files[-1])
        if plot_ladder(all_rows, lambda run_id: run_history(client, run_id),
                              out_dir / "ladder.png", row_styles(all_rows)[0]):
            files.append(out_dir / "ladder.png")
    if log_to_parent:
        for file in files:
            client.log_artifact(parent, str(file), artifact_path="report")
        log_summary(client, parent, rows, all_rows, verdicts)
    return Report(grid, rows, all_rows, markdown, out_dir, files, verdicts)


def summary_rows(rows: list[Row]) -> list[list[str]]:
    """The short table: variant (with its LR when the grid has several), seeds, val PPL
    (mean ± std), Δ vs the baseline and its 95% CI."""
    table = [["variant", "seeds", "val PPL", "Δ vs baseline", "Δ 95% CI"]]
    for row in rows:
        ppl = "-" if row.ppl is None else f"{row.ppl.mean:.3f}" + (
            "" if row.ppl.std is None else f" ± {row.ppl.std:.3f}")
        if row.variant == BASELINE:
            delta, ci = "(reference)", ""
        else:
            delta, ci = _fmt_interval(row.delta, signed=True)
            delta = delta.split(" ± ")[0]
        name = f"{row.variant} lr={row.lr:g}" if len({r.lr for r in rows}) > 1 else row.variant
        table.append([name, str(len(row.runs)), ppl, delta, ci])
    return table


# What `gatelab report` and `gatelab demo` print fits TERMINAL_COLUMNS; the full tables (29
# columns at `smoke`, 479 characters a line) are report.md and report.csv.


def terminal_summary(report: Report) -> str:
    """`summary_rows` in aligned columns, for a terminal."""
    table = summary_rows(report.rows)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(clip("  ".join(cell.ljust(width) for cell, width in zip(line, widths))
                          .rstrip()) for line in table)


def terminal_report(report: Report) -> str:
    """What `gatelab report` prints of one grid: the short table, each trend's verdict in a
    line, and where the full report is."""
    lines = [f"grid {report.grid}", "", terminal_summary(report)]
    judged = [v for v in report.verdicts if v.verdict != "not in this grid"]
    if judged:
        lines += ["", "the paper's trends here (each comparison behind them: report.md):"]
        lines += [clip(f"{v.trend.number:>3}. {v.verdict}: {v.trend.claim}") for v in judged]
    lines += ["", "the full report (every column, the trends' comparisons, plots; also on the "
              "grid's parent run):", f"  {report.out_dir}/report.md and report.csv"]
    return "\n".join(lines)


def log_summary(client, parent: str, rows: list[Row], all_rows: list[Row],
                verdicts: list | None = None) -> None:
    """The report's summary on the grid's parent run, where its MLflow page shows it: the
    short table and the trend verdicts (lab/reports/trends.py) as the run's description,
    and per variant `report/<variant>/val_ppl_mean`,
    `.../delta_ppl_mean`, `.../delta_ppl_ci_low` and `.../delta_ppl_ci_high` as metrics.
    The cell runs get one colour per variant (`mlflow.runColor`), those of the loss plot."""
    table = summary_rows(rows)
    lines = ["| " + " | ".join(line) + " |" for line in table]
    lines.insert(1, "|" + "---|" * len(table[0]))
    verdict_lines = [] if not verdicts else [
        "", "The paper's trends here (each comparison behind them: report/report.md):", "",
        "| # | trend | verdict |", "|---|---|---|",
        *(f"| {v.trend.number} | {v.trend.claim} | {v.verdict} |" for v in verdicts
          if v.verdict != "not in this grid")]
    client.set_tag(parent, MLFLOW_RUN_NOTE, "gatelab report (full tables and plots: the "
                   "report/ artifacts)\n\n" + "\n".join(lines + verdict_lines))
    metrics = {}
    for row in rows:
        values = {"val_ppl_mean": row.ppl and row.ppl.mean}
        if row.variant != BASELINE and row.delta is not None:
            values.update(delta_ppl_mean=row.delta.mean, delta_ppl_ci_low=row.delta.low,
                          delta_ppl_ci_high=row.delta.high)
        metrics.update({f"report/{row.variant}/{name}": v for name, v in values.items()})
    records.log_metrics(client, parent, metrics, 0)  # None (no value) is left out
    colours, _ = row_styles(all_rows)
    for row in all_rows:
        for run in row.runs:
            client.set_tag(run.run_id, "mlflow.runColor", colours[row.variant])
