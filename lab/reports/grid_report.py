"""`gatelab report <grid>`: compare a grid's variants from what MLflow holds.

One row per variant: validation perplexity over seeds (mean +- sample std, and a 95%
confidence interval from the t-distribution with n-1 degrees of freedom), the difference
to the baseline paired by seed (the same seed gives every variant the same data order and
the same initial draw of the shared weights, so differences are far less noisy than the
spread of either), with its own t interval; loss spikes; divergences; the analysis metrics
where runs carry them; and the paper's delta-PPL beside ours with whether the sign agrees:
from its dense Table 2 for a dense preset where the table has the variant (the G1 gates;
PAPER_DENSE_TABLE in lab/model/variants.py), else from its MoE tables (1, 3, 4, 6), with the
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
tests them (lab/reports/trends/): a verdict per trend and the paired comparison behind
each, with its raw and multiplicity-adjusted outcome and its power line. With several
learning rates, the stability section also pairs each gate with the baseline at the same LR
and seed (spikes, largest gradient norm, final loss, "broke"). Where runs logged the sink
measures through training (`train.analysis_every`), `sink_vs_tokens.png` plots them against
tokens trained, per variant (each seed and the mean), and report.md tabulates the means.

With a control grid (`--control GRID`: a grid that changes one setting of this one, such as
reproduce-base-init's depth-scaled init), report.md adds each variant's Δ against the same
variant of the control, one factor changed (the control's setting), or against the control's
baseline where the control lacks the variant (two factors changed, as the row says), paired
by seed like every other Δ (the same seed gives the same data order in both grids), and
`control.csv` holds them (lab/reports/tables.py control_deltas).

This module reads the grid once (`read_grid`: its runs, rows, sink series and trend verdicts)
and writes report.md as the sections of lab/reports/sections.py in their order, each with its
files; the rows, tables and figures are lab/reports/rows.py, tables.py and figures.py.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from lab import records
from lab.analysis.outputs import LAYER_TABLE, layer_metrics
from lab.errors import LabError
from lab.records import find_grid_parent, grid_cell_runs
from lab.progress import TERMINAL_COLUMNS, clip
from lab.records.lookup import no_grid
from lab.reports.criterion import (CriterionResult, evaluate_criterion, gate_verdicts,
                                   parent_criterion)
from lab.reports.figures import row_styles
from lab.reports.rows import build_rows, is_dense, sink_histories
from lab.reports.sections import GridRecords, write_sections
from lab.reports.seeds import BASELINE, Row, RunRecord, finished_records
from lab.reports.tables import markdown_head, markdown_row, summary_rows
from lab.reports.trends.measures import BROKE_MARGIN
from lab.reports.trends.verdicts import EQUIVALENCE_PERCENT, evaluate
from lab.training.schedule import steps_for_tokens, warmup_steps
from lab.training.spikes import GRAD_NORM_MAX_AFTER_WARMUP, grad_norm_max_after_warmup


@dataclass
class Report:
    grid: str
    rows: list[Row]
    all_rows: list[Row]
    markdown: str
    out_dir: Path
    files: list[Path]
    verdicts: list = field(default_factory=list)  # trends.verdicts.TrendResult, one per trend
    criterion: CriterionResult | None = None       # the grid file's, checked (reports/criterion.py)


# --- reading the store ------------------------------------------------------------------

def run_metrics(client, run) -> dict[str, float]:
    """The run's metrics, its per-layer values as `layers/...` names whichever way it holds
    them: a run since 2026-12-05 as its table (lab/analysis/outputs.py LAYER_TABLE), which
    wins over the same names as metrics (a run with `train.analysis_every` also has them as
    time series); an older run, the committed snapshots' included, as metrics only."""
    metrics = dict(run.data.metrics)
    table = records.read_artifact_text(client, run.info.run_id, LAYER_TABLE)
    if table is not None:
        metrics.update(layer_metrics(json.loads(table)))
    if GRAD_NORM_MAX_AFTER_WARMUP not in metrics:
        derived = grad_norm_after_warmup_of(client, run)
        if derived is not None:
            metrics[GRAD_NORM_MAX_AFTER_WARMUP] = derived
    return metrics


