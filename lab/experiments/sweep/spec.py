"""The sweep file (sweeps/*.yaml) read and validated: the schema's fields
(lab/experiments/schema.py) and the search (the LR range or ladder, trials, sampler, pruner,
storage), every variant resolved at both ends of the range before any trial or run.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import optuna

from lab.config import resolve
from lab.errors import LabError, check_choice, check_positive_int
from lab.experiments.files import parse_variants, yaml_number
from lab.experiments.overrides import override_pairs
from lab.experiments.schema import ExperimentSpec, KeyReader, nonempty_string
from lab.training.schedule import total_steps

SAMPLERS = ("tpe", "random", "gp", "grid")
PRUNERS = ("median", "successive_halving", "none")


def _lr_key(raw) -> dict:
    """`lr`: {low: <lr>, high: <lr>} (log-uniform) or {ladder: [<lr>, ...]}."""
    if not isinstance(raw, dict) or not (set(raw) <= {"low", "high", "ladder"}) or \
            ("ladder" in raw) == ("low" in raw or "high" in raw):
        raise LabError("lr: expected {low: <lr>, high: <lr>} (log-uniform) or "
                       f"{{ladder: [<lr>, ...]}}, got {raw!r}")
    if "ladder" in raw:
        ladder = raw["ladder"]
        if not isinstance(ladder, list) or not ladder:
            raise LabError(f"lr.ladder: expected a non-empty list of learning rates, got {ladder!r}")
        values = tuple(sorted({yaml_number("lr.ladder", v) for v in ladder}))
        return {"lr_ladder": values}
    if "low" not in raw or "high" not in raw:
        raise LabError("lr: a range needs both low and high")
    low, high = yaml_number("lr.low", raw["low"]), yaml_number("lr.high", raw["high"])
    if not low < high:
        raise LabError(f"lr: low ({low:g}) must be below high ({high:g})")
    return {"lr_low": low, "lr_high": high}


def _pruner_key(raw) -> dict:
    """`median`, or `{kind: median, n_startup_trials: 2, ...}` (options go to Optuna's pruner)."""
    if isinstance(raw, dict):
        options = dict(raw)
        kind = options.pop("kind", None)
    else:
        kind, options = raw, {}
    check_choice("pruner", kind, PRUNERS)
    if options:
        allowed = set(inspect.signature(pruner_class(kind)).parameters) if kind != "none" else set()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise LabError(f"pruner: unknown option(s) {', '.join(unknown)} for {kind}; allowed: "
                           f"{', '.join(sorted(allowed)) or '(none)'}")
        try:  # Optuna checks its options' values when the pruner is made: here, not mid-sweep
            pruner_class(kind)(**options)
        except (TypeError, ValueError) as err:
            raise LabError(f"pruner: options {options} refused by Optuna's {kind} pruner: "
                           f"{err}") from None
    return {"pruner": kind, "pruner_options": options}


def pruner_class(kind: str):
    return {"median": optuna.pruners.MedianPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner}[kind]


def _variants_key(raw) -> dict:
    variants = parse_variants(raw)
    if variants == "all":
        raise LabError("variants: a sweep lists its variants by name ('all' is for grids)")
    return {"variants": variants}


def _sampler_key(raw) -> dict:
    check_choice("sampler", raw, SAMPLERS)
    return {"sampler": raw}


@dataclass(frozen=True, kw_only=True)
class Sweep(ExperimentSpec):
    """A validated sweep file (sweeps/*.yaml): the schema's fields and the search. Every
    variant resolves at both ends of the LR range at every seed (checked on creation, so
    also after `with_flags`): unknown presets, variants, override keys and impossible shapes
    fail before any trial or run."""

    lr_low: float | None = None          # log-uniform range ...
    lr_high: float | None = None
    lr_ladder: tuple[float, ...] = ()    # ... or an explicit ladder (grid)
    trials: int = 8                      # per variant
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_options: dict = field(default_factory=dict)
    storage: str | None = None
    description: str = ""

    kind: ClassVar[str] = "sweep"
    required: ClassVar[tuple[str, ...]] = ("name", "preset", "variants", "lr")

    @classmethod
    def keys(cls) -> dict[str, KeyReader]:
        return {**super().keys(), "variants": _variants_key, "lr": _lr_key,
                "trials": lambda value: {"trials": positive_int("trials", value)},
                "sampler": _sampler_key, "pruner": _pruner_key,
                "storage": lambda value: {"storage": nonempty_string(
                    "storage", value, "a storage URL or journal file path")},
                "description": lambda value: {"description": str(value)}}

    @classmethod
    def complete(cls, fields: dict) -> dict:
        """A ladder's sampler is grid and its trials the whole grid; a range's, TPE and 8."""
        ladder = "lr_ladder" in fields
        sampler = fields.setdefault("sampler", "grid" if ladder else "tpe")
        if ladder != (sampler == "grid"):
            raise LabError(f"sampler: {sampler!r} does not fit the lr field: an lr.ladder needs "
                           "sampler grid, an lr range (low/high) needs tpe, random or gp")
        grid_size = len(fields.get("lr_ladder", ())) * len(fields.get("seeds", (0,)))
        fields.setdefault("trials", grid_size if ladder else 8)
        return fields

    def __post_init__(self):
        low, high = self.lr_bounds()
        for variant in self.variants:
            for seed in self.seeds:
                for value in (low, high):
                    self.config(variant, value, seed)

    def study_name(self, variant: str) -> str:
        return f"{self.name}/{variant}"

    def grid(self) -> dict[str, list]:
        return {"lr": list(self.lr_ladder), "seed": list(self.seeds)}

    def config(self, variant: str, lr: float, seed: int):
        return resolve(variant, self.preset, self.overrides, data=self.data,
                       tokens=self.tokens, seed=seed, lr=lr)

    def steps(self) -> int:
        """Optimizer steps of one trial (the pruners' unit)."""
        return total_steps(self.config(self.variants[0], self.lr_bounds()[0], self.seeds[0]))

    def lr_bounds(self) -> tuple[float, float]:
        if self.lr_ladder:
            return min(self.lr_ladder), max(self.lr_ladder)
        return self.lr_low, self.lr_high

    def with_variants(self, variants: list[str]) -> "Sweep":
        unknown = [v for v in variants if v not in self.variants]
        if unknown or not variants:
            raise LabError(f"--variants: {', '.join(unknown) or '(none)'} not in sweep "
                           f"{self.name!r}; allowed: {', '.join(self.variants)}")
        return dataclasses.replace(self, variants=tuple(variants))

    def to_dict(self) -> dict:
        # sweep.yaml on the parent runs has always held the overrides as 'key=value' lines.
        return {**super().to_dict(), "overrides": override_pairs(self.overrides)}


def positive_int(field_name: str, value) -> int:
    check_positive_int(field_name, value)
    return value


def parse_sweep(raw: Any, source: str = "sweep") -> Sweep:
    """A loaded YAML document -> a validated Sweep; every field checked before anything runs."""
    return Sweep.from_dict(raw, source)


def load_sweep(path: str | Path) -> Sweep:
    return Sweep.load(path)
