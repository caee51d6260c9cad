"""The grid file's success criterion (lab/experiments/criterion.py) against the grid's runs:
each premise met, not met, or not checkable (what it needs was not logged), with the
numbers; and the verdicts of the trends it gates, made "not testable here" where the premise
is not met, so that the verdict line says what the file said beforehand it would take.

Where the criterion comes from: the grid file given to `gatelab report` (a path), else the
grid.yaml the grid's parent run holds, which each `gatelab grid` start records (the file the
grid last ran with); a grid run before criteria existed has none there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import yaml

from lab import records
from lab.errors import LabError
from lab.experiments.criterion import Criterion, Premise, read_criterion
from lab.reports.rows import metric_series
from lab.reports.seeds import Row
from lab.reports.trends.measures import BROKE_MARGIN, broken_runs
from lab.reports.trends.verdicts import TrendResult


@dataclass(frozen=True)
class PremiseResult:
    premise: Premise
    met: bool | None               # None: not checkable from what the runs logged
    evidence: str


@dataclass(frozen=True)
class CriterionResult:
    criterion: Criterion
    source: str                    # where it was read: the grid file, or the parent's grid.yaml
    premises: tuple[PremiseResult, ...]

    @property
    def met(self) -> bool | None:
        """True when every premise holds (or there is none); False when one fails; None
        when none fails but one could not be checked."""
        if any(p.met is False for p in self.premises):
            return False
        return None if any(p.met is None for p in self.premises) else True

    def summary(self) -> str:
        margin = self.criterion.broke_margin
        if not self.premises:
            return "no premise" + (f"; broke margin {margin:g} nats" if margin is not None else "")
        word = {True: "met", False: "not met", None: "not checkable"}[self.met]
        failing = [p.evidence for p in self.premises if p.met is not True]
        return f"premise {word}" + (f": {'; '.join(failing)}" if failing else "")


def parent_criterion(client, parent: str) -> Criterion | None:
    """The criterion of the grid.yaml on the grid's parent run, None without one."""
    # (a parent without grid.yaml was made before grids logged it; one that has it but
    # cannot be read is an error, not "no criterion": its trends would go ungated unnoticed)
    text = records.read_artifact_text(client, parent, "grid.yaml")
    if text is None:
        return None
    raw = yaml.safe_load(text) or {}
    value = raw.get("criterion") if isinstance(raw, dict) else None
    return None if value is None else read_criterion(value, "the parent run's grid.yaml: criterion")


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def check_break(premise: Premise, all_rows: list[Row], margin: float) -> PremiseResult:
    """A ladder premise: at some LR, the variant broke (diverged, or ended more than `margin`
    nats above its best rung: lab/reports/trends/measures.py broken_runs) in every seed
    that ran there, at least 2."""
    ladder = sorted((r for r in all_rows if r.variant == premise.variant), key=lambda r: r.lr)
    name = f"{premise.variant} breaks in every seed at some LR (margin {margin:g} nats)"
    if len({r.lr for r in ladder}) < 2:
        return PremiseResult(premise, None, f"{name}: {premise.variant} has finished runs at "
                             f"{len(ladder)} LR(s) here, no ladder")
    broken = broken_runs(ladder, margin)
    counts = [(rung.lr, sum(broken[(rung.lr, run.seed)] for run in rung.runs), len(rung.runs))
              for rung in ladder]
    met = any(n >= 2 and hit == n for _, hit, n in counts)
    per_rung = ", ".join(f"{lr:g}: {hit} of {n}" for lr, hit, n in counts)
    # (a grid still running may have one seed broken at a rung: say why that is not yet "yes")
    one_seed = not met and any(n == 1 and hit == 1 for _, hit, n in counts)
    why = "; a rung needs at least 2 seeds, all broken" if one_seed else ""
    return PremiseResult(premise, met, f"{name}: {'yes' if met else 'no'} (broke, by LR: "
                         f"{per_rung}{why})")


