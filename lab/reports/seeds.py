"""A grid's runs and the statistics over their seeds that the report and the trend verdicts
share (lab/reports/grid_report.py, lab/reports/trends/): each FINISHED cell as a record,
the cells of one variant and LR as a row, means with t intervals, and deltas paired by seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import stats

from lab.records import CellRecord

BASELINE = "baseline"
CONFIDENCE = 0.95


@dataclass
class RunRecord:
    run_id: str
    variant: str
    lr: float
    seed: int
    metrics: dict
    diverged: bool
    ffn: str = "dense"   # the model's FFN (`model.ffn`): which of the paper's tables is its
    #                      reference (lab/reports/rows.py, set_paper_reference)

    @property
    def val_ppl(self) -> float | None:
        value = self.metrics.get("val/ppl")
        return None if self.diverged or value is None or not math.isfinite(value) else value


def finished_records(runs, metrics_of: Callable[[object], dict]) -> list[RunRecord]:
    """The FINISHED runs among a grid's cell runs as records, read by CellRecord.from_run:
    the latest per config hash (a cell trained again after it finished), each with the
    metrics `metrics_of(run)` reads."""
    latest: dict[str, CellRecord] = {}
    for cell in map(CellRecord.from_run, runs):
        if not cell.finished:
            continue
        key = cell.config_hash or cell.run_id
        if key not in latest or cell.end_time > latest[key].end_time:
            latest[key] = cell
    return [RunRecord(cell.run_id, cell.variant, cell.lr, cell.seed, metrics_of(cell.run),
                      cell.diverged, cell.ffn) for cell in latest.values()]


@dataclass
class Interval:
    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean, sample std and the two-sided t confidence interval (None below two values)."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return Interval(mean, None, None, None, 1)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1)) * std / math.sqrt(len(array))
    return Interval(mean, std, mean - half, mean + half, len(array))


@dataclass
class Row:
    variant: str
    lr: float
    runs: list[RunRecord]
    ppl: Interval | None
    delta: Interval | None = None
    paper_delta: float | None = None
    paper_baseline_ppl: float | None = None  # the paper's row its Δ is taken against
    paper_table: str = ""   # which of the paper's tables paper_delta is from ("MoE", "dense")
    # Both of the paper's references, where it gives both: (Δ PPL, the baseline PPL it is from).
    paper_moe: tuple[float, float] | None = None
    paper_dense: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)
    baseline_ppl: float | None = None   # the mean the Δ is taken against

    @property
    def delta_percent(self) -> float | None:
        """Δ over the baseline's mean PPL: the form that compares across scales (ours ~60,
        the paper's 6.026)."""
        if self.delta is None or not self.baseline_ppl:
            return None
        return 100 * self.delta.mean / self.baseline_ppl

    @property
    def paper_delta_percent(self) -> float | None:
        if self.paper_delta is None or not self.paper_baseline_ppl:
            return None
        return 100 * self.paper_delta / self.paper_baseline_ppl

    @property
    def diverged(self) -> int:
        return sum(r.diverged for r in self.runs)

    @property
    def spikes(self) -> int:
        return int(sum(r.metrics.get("spikes/count", 0) for r in self.runs))

    @property
    def max_spike_excess(self) -> float:
        return max((r.metrics.get("spikes/max_excess", 0.0) for r in self.runs), default=0.0)

    @property
    def direction(self) -> str:
        """Does our delta have the paper's sign? 'yes', 'no', with '(CI spans 0)' when our
        interval does not exclude zero; '-' when either side has no delta."""
        if self.paper_delta is None or self.delta is None or self.variant == BASELINE \
                or self.paper_delta == 0:
            return "-"
        agrees = "yes" if (self.delta.mean < 0) == (self.paper_delta < 0) else "no"
        if self.delta.low is not None and self.delta.low <= 0 <= self.delta.high:
            agrees += " (CI spans 0)"
        return agrees


def paired_delta(row: Row, baseline: Row) -> Interval | None:
    """PPL(variant) - PPL(baseline) per seed present and finite in both, then its t interval."""
    base = {r.seed: r.val_ppl for r in baseline.runs if r.val_ppl is not None}
    diffs = [r.val_ppl - base[r.seed] for r in row.runs if r.val_ppl is not None and r.seed in base]
    return t_interval(diffs)
