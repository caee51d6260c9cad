"""Config overrides of a grid or a sweep: the `overrides:` section of their files and the
`--set KEY=VALUE` flags, read by one parser, and the one table of keys neither may override.
"""

from __future__ import annotations

from typing import Any

from lab.config import parse_overrides
from lab.errors import LabError

# The config keys a grid's or a sweep's own fields set, and the field of each kind of file
# that sets it: an override of one would silently give every cell or trial the same value.
AXIS_OVERRIDES = {"train.lr": {"grid": "lrs", "sweep": "lr"},
                  "train.seed": {"grid": "seeds", "sweep": "seeds"},
                  "train.tokens": {"grid": "tokens", "sweep": "tokens"}}


def read_overrides(where: str, value, kind: str) -> dict[str, Any]:
    """A file's `overrides:` (a mapping of dotted keys to single values, or a list of
    'key=value') or the `--set` pairs (a list of 'key=value') -> {dotted key: value}, every
    key checked against the config's sections and against AXIS_OVERRIDES for a `kind` file.

    Values from YAML keep their type: an int in a float field stays an int, as the resolved
    config and so its hash hold it (lab/config.py). Values written as text stay text, and
    lab.config.resolve reads them by the type of their field."""
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(pair, str) for pair in value):
        pairs = {f"{section}.{name}": item
                 for section, fields in parse_overrides(value).items()
                 for name, item in fields.items()}
    elif isinstance(value, dict):
        pairs = value
    else:
        raise LabError(f"{where}: expected a mapping of dotted keys, e.g. {{train.val_every: "
                       f"50}}, or a list of 'key=value', got {value!r}")
    for key, item in pairs.items():
        if not isinstance(key, str):
            raise LabError(f"{where}: keys are dotted field names, got {key!r}")
        if key in AXIS_OVERRIDES:
            raise LabError(f"{where}.{key}: set this with the {kind}'s "
                           f"`{AXIS_OVERRIDES[key][kind]}` field")
        if isinstance(item, (dict, list)):
            raise LabError(f"{where}.{key}: expected a single value, got {item!r}")
    parse_overrides(pairs)  # an unknown section or field, named, before any cell or trial
    return dict(pairs)


def override_pairs(overrides: dict[str, Any]) -> list[str]:
    """{dotted key: value} -> ['key=value', ...], the form of `--set` (what `gatelab check`
    takes, and how a sweep's parent run records its overrides)."""
    return [f"{key}={value}" for key, value in overrides.items()]
