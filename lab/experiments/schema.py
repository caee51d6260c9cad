"""The one schema of grid and sweep files: the fields both hold, how each key of the YAML is
read, and the flags that replace a file's values (`--preset`, `--data`, `--tokens`, `--set`).

A file kind is a frozen dataclass that extends `ExperimentSpec` with its own fields and keys
(`GridSpec` below, lab/experiments/sweep/spec.py `Sweep`). Reading one refuses,
with one LabError that names the key and the file (the CLI's one `error:` line, exit code 2),
anything but a mapping, a key the kind does not have, a missing required key and a value
its key's reader rejects, before anything is written anywhere. A key set to null is absent.

`extends: OTHER.yaml` (a path relative to the file) reads OTHER first: the file's own keys
replace OTHER's, except `overrides`, which adds to (or replaces keys of) OTHER's, and a key
set to null drops OTHER's value. A file that extends another names its own experiment
(`name` is required in it): a control grid then shares every setting of the grid it
controls, and a change to that grid's budget or corpus reaches the control too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from lab.errors import LabError
from lab.experiments.criterion import Criterion, read_criterion
from lab.experiments.files import (check_name, parse_lrs, parse_seeds, parse_variants, read_yaml,
                                   yaml_number)
from lab.experiments.overrides import read_overrides

KeyReader = Callable[[Any], dict]  # a key's YAML value -> the dataclass fields it sets
PRESET, DATA = "a preset name", "synthetic, a corpus directory or text files"
MAX_EXTENDS = 64  # files an `extends` chain may hold (the repo's longest holds 3)


def nonempty_string(where: str, value, expected: str) -> str:
    if not isinstance(value, str) or not value:
        raise LabError(f"{where}: expected {expected}, got {value!r}")
    return value


def check_finite_numbers(where: str, value, path: str = "") -> None:
    """No NaN or infinity anywhere in a file's values (YAML writes them .nan and .inf): a
    field's own reader may pass numbers on unread (a pruner's options go to Optuna as they
    are, and Optuna ran a trial with n_warmup_steps NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LabError(f"{where}: {path or 'value'}: expected a finite number, got {value!r}")
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        check_finite_numbers(where, item, f"{path}.{key}" if path else str(key))


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    """What a grid file and a sweep file both say."""

    name: str
    variants: tuple[str, ...] | str          # slugs, or "all" (grids only)
    preset: str = "tiny"
    data: str = "synthetic"
    tokens: float | None = None              # None: the preset's budget
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = field(default_factory=dict)   # dotted key -> value

    kind: ClassVar[str] = "experiment"       # how errors and the override table name the file
    required: ClassVar[tuple[str, ...]] = ("name", "variants")

    @classmethod
    def keys(cls) -> dict[str, KeyReader]:
        """The keys a file may hold, in the order an error lists them, and their readers."""
        return {
            "name": lambda value: {"name": check_name(value)},
            "preset": lambda value: {"preset": nonempty_string("preset", value, PRESET)},
            "data": lambda value: {"data": nonempty_string("data", value, DATA)},
            "tokens": lambda value: {"tokens": yaml_number("tokens", value)},
            "variants": lambda value: {"variants": parse_variants(value)},
            "seeds": lambda value: {"seeds": parse_seeds(value)},
            "overrides": lambda value: {"overrides": read_overrides("overrides", value,
                                                                    cls.kind)},
        }

    @classmethod
    def complete(cls, fields: dict) -> dict:
        """Fields whose default or validity depends on other keys (none in common)."""
        return fields

    @classmethod
    def from_dict(cls, raw, source: str, file_keys: tuple[str, ...] = ()):
        """`file_keys`: the keys a file may hold beyond the fields (`extends`, which load
        has merged away), for the error that lists what is allowed."""
        keys = cls.keys()
        allowed = ", ".join((*keys, *file_keys))
        if not isinstance(raw, dict):
            raise LabError(f"{source}: expected a mapping with fields {allowed}")
        unknown = [key for key in raw if key not in keys]
        if unknown:
            raise LabError(f"{source}: unknown field {unknown[0]!r}; allowed: {allowed}")
        missing = [key for key in cls.required if raw.get(key) in (None, "", [])]
        if missing:
            raise LabError(f"{source}: missing field {missing[0]!r}")
        fields: dict = {}
        for key, read in keys.items():
            if raw.get(key) is not None:
                fields.update(read(raw[key]))
        check_finite_numbers(source, raw)  # what the readers let through (their words first)
        return cls(**cls.complete(fields))

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        return cls.from_dict(cls.read_extended(path), f"{cls.kind} file {path}",
                             file_keys=("extends",))

    @classmethod
    def read_extended(cls, path: Path, chain: tuple[Path, ...] = ()) -> Any:
        """The file's YAML with what it extends merged in (the module's docstring says how;
        a null the file sets stays in, and from_dict reads it as absent). Anything that is
        not a mapping is returned as read, for from_dict to refuse. `chain`: the files that
        extend this one, resolved, to tell a cycle."""
        raw = read_yaml(path, cls.kind)
        if not isinstance(raw, dict) or "extends" not in raw:
            return raw
        source = f"{cls.kind} file {path}"
        if len(chain) >= MAX_EXTENDS:  # (each level is a Python frame: no RecursionError)
            raise LabError(f"{source}: extends: a chain of more than {MAX_EXTENDS} files "
                           f"(from {chain[0]}); a {cls.kind} file extends a few others at most")
        base_name = raw["extends"]
        if not isinstance(base_name, str) or not base_name:
            raise LabError(f"{source}: extends: expected the path of another {cls.kind} file "
                           f"(relative to this one), got {base_name!r}")
        if raw.get("name") in (None, ""):
            raise LabError(f"{source}: missing field 'name' (a file that extends another "
                           "names its own experiment)")
        base_path = path.parent / base_name
        here = path.resolve()
        if base_path.resolve() in (*chain, here):
            cycle = " -> ".join(str(p) for p in (*chain, here, base_path.resolve()))
            raise LabError(f"{source}: extends: a cycle ({cycle})")
        if not base_path.is_file():
            raise LabError(f"{source}: extends: {base_path} not found")
        base = cls.read_extended(base_path, (*chain, here))
        if not isinstance(base, dict):
            raise LabError(f"{cls.kind} file {base_path}: expected a mapping (extended by "
                           f"{path})")
        merged = {**base, **{k: v for k, v in raw.items() if k != "extends"}}
        if base.get("overrides") is not None and raw.get("overrides") is not None:
            merged["overrides"] = {  # either file may write them as a list of 'key=value'
                **read_overrides(f"{cls.kind} file {base_path}: overrides", base["overrides"],
                                 cls.kind),
                **read_overrides(f"{source}: overrides", raw["overrides"], cls.kind)}
        return merged

    def with_flags(self, preset: str | None = None, data: str | None = None, tokens=None,
                   overrides: list[str] | None = None):
        """The command line's `--preset`, `--data` and `--tokens` replace the file's values;
        `--set KEY=VALUE` adds to (or replaces one of) its overrides."""
        changes: dict = {}
        if preset is not None:
            changes["preset"] = nonempty_string("--preset", preset, PRESET)
        if data is not None:
            changes["data"] = nonempty_string("--data", data, DATA)
        if tokens is not None:
            changes["tokens"] = yaml_number("--tokens", tokens)
        if overrides:
            changes["overrides"] = {**self.overrides,
                                    **read_overrides("--set", list(overrides), self.kind)}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The spec as the YAML artifact on its parent run records it."""
        out = dataclasses.asdict(self)
        out["variants"] = list(self.variants) if self.variants != "all" else "all"
        return out


# --- the grid file (here, not in lab/experiments/grid/, so that `gatelab grid` reads and
# checks it before importing torch's training stack, MLflow and Lightning: a bad file's
# error line need not wait for them; benchmarks/README.md, start-up) ---------------------

def _learning_rates_key(value) -> dict:
    """`lrs`: a list of learning rates, or {from_sweep: <sweep name>}."""
    if isinstance(value, dict):
        if set(value) != {"from_sweep"} or not isinstance(value["from_sweep"], str):
            raise LabError("lrs: expected a list of learning rates or {from_sweep: <sweep name>}")
        return {"lrs": None, "lr_sweep": value["from_sweep"]}
    return {"lrs": parse_lrs(value)}


@dataclass(frozen=True, kw_only=True)
class GridSpec(ExperimentSpec):
    """A validated grid file (ablations/*.yaml): the schema's fields and the learning rates."""

    lrs: tuple[float, ...] | None = None     # None: the preset's LR
    lr_sweep: str | None = None              # lrs: {from_sweep: <name>}
    criterion: Criterion | None = None       # the success criterion (lab/experiments/criterion.py)

    kind: ClassVar[str] = "grid"

    @classmethod
    def keys(cls) -> dict[str, KeyReader]:
        return {**super().keys(), "lrs": _learning_rates_key,
                "criterion": lambda value: {"criterion": read_criterion(value)}}

    @classmethod
    def complete(cls, fields: dict) -> dict:
        """A premise is about one of the grid's variants: one the grid does not run could
        never be checked, and would make its trends "not testable here" for good (a grid
        that extends another and runs other variants sets its own criterion, or null)."""
        criterion, variants = fields.get("criterion"), fields.get("variants")
        if criterion is not None and variants not in (None, "all"):
            for i, premise in enumerate(criterion.premise):
                if premise.variant not in variants:
                    raise LabError(f"criterion: premise[{i}]: variant: {premise.variant!r} is "
                                   f"not one of the grid's variants ({', '.join(variants)})")
        return fields

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.criterion is None:
            del out["criterion"]  # (a grid without one records the grid.yaml it always did)
        else:
            out["criterion"] = self.criterion.to_dict()
        return out


def grid_from_dict(raw, source: str = "grid file") -> GridSpec:
    return GridSpec.from_dict(raw, source)


def load_grid(path: str | Path) -> GridSpec:
    return GridSpec.load(path)


def with_cli(spec: GridSpec, preset=None, data=None, tokens=None, seeds=None, lrs=None,
             variants=None, overrides=None) -> GridSpec:
    """Command-line flags replace the file's fields (`--set` adds overrides)."""
    spec = spec.with_flags(preset=preset, data=data, tokens=tokens, overrides=overrides)
    changes: dict = {}
    if seeds is not None:
        changes["seeds"] = parse_seeds(seeds, "--seeds")
    if lrs is not None:
        changes["lrs"], changes["lr_sweep"] = parse_lrs(lrs, "--lrs"), None
    if variants is not None:
        changes["variants"] = parse_variants(variants, "--variants")
    return dataclasses.replace(spec, **changes)
