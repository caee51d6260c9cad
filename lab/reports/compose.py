"""`gatelab report GRID [GRID ...]`: one grid's report (lab/reports/grid_report.py), or each
of several grids' (e.g. the two scales) and then the paper's trends across them: each trend's
verdict in each grid and the grids where it holds (trend 10, "the gains hold across
settings", and "at both scales, at one, or at neither"), as reports/trends-<grids>.md and a
line a trend on the terminal.

The input is checked before anything is read or written: a grid the store plainly lacks
(read with sqlite3 alone: lab/records/lookup.py missing_grid), the report's options.
"""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError
from lab.progress import clip
from lab.records.lookup import missing_grid


def check_report_options(grids: list[str], out: str | None, equivalence_percent: float | None,
                         broke_margin: float | None) -> None:
    if equivalence_percent is not None and not equivalence_percent > 0:
        raise LabError(f"report: --equivalence-percent must be above 0, not "
                       f"{equivalence_percent:g}")
    if broke_margin is not None and not broke_margin > 0:
        raise LabError(f"report: --broke-margin must be above 0 nats, not {broke_margin:g}")
    if out and len(grids) > 1:
        raise LabError("report: --out takes one grid; with several, each goes to reports/<grid>")


def grid_file(path: str):
    """(the grid's name, its criterion or None) from a grid file named on the command line,
    read and checked as `gatelab grid` reads it (without MLflow's import), its trends too:
    a bad one is refused before any grid's report is written."""
    from lab.experiments.schema import load_grid
    from lab.reports.criterion import check_trends

    spec = load_grid(path)  # (a missing file: "grid file: PATH not found", as for the grid)
    if spec.criterion is not None:
        check_trends(spec.criterion, f"report: grid file {path}")
    return spec.name, spec.criterion


def report_grids(grids: list[str], uri: str | None = None, out: str | None = None,
                 control: str | None = None, equivalence_percent: float | None = None,
                 broke_margin: float | None = None) -> str:
    """Write the grids' reports (and, for several, the trends across them); return what the
    terminal shows of them. `equivalence_percent` and `broke_margin` None: the trends'
    defaults (one constant each, in lab/reports/trends/, so the CLI repeats neither)."""
    files = {}  # grid name -> its grid file's criterion, for grids given as files
    names = []
    for grid in grids:
        if grid.endswith((".yaml", ".yml")):
            name, criterion = grid_file(grid)
            files[name] = (criterion, f"the grid file {grid}")
            grid = name
        names.append(grid)
    grids = names
    for grid in grids + ([control] if control else []):
        error = missing_grid(grid, uri)  # (at once, without MLflow's import)
        if error is not None:
            raise error
    # MLflow, matplotlib and scipy only now: a missing grid's error line does not wait for
    # them (tests/integration/test_cli_terminal.py; the start-up cost in lab/commands.py).
    from lab.reports.grid_report import build_report, terminal_report

    grids = list(dict.fromkeys(grids))
    check_report_options(grids, out, equivalence_percent, broke_margin)
    band = {key: value for key, value in (("equivalence_percent", equivalence_percent),
                                          ("broke_margin", broke_margin)) if value is not None}
    if len(grids) == 1:
        return terminal_report(build_report(grids[0], uri, out, control=control,
                                            grid_file=files.get(grids[0]), **band))
    # (the control grid, when it is one of the grids, is reported on its own)
    reports = [build_report(grid, uri, control=None if grid == control else control,
                            grid_file=files.get(grid), **band)
               for grid in grids]
    return across_grids({report.grid: report.verdicts for report in reports},
                        [f"{report.grid}: written to {report.out_dir} (and logged to its "
                         "parent run)" for report in reports])


def across_grids(by_grid: dict[str, list], lines: list[str]) -> str:
    """The trends side by side in reports/trends-<grids>.md (as wide as its claims and grids:
    a file), and a line a trend for the terminal after `lines`."""
    from lab.reports.trends.table import across, holds_in  # (scipy: as build_report above)

    path = Path("reports") / f"trends-{'+'.join(by_grid)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"## The paper's trends across these grids\n\n{across(by_grid)}\n")
    return "\n".join([*lines, "", "the paper's trends: the grids where each holds",
                      *(clip(line) for line in holds_in(by_grid)), "",
                      f"side by side, with each grid's verdict: {path}"])