def grad_norm_after_warmup_of(client, run) -> float | None:
    """`train/grad_norm_max_after_warmup` of a run that finished before runs logged it
    (2026-12-06), from its per-step loss_history.json and the warmup its parameters set, as
    lab/training/run.py computes it for a run now; None without the history or the
    parameters, or where no step after warmup has a finite norm."""
    params = run.data.params
    try:
        steps = steps_for_tokens(float(params["train.tokens"]), int(params["train.batch_size"]),
                                 int(params["model.context"]))
        warmup = warmup_steps(steps, float(params["train.warmup_fraction"]))
    except (KeyError, ValueError):
        return None
    text = records.read_artifact_text(client, run.info.run_id, "loss_history.json")
    if text is None:
        return None
    history = json.loads(text)
    value = grad_norm_max_after_warmup(history.get("step", []), history.get("grad_norm", []),
                                       warmup)
    return None if math.isnan(value) else value


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


# --- the report ----------------------------------------------------------------------------

def read_grid(grid: str, uri: str | None, out_dir: Path, equivalence_percent: float,
              control: str | None, broke_margin: float | None,
              grid_file: tuple | None = None) -> tuple[str, GridRecords]:
    """(the grid's parent run, what the report's sections read: lab/reports/sections.py).
    `grid_file`: (criterion, where it was read) from a grid file on the command line; else
    the criterion is the one on the parent's grid.yaml (lab/reports/criterion.py)."""
    client, parent, run_records = load_runs(grid, uri)
    rows, all_rows = build_rows(run_records)
    if control == grid:
        raise LabError(f"report: --control {control} is the grid itself; name the grid that "
                       "changes one of its settings")
    controls = build_rows(load_runs(control, uri)[2])[0] if control else []
    dense = is_dense(run_records)
    criterion, source = grid_file if grid_file is not None else \
        (parent_criterion(client, parent), "the grid.yaml of the grid's parent run (the grid "
         "file it last ran with)")
    if broke_margin is None:  # the command line's, else the criterion's, else the default
        broke_margin = criterion.broke_margin if criterion and criterion.broke_margin \
            else BROKE_MARGIN
    judged = None if criterion is None else evaluate_criterion(criterion, source, rows, client,
                                                               all_rows, broke_margin)
    verdicts = gate_verdicts(evaluate(rows, all_rows, equivalence_percent, dense, broke_margin),
                             judged)
    return parent, GridRecords(grid, client, run_records, rows, all_rows, dense, control,
                               controls, sink_histories(client, rows), verdicts,
                               equivalence_percent, broke_margin, out_dir, judged)


def build_report(grid: str, uri: str | None = None, out: str | Path | None = None,
                 log_to_parent: bool = True,
                 equivalence_percent: float = EQUIVALENCE_PERCENT,
                 control: str | None = None,
                 broke_margin: float | None = None, grid_file: tuple | None = None) -> Report:
    matplotlib.use("Agg")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one per artifact

    out_dir = Path(out or Path("reports") / grid)
    parent, grid_records = read_grid(grid, uri, out_dir, equivalence_percent, control,
                                     broke_margin, grid_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, written = write_sections(grid_records)
    files = [out_dir / "report.md", *written]
    files[0].write_text(markdown)
    rows, all_rows, verdicts = grid_records.rows, grid_records.all_rows, grid_records.verdicts
    if log_to_parent:
        client = grid_records.client
        for file in files:
            client.log_artifact(parent, str(file), artifact_path="report")
        log_summary(client, parent, rows, all_rows, verdicts)
    return Report(grid, rows, all_rows, markdown, out_dir, files, verdicts,
                  grid_records.criterion)


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
    if report.criterion is not None:  # (wrapped, not clipped: its numbers are the point)
        lines += ["", *textwrap.wrap(f"the grid file's criterion: {report.criterion.summary()}",
                                     TERMINAL_COLUMNS, subsequent_indent="  ")]
    if judged:
        lines += ["", "the paper's trends here (each comparison behind them: report.md):"]
        lines += [clip(f"{v.trend.number:>3}. {v.verdict}: {v.trend.claim}") for v in judged]
    lines += ["", "the full report (every column, the trends' comparisons, plots; also on the "
              "grid's parent run):", f"  {report.out_dir}/report.md and report.csv"]
    return "\n".join(lines)


def log_summary(client, parent: str, rows: list[Row], all_rows: list[Row],
                verdicts: list | None = None) -> None:
    """The report's summary on the grid's parent run, where its MLflow page shows it: the
    short table and the trend verdicts (lab/reports/trends/) as the run's description,
    and per variant `report/<variant>/val_ppl_mean`,
    `.../delta_ppl_mean`, `.../delta_ppl_ci_low` and `.../delta_ppl_ci_high` as metrics.
    The cell runs get one colour per variant (`mlflow.runColor`), those of the loss plot."""
    table = summary_rows(rows)
    lines = markdown_head(table[0]) + [markdown_row(line) for line in table[1:]]
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
