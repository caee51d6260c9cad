"""The report's figures: every run's training loss with its spikes (loss_curves.png), Δ PPL
beside the paper's (delta_ppl.png), the per-layer profiles (per_layer.png), final loss
against LR (lr_vs_loss.png) and the sink against tokens trained (sink_vs_tokens.png); the
colours are the runs' colours in MLflow too (row_styles)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from lab import records
from lab.analysis.names import split_layer_metric
from lab.reports.ladder import PROBE_SERIES, finite_peaks
from lab.reports.rows import SINK_HISTORY, metric_series, row_label, variant_order
from lab.reports.seeds import BASELINE, Row, RunRecord

# Per-layer curves of the paper's Fig. 2 and 6: first-token attention and the largest hidden
# activation after each layer, logged as `<prefix>/layer_<i>`.
LAYER_METRICS = (("layers/sink/first_token_attn", "attention to the first token (BOS)"),
                 ("layers/act/max", "max |hidden activation|"))


def _artifact_json(client, run_id: str, name: str):
    """The run's JSON artifact, None without it; a plot draws without an unreadable one."""
    try:
        text = records.read_artifact_text(client, run_id, name)
    except Exception:
        return None
    return None if text is None else json.loads(text)


def loss_history(client, run_id: str) -> tuple[list[int], list[float]]:
    """The run's per-step training loss: the loss_history.json artifact (every step), else
    MLflow's train/loss history (every log interval)."""
    data = _artifact_json(client, run_id, "loss_history.json")
    if data and data.get("step"):
        return list(data["step"]), list(data["loss"])
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def run_history(client, run_id: str) -> dict:
    """loss_history.json (step, loss, grad_norm) with the spike peaks of spikes.json, and the
    probe measures a run logged through training (`train.analysis_every`: the largest
    attention logit, massive activations; PROBE_SERIES), for the ladder plot
    (lab/reports/ladder.py)."""
    data = _artifact_json(client, run_id, "loss_history.json") or {}
    data["spike_steps"] = spike_steps(client, run_id)
    data["probes"] = {}
    for metric in PROBE_SERIES:
        points = metric_series(client, run_id, metric)
        if len(points) > 1:  # one point is the end-of-run analysis alone, not a series
            data["probes"][metric] = points
    return data


def spike_steps(client, run_id: str) -> list[int]:
    """The peak step of each loss spike the run's detector found (spikes.json)."""
    return [s["peak_step"] for s in _artifact_json(client, run_id, "spikes.json") or []]


# Well-separated colours, one per variant (matplotlib's tab10, then the darker half of tab20
# and its lighter half), and one line style per learning rate.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
LINE_STYLES = ("-", "--", ":", "-.")


def row_styles(rows: list[Row]) -> tuple[dict[str, str], dict[float, str]]:
    """(colour by variant, line style by LR) for the plots and the MLflow runs' colours."""
    variants = sorted({r.variant for r in rows}, key=variant_order)
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
                    alpha=0.85, label=row_label(row, rows) if k == 0 else None)
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
    """Mean over seeds of `<prefix>/layer_<i>` (lab/analysis/names.py layer_metric), by layer."""
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
                        label=row_label(row, rows))
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
    variants = sorted({r.variant for r in all_rows}, key=variant_order)
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


def plot_sink_histories(histories: dict, path: Path) -> None:
    """Sink measure against tokens trained, one panel per measure, one colour per variant:
    each seed thin, the mean over seeds (at the steps every seed logged) thick."""
    names = [(n, title) for n, title in SINK_HISTORY if n in histories]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    variants = sorted({v for n, _ in names for v in histories[n]}, key=variant_order)
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


