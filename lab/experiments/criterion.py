"""A grid file's success criterion, in a form the report can check (the project's rule: an
experiment's success criterion is written into its grid file before it runs; docs/grid.md,
"The criterion").

    criterion:
      written: 2026-12-05, before any cell ran   # when, in words (required)
      premise:                                   # what must hold for the grid to test its
        - variant: baseline                      # question; each item must hold
          measure: sink/first_token_attn
          at_least: 0.03          # the mean over seeds of each run's last value
          rises_from_step: 1000   # and in every seed, the last value above the one logged
                                  # at this step (the measure logged through training)
        - variant: baseline       # or, over a learning-rate ladder: at some LR the
          breaks: every seed      # variant broke in every seed that ran there (at least
                                  # 2): diverged, or ended more than broke_margin nats
                                  # above its best rung (lab/reports/trends/measures.py)
      trends: [7, 7f]             # the paper's trends the premise gates
      broke_margin: 0.05          # the report's --broke-margin for this grid

`gatelab report` evaluates it (lab/reports/criterion.py): where the premise is not met, the
trends it names are "not testable here", whatever their comparisons say, so a verdict line
never claims what the grid file said beforehand it could not test. This module reads and
checks the YAML only (no torch: `gatelab grid` refuses a bad criterion before it imports the
training stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from lab.errors import LabError
from lab.experiments.files import yaml_number

PREMISE_KEYS = ("variant", "measure", "at_least", "rises_from_step", "breaks")
BREAKS = ("every seed",)  # what a ladder premise may ask (one reading so far)
CRITERION_KEYS = ("written", "premise", "trends", "broke_margin")


@dataclass(frozen=True)
class Premise:
    variant: str
    measure: str | None           # a metric the runs log, e.g. sink/first_token_attn
    at_least: float | None        # the mean over seeds of the runs' last values
    rises_from_step: int | None = None
    breaks: str | None = None     # instead of a measure: the variant breaks on the ladder

    def to_dict(self) -> dict:
        if self.breaks is not None:
            return {"variant": self.variant, "breaks": self.breaks}
        out = {"variant": self.variant, "measure": self.measure, "at_least": self.at_least}
        if self.rises_from_step is not None:
            out["rises_from_step"] = self.rises_from_step
        return out


@dataclass(frozen=True)
class Criterion:
    written: str
    premise: tuple[Premise, ...] = ()
    trends: tuple[str, ...] = ()
    broke_margin: float | None = None

    def to_dict(self) -> dict:
        out: dict = {"written": self.written}
        if self.premise:
            out["premise"] = [p.to_dict() for p in self.premise]
        if self.trends:
            out["trends"] = list(self.trends)
        if self.broke_margin is not None:
            out["broke_margin"] = self.broke_margin
        return out


def _mapping(where: str, value, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise LabError(f"{where}: expected a mapping with keys {', '.join(keys)}, got {value!r}")
    unknown = [key for key in value if key not in keys]
    if unknown:
        raise LabError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(keys)}")
    return value


def _premise(where: str, value) -> Premise:
    from lab.model.variants import VARIANTS

    raw = _mapping(where, value, PREMISE_KEYS)
    variant = raw.get("variant")
    if variant in (None, ""):
        raise LabError(f"{where}: missing key 'variant'")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise LabError(f"{where}: variant: {variant!r} is not a variant (gatelab variants)")
    if "breaks" in raw:
        other = [key for key in ("measure", "at_least", "rises_from_step") if key in raw]
        if other:
            raise LabError(f"{where}: breaks: a premise is a measure or a break, not both "
                           f"(drop {other[0]!r})")
        if raw["breaks"] not in BREAKS:
            raise LabError(f"{where}: breaks: expected one of {', '.join(BREAKS)}, "
                           f"got {raw['breaks']!r}")
        return Premise(variant, None, None, None, raw["breaks"])
    missing = [key for key in PREMISE_KEYS[1:3] if raw.get(key) in (None, "")]
    if missing:
        raise LabError(f"{where}: missing key {missing[0]!r} (or `breaks:`)")
    measure = raw["measure"]
    if not isinstance(measure, str) or "/" not in measure:
        raise LabError(f"{where}: measure: expected a metric name such as "
                       f"sink/first_token_attn, got {measure!r}")
    step = raw.get("rises_from_step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise LabError(f"{where}: rises_from_step: expected a step (an integer >= 0), "
                       f"got {step!r}")
    return Premise(variant, measure,
                   yaml_number(f"{where}: at_least", raw["at_least"], positive=False), step)


def _trends(where: str, value) -> tuple[str, ...]:
    """The trend numbers as the report names them ('7', '7f'); that each is one of the
    paper's trends the report checks when it reads the criterion (lab/reports/criterion.py:
    the trends are defined there, above this package)."""
    if not isinstance(value, list) or not value or \
            not all(isinstance(item, (int, str)) and not isinstance(item, bool) for item in value):
        raise LabError(f"{where}: expected a list of the paper's trend numbers, e.g. [7, 7f]")
    return tuple(str(item) for item in value)


def read_criterion(value, where: str = "criterion") -> Criterion:
    """The `criterion:` mapping of a grid file, checked (LabError naming the key)."""
    raw = _mapping(where, value, CRITERION_KEYS)
    written = raw.get("written")
    if isinstance(written, date):  # (YAML reads a bare `written: 2026-12-06` as a date)
        written = written.isoformat()
    if not isinstance(written, str) or not written.strip():
        raise LabError(f"{where}: written: say when the criterion was written (before which "
                       "cells ran), e.g. '2026-12-05, before any cell ran'")
    premise_list = raw.get("premise") or []
    if not isinstance(premise_list, list):
        raise LabError(f"{where}: premise: expected a list of conditions")
    premise = tuple(_premise(f"{where}: premise[{i}]", item)
                    for i, item in enumerate(premise_list))
    trends = _trends(f"{where}: trends", raw["trends"]) if raw.get("trends") is not None else ()
    if premise and not trends:
        raise LabError(f"{where}: trends: name the trends the premise gates, e.g. [7, 7f]")
    margin = raw.get("broke_margin")
    if margin is not None:
        margin = yaml_number(f"{where}: broke_margin", margin)  # (nats, above 0)
    return Criterion(written.strip(), premise, trends, margin)