def check_premise(premise: Premise, rows: list[Row], history, all_rows: list[Row] | None = None,
                  margin: float = BROKE_MARGIN) -> PremiseResult:
    """`history(run_id, metric)` -> [(step, value)]: the metric through training. A ladder
    premise (`breaks:`) reads every LR's rows, `all_rows`, with the grid's broke margin."""
    if premise.breaks is not None:
        return check_break(premise, all_rows if all_rows is not None else rows, margin)
    row = next((r for r in rows if r.variant == premise.variant), None)
    name = f"{premise.variant} {premise.measure}"
    if row is None:
        return PremiseResult(premise, None, f"{premise.variant} has no finished runs here")
    runs = sorted(row.runs, key=lambda run: run.seed)
    last = [run.metrics.get(premise.measure) for run in runs]
    if not runs or any(v is None for v in last):
        return PremiseResult(premise, None, f"{name}: not logged by every run")
    mean = sum(last) / len(last)
    level = mean >= premise.at_least
    text = (f"{name} at the last step: mean {mean:.3g} over {len(runs)} seeds ({_values(last)}), "
            f"at least {premise.at_least:g}: {'yes' if level else 'no'}")
    if premise.rises_from_step is None:
        return PremiseResult(premise, level, text)
    earlier, rose = [], []
    for run, final in zip(runs, last):
        points = sorted(history(run.run_id, premise.measure))
        at = next(((step, value) for step, value in points if step >= premise.rises_from_step),
                  None)
        if at is None or at[0] >= points[-1][0]:
            return PremiseResult(premise, None, f"{text}; {name} not logged through training "
                                 f"from step {premise.rises_from_step:,} (train.analysis_every)")
        earlier.append(at[1])
        rose.append(final > at[1])
    rising = all(rose)
    text += (f"; rose from step {premise.rises_from_step:,} ({_values(earlier)}) in "
             f"{sum(rose)} of {len(rose)} seeds: {'yes' if rising else 'no'}")
    return PremiseResult(premise, level and rising, text)


def check_trends(criterion: Criterion, where: str) -> None:
    """Each trend the criterion names is one of the paper's trends (LabError otherwise,
    its line starting with `where`)."""
    from lab.reports.trends.definitions import TRENDS

    known = [t.number for t in TRENDS]
    unknown = [n for n in criterion.trends if n not in known]
    if unknown:
        raise LabError(f"{where}: criterion: trends: {unknown[0]!r} is not a trend; "
                       f"the trends: {', '.join(known)}")


def evaluate_criterion(criterion: Criterion, source: str, rows: list[Row], client,
                       all_rows: list[Row] | None = None, margin: float = BROKE_MARGIN
                       ) -> CriterionResult:
    check_trends(criterion, f"report: {source}")

    def history(run_id: str, metric: str) -> list[tuple[int, float]]:
        return metric_series(client, run_id, metric)

    return CriterionResult(criterion, source, tuple(
        check_premise(p, rows, history, all_rows, margin) for p in criterion.premise))


def gate_verdicts(verdicts: list[TrendResult], result: CriterionResult | None
                  ) -> list[TrendResult]:
    """The verdicts, those of the criterion's trends "not testable here" where its premise
    is not met (their comparisons stay in the table, for the record)."""
    if result is None or result.met is True:
        return verdicts
    gated = set(result.criterion.trends)
    why = "not met" if result.met is False else "not checkable"
    return [replace(v, verdict=f"not testable here: the grid file's premise is {why} "
                    "(report.md, 'The grid file's criterion')")
            if v.trend.number in gated and v.verdict != "not in this grid" else v
            for v in verdicts]


def markdown(result: CriterionResult | None) -> str:
    if result is None:
        return ""
    criterion = result.criterion
    lines = ["", "### The grid file's criterion", "",
             f"From {result.source}; written {criterion.written}."]
    if result.premises:
        gated = ", ".join(criterion.trends)
        lines += ["", f"The premise (all must hold for trends {gated} to be tested here): "
                  f"**{result.summary().split(':')[0]}**.", ""]
        lines += [f"- {'met' if p.met else 'not met' if p.met is False else 'not checkable'}: "
                  f"{p.evidence}" for p in result.premises]
    if criterion.broke_margin is not None:
        lines += ["", f"Broke margin: {criterion.broke_margin:g} nats (the report's "
                  "--broke-margin for this grid, unless the command line gives one)."]
    return "\n".join(lines) + "\n"
