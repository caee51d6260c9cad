"""`gatelab sweep-report <sweep>` and the table `gatelab sweep` prints: a sweep's studies
summarised per variant (best LR, max stable LR, every LR's outcome) as a text table,
summary.json and the loss-vs-LR plot, logged to the studies' MLflow parent runs.

The summaries themselves (`summarize_sweep`, `VariantSummary`) stay in
lab/experiments/sweep/results.py: the sweep logs `best/lr` to its parent runs when it ends and
a grid's `lrs: {from_sweep:}` reads `best_lrs`, and experiments import nothing of reports.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lab import records
from lab.errors import LabError
from lab.experiments.sweep.results import STABLE_TOLERANCE, VariantSummary, summarize_sweep


def format_summary(summaries: dict[str, VariantSummary]) -> str:
    def lr(value):
        return f"{value:.3g}" if value is not None else "-"

    lines = []
    for variant, s in summaries.items():
        counts = ", ".join(f"{n} {state}" for state, n in s.counts.items() if n)
        best = f"{s.best_loss:.4f}" if s.best_loss is not None else "-"
        lines.append(f"{variant}: best lr {lr(s.best_lr)} (val loss {best}), max stable lr "
                     f"{lr(s.max_stable_lr)} (within {s.tolerance:.0%}, no divergence); "
                     f"trials: {counts or 'none'}")
        for p in s.points:
            loss = f"{p.mean_loss:.4f}" if p.mean_loss is not None else "-"
            outcome = ", ".join(f"{getattr(p, k)} {k}" for k in ("diverged", "pruned", "failed")
                                if getattr(p, k))
            spikes = "/".join(map(str, p.spikes)) if p.spikes else "-"
            lines.append(f"  lr {p.lr:<10.4g} val loss {loss:<8} spikes {spikes:<6} {outcome}")
    return "\n".join(lines)


def plot_summary(summaries: dict[str, VariantSummary], path: Path, title: str) -> Path:
    """Final validation loss against LR, one curve per variant; diverged LRs as crosses on
    the top edge, pruned-only LRs as open circles there too (they have no final loss)."""
    # Imported here: matplotlib takes half a second to import, and only sweep-report plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for variant, s in summaries.items():
        scored = [p for p in s.points if p.mean_loss is not None]
        line, = ax.plot([p.lr for p in scored], [p.mean_loss for p in scored], marker="o",
                        label=variant)
        diverged = [p.lr for p in s.points if p.diverged]
        if diverged:
            ax.scatter(diverged, [0.97] * len(diverged), marker="x", s=60, color=line.get_color(),
                       transform=top, clip_on=False)
        pruned = [p.lr for p in s.points if p.pruned and p.mean_loss is None and not p.diverged]
        if pruned:
            ax.scatter(pruned, [0.93] * len(pruned), marker="o", facecolors="none",
                       color=line.get_color(), transform=top, clip_on=False)
        if s.max_stable_lr is not None:
            ax.axvline(s.max_stable_lr, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    every_lr = [p.lr for s in summaries.values() for p in s.points]
    if every_lr:  # diverged and pruned LRs sit on the top edge: keep them inside the axes
        ax.set_xlim(min(every_lr) / 1.3, max(every_lr) * 1.3)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title(f"{title}  (x: diverged, o: pruned, dotted: max stable LR)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_report(sweep_name: str, storage: str | None = None, out: str | Path | None = None,
                 tracking_uri: str | None = None,
                 tolerance: float = STABLE_TOLERANCE) -> tuple[dict[str, VariantSummary], Path]:
    """Summaries, a text table, summary.json and the loss-vs-LR plot under `out` (default
    reports/sweeps/<sweep>/), all logged to the studies' MLflow parent runs."""
    if not 0 <= tolerance < 1:
        raise LabError(f"--tolerance: must lie in [0, 1), got {tolerance!r}")
    summaries = summarize_sweep(sweep_name, storage, tolerance=tolerance)
    uri = records.tracking_uri(tracking_uri)
    directory = Path(out) if out else Path("reports") / "sweeps" / sweep_name
    directory.mkdir(parents=True, exist_ok=True)
    plot = plot_summary(summaries, directory / "val_loss_vs_lr.png", f"sweep {sweep_name}")
    text = format_summary(summaries)
    (directory / "summary.txt").write_text(text + "\n")
    (directory / "summary.json").write_text(json.dumps(
        {v: dataclasses.asdict(s) for v, s in summaries.items()}, indent=2))
    mlflow_client = records.client(uri)
    experiment = mlflow_client.get_experiment_by_name(sweep_name)
    if experiment is not None:
        parents = f"tags.{records.SWEEP_ROLE_TAG} = 'parent'"
        for run in mlflow_client.search_runs([experiment.experiment_id], filter_string=parents):
            for name in ("val_loss_vs_lr.png", "summary.txt", "summary.json"):
                mlflow_client.log_artifact(run.info.run_id, str(directory / name), "sweep_report")
    return summaries, plot
