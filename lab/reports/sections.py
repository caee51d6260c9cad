"""report.md as a list of sections: each a function of the grid's records, read once
(`GridRecords`, lab/reports/grid_report.py read_grid), that returns its Markdown and the files
it wrote beside report.md. The report is the sections' text in the order of `SECTIONS`; a
new section is a function here and its place in that list.

A section whose files depend on the grid (a control grid, several learning rates, sink
series) removes them when it writes none, so that a report leaves no stale file of an
earlier one in its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.reports.criterion import CriterionResult
from lab.reports.criterion import markdown as criterion_markdown
from lab.reports.figures import (plot_deltas, plot_loss_curves, plot_lr, plot_per_layer,
                                 plot_sink_histories, row_styles, run_history)
from lab.reports.ladder import plot_ladder
from lab.reports.seeds import Row, RunRecord
from lab.reports.tables import (control_table, markdown_table, sink_history_table,
                                stability_pairs_table, stability_table, write_control_csv,
                                write_csv)
from lab.reports.trends.table import markdown as trends_markdown
from lab.reports.trends.verdicts import TrendResult


@dataclass(frozen=True)
class GridRecords:
    """What every section reads: the grid's runs as read from the store, their rows, the
    control grid's rows, the sink series and the trend verdicts; `client` reads the runs'
    loss histories (artifacts) for the plots."""
    grid: str
    client: object
    run_records: list[RunRecord]
    rows: list[Row]                # one per variant, at its best LR
    all_rows: list[Row]            # one per (variant, LR)
    dense: bool                    # the preset's FFN: the paper's reference table
    control: str | None            # the control grid's name, if any
    controls: list[Row]            # its rows, one per variant at its best LR
    histories: dict                # the sink measures through training (rows.sink_histories)
    verdicts: list[TrendResult]    # one per trend
    equivalence_percent: float
    broke_margin: float
    out_dir: Path
    criterion: CriterionResult | None = None  # the grid file's criterion, checked

    @property
    def n_lrs(self) -> int:
        return len({r.lr for r in self.all_rows})


@dataclass(frozen=True)
class Section:
    text: str = ""                 # Markdown, appended to report.md as it is
    files: tuple[Path, ...] = ()   # written into the report's folder, logged with report.md


def _drop(records: GridRecords, *names: str) -> None:
    """Remove files an earlier report of this folder wrote that this one does not."""
    for name in names:
        (records.out_dir / name).unlink(missing_ok=True)


def variants_table(records: GridRecords) -> Section:
    """The heading, what the table reads, and one row per variant (report.csv the same)."""
    note = (f"{len(records.run_records)} finished runs; rows at each variant's best of "
            f"{records.n_lrs} learning rates" if records.n_lrs > 1
            else f"{len(records.run_records)} finished runs")
    reference = ("its dense Table 2 (48 layers, 400B tokens, LR 4e-3) where it has the variant, "
                 "else its MoE-15A2B tables (1, 3, 4, 6)" if records.dense else
                 "its MoE-15A2B tables (1, 3, 4, 6)")
    path = records.out_dir / "report.csv"
    write_csv(records.rows, path)
    return Section(f"## Grid {records.grid}\n\n{note}. PPL: validation perplexity; CIs: 95%, "
                   f"t-distribution over seeds; Δ paired by seed; paper Δ: {reference}, as "
                   "'paper Δ from' says; the last two columns give both where the paper has "
                   f"both.\n\n{markdown_table(records.rows)}\n", (path,))


def plots(records: GridRecords) -> Section:
    """Training loss (every LR's runs when there are several), Δ PPL, per-layer profiles."""
    out = records.out_dir
    files = [out / "loss_curves.png", out / "delta_ppl.png"]
    plot_loss_curves(records.client, records.all_rows if records.n_lrs > 1 else records.rows,
                     files[0])
    plot_deltas(records.rows, files[1])
    if plot_per_layer(records.rows, out / "per_layer.png"):
        files.append(out / "per_layer.png")
    return Section(files=tuple(files))


def learning_rates(records: GridRecords) -> Section:
    """With several LRs: every (variant, LR), the stability over the ladder, each gate paired
    with the baseline at the same LR and seed; all_lrs.csv, lr_vs_loss.png and ladder.png."""
    # With one LR every (variant, LR) is a row of report.csv already: no copy of it.
    _drop(records, "all_lrs.csv")
    if records.n_lrs < 2:
        return Section()
    out, all_rows, margin = records.out_dir, records.all_rows, records.broke_margin
    files = [out / "all_lrs.csv", out / "lr_vs_loss.png"]
    write_csv(all_rows, files[0])
    plot_lr(all_rows, files[1])
    if plot_ladder(all_rows, lambda run_id: run_history(records.client, run_id),
                   out / "ladder.png", row_styles(all_rows)[0]):
        files.append(out / "ladder.png")
    return Section("\n### Every learning rate\n\nΔ against the baseline at its best LR.\n\n"
                   f"{markdown_table(all_rows)}\n"
                   "\n### Stability over the learning-rate ladder\n\n"
                   f"A run broke when it diverged or, at an LR above its variant's best "
                   f"rung, ended more than {margin:g} nats above that rung's mean "
                   "final validation loss (`--broke-margin`).\n\n"
                   f"{stability_table(all_rows, margin)}\n\n"
                   "Each variant against the baseline at the same LR and seed:\n\n"
                   f"{stability_pairs_table(all_rows, margin)}\n", tuple(files))


def against_control(records: GridRecords) -> Section:
    """With a control grid: each variant's Δ against the control's same variant, else its
    baseline (control.csv; tables.control_deltas)."""
    _drop(records, "control.csv")
    control = records.control
    if not control:
        return Section()
    path = records.out_dir / "control.csv"
    write_control_csv(records.rows, control, records.controls, path)
    return Section(f"\n### Against the control grid {control}\n\nEach variant's Δ against "
                   f"the same variant of {control} where it has one (one factor changes: its "
                   "setting), else against its baseline (two change: the setting and the "
                   "variant), as 'factors changed' says; each at its best LR, paired by seed."
                   "\n\n"
                   f"{control_table(records.rows, control, records.controls)}\n", (path,))


def sink_through_training(records: GridRecords) -> Section:
    """Where runs logged the sink measures through training: their means and the plot."""
    _drop(records, "sink_vs_tokens.png")
    if not records.histories:
        return Section()
    path = records.out_dir / "sink_vs_tokens.png"
    plot_sink_histories(records.histories, path)
    return Section("\n### The sink through training\n\nThe sink measures the runs logged "
                   "every `train.analysis_every` steps (each variant at its best LR; the plot "
                   "is sink_vs_tokens.png).\n\n"
                   f"{sink_history_table(records.histories)}\n", (path,))


def grid_criterion(records: GridRecords) -> Section:
    """The grid file's criterion, each premise with its numbers (lab/reports/criterion.py)."""
    return Section(criterion_markdown(records.criterion))


def trends(records: GridRecords) -> Section:
    """Last: the paper's trends as this grid tests them (lab/reports/trends/)."""
    return Section("\n### The paper's trends (spec §6), as this grid tests them\n\n"
                   f"{trends_markdown(records.verdicts, records.equivalence_percent)}\n")


SECTIONS: list[Callable[[GridRecords], Section]] = [
    variants_table, plots, learning_rates, against_control, sink_through_training,
    grid_criterion, trends]


def write_sections(records: GridRecords) -> tuple[str, list[Path]]:
    """report.md's text, the sections' in order, and the files they wrote."""
    written = [section(records) for section in SECTIONS]
    return "".join(s.text for s in written), [f for s in written for f in s.files]
