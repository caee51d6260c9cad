"""The per-run plots of cells trained by pool workers, drawn by the grid's own process.

A cell's end-of-run analysis (lab/training/run.py `_analyze`) ends with five figures
(lab/analysis/plots.py), 1.2-1.5 s of matplotlib on the 2-core CPU machine at `small`
(benchmarks/README.md), during which the cell's GPU slot trains nothing. A pool worker
hands the analysis back with its cell's outcome instead (train_run's `plots_elsewhere`),
and the grid's process, which only waits on its workers, draws and logs them into the
run's `analysis` folder on a thread of its own while the worker starts its next cell.

The run is FINISHED before its plots are in: a grid killed in between leaves the last
cells' `analysis.json` and metrics without their figures (`gatelab analyze RUN_ID` draws
them again from the checkpoint), and a plot that fails is said on stderr and in the run's
`analysis` tag, as an analysis that fails is.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from lab import records
from lab.analysis.metrics import Analysis
from lab.analysis.outputs import log_plots


class ParentPlots:
    """One thread that draws the plots handed to it, in turn; `close` waits for them."""

    def __init__(self, uri: str):
        self.uri = uri
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grid-plots")

    def draw(self, run_id: str, analysis: Analysis) -> None:
        self._thread.submit(self._draw, run_id, analysis)

    def _draw(self, run_id: str, analysis: Analysis) -> list[str]:
        # Everything inside the try: what this thread raises would stay in its future, unsaid.
        try:
            client = records.client(self.uri)
            return log_plots(client, run_id, analysis)
        except Exception as err:  # the run's metrics and analysis.json are in: say, go on
            why = f"plots failed: {type(err).__name__}: {err}"[:500]
            print(f"warning: run {run_id}: {why}", file=sys.stderr, flush=True)
            try:
                records.client(self.uri).set_tag(run_id, records.ANALYSIS_TAG, why)
            except Exception:
                pass
            return []

    def close(self) -> None:
        """Every plot handed over drawn and logged."""
        self._thread.shutdown(wait=True)
