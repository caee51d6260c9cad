"""The learning-rate ladder as the paper shows stability (its Fig. 1 right and section 4.3):
per rung, every run's training loss and gradient norm through training (and, where the runs
logged them, the largest attention logit and the massive activations), one colour per
variant and one line style per seed, the detected loss spikes marked, so that a reader sees
where a variant broke and whether the other did at the same LR and seed (the pairing the
verdict rules use, lab/reports/trends/measures.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from lab.reports.seeds import Row

SEED_STYLES = ("-", "--", ":", "-.")

# The probe measures drawn through training below the loss and gradient norm, where the runs
# logged them every `train.analysis_every` steps (lab/analysis/metrics.py): the largest
# attention logit, the early sign of divergence Wortsman et al. (2023) track, and the massive
# activations (M-Act) the paper ties to the sink; metric -> (axis label, log scale, short name).
PROBE_SERIES = {"attn/logit_max": ("largest attention logit", False, "attention logit"),
                "act/max_mean": ("M-Act (act/max_mean)", True, "M-Act")}

# history(run_id) -> {"step": [...], "loss": [...], "grad_norm": [...], "spike_steps": [...]}
History = Callable[[str], dict]


def finite_peaks(steps: list[int], losses: list[float], peaks: list[int]) -> list[int]:
    """The spike peaks that fall on a logged step with a finite loss: the ones a loss curve
    can mark (a peak at a NaN, or between logged steps, has no point to stand on)."""
    by_step = dict(zip(steps, losses))
    return [p for p in peaks if p in by_step and math.isfinite(by_step[p])]


def ladder_series(rows: list[Row], history: History) -> dict[float, list[dict]]:
    """For each LR rung, one entry per run: variant, seed, steps, loss, grad norm and the
    spike peaks that fall on a logged step with a finite loss. Runs without a history are
    left out (a run from before the history artifact existed)."""
    rungs: dict[float, list[dict]] = {}
    for row in rows:
        for run in row.runs:
            data = history(run.run_id) or {}
            steps = list(data.get("step") or [])
            if not steps:
                continue
            loss = list(data.get("loss") or [])
            norms = list(data.get("grad_norm") or [math.nan] * len(steps))
            peaks = finite_peaks(steps, loss, data.get("spike_steps") or [])
            probes = {metric: [(s, v) for s, v in points if math.isfinite(v)]
                      for metric, points in (data.get("probes") or {}).items()}
            rungs.setdefault(row.lr, []).append(
                {"variant": row.variant, "seed": run.seed, "step": steps, "loss": loss,
                 "grad_norm": norms, "spikes": peaks, "diverged": run.diverged,
                 "probes": {m: p for m, p in probes.items() if p}})
    return dict(sorted(rungs.items()))


def probe_panels(rungs: dict[float, list[dict]]) -> list[str]:
    """The probe measures some run of the ladder has a series of, in PROBE_SERIES's order."""
    held = {metric for runs in rungs.values() for entry in runs for metric in entry["probes"]}
    return [metric for metric in PROBE_SERIES if metric in held]


def plot_ladder(rows: list[Row], history: History, path: Path,
                colours: dict[str, str]) -> bool:
    """One column per LR rung: training loss (top), gradient norm before clipping (log
    scale), then each probe measure the runs logged through training (probe_panels). False,
    and nothing written, when no run has a history."""
    import matplotlib.pyplot as plt

    rungs = ladder_series(rows, history)
    if not rungs:
        return False
    panels = probe_panels(rungs)
    fig, axes = plt.subplots(2 + len(panels), len(rungs),
                             figsize=(4.2 * len(rungs) + 1, 3.5 * (2 + len(panels))),
                             squeeze=False, sharex="col")
    seeds = sorted({entry["seed"] for runs in rungs.values() for entry in runs})
    styles = {seed: SEED_STYLES[i % len(SEED_STYLES)] for i, seed in enumerate(seeds)}
    for column, (lr, runs) in enumerate(rungs.items()):
        loss_ax, norm_ax = axes[0][column], axes[1][column]
        for entry in runs:
            colour, style = colours.get(entry["variant"], "#333333"), styles[entry["seed"]]
            label = f"{entry['variant']} seed {entry['seed']}" + (" (diverged)" if entry["diverged"] else "")
            finite = [(s, v) for s, v in zip(entry["step"], entry["loss"]) if math.isfinite(v)]
            if finite:
                loss_ax.plot(*zip(*finite), color=colour, linestyle=style, linewidth=0.9,
                             alpha=0.85, label=label)
            norms = [(s, v) for s, v in zip(entry["step"], entry["grad_norm"])
                     if v is not None and math.isfinite(v) and v > 0]
            if norms:
                norm_ax.plot(*zip(*norms), color=colour, linestyle=style, linewidth=0.8, alpha=0.85)
            by_step = dict(zip(entry["step"], entry["loss"]))
            if entry["spikes"]:
                loss_ax.scatter(entry["spikes"], [by_step[p] for p in entry["spikes"]],
                                marker="x", s=40, color=colour, zorder=3)
            for row_index, metric in enumerate(panels, start=2):
                points = entry["probes"].get(metric)
                if points:
                    axes[row_index][column].plot(*zip(*points), color=colour, linestyle=style,
                                                 linewidth=0.9, marker=".", markersize=3)
        loss_ax.set_title(f"lr {lr:g}")
        norm_ax.set(yscale="log")
        for row_index, metric in enumerate(panels, start=2):
            label, log, _ = PROBE_SERIES[metric]
            if log:
                axes[row_index][column].set_yscale("log")
            if column == 0:
                axes[row_index][column].set_ylabel(label)
        axes[-1][column].set_xlabel("step")
        if column == 0:
            loss_ax.set_ylabel("training loss (nats; x: spike)")
            norm_ax.set_ylabel("gradient norm (before clipping)")
        loss_ax.legend(fontsize=7)
    shown = ["loss", "gradient norm", *(PROBE_SERIES[m][2] for m in panels)]
    fig.suptitle("The learning-rate ladder per rung, paired by seed:\n" + ", ".join(shown),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
