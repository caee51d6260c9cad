"""What a grid or sweep file's values are read with (lab/experiments/schema.py and the sweep's
own keys): the file's YAML, numbers, names, and lists of seeds, learning rates or variants.
Each refuses a bad value with one LabError naming where it came from (the key or the flag).
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path

import yaml

from lab.errors import LabError


def read_yaml(path, kind: str):
    """A grid or sweep file -> its parsed YAML; a missing file or bad YAML is a LabError that
    names the file and, for bad YAML, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"{kind} file: {path} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:  # a binary file, or text in another encoding
        raise LabError(f"{kind} file {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                       f"at offset {err.start}); a {kind} file is YAML") from None
    except OSError as err:
        raise LabError(f"{kind} file {path}: cannot read it: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LabError(f"{kind} file {path}: malformed YAML{where}: {problem}") from None


def yaml_number(where: str, value, positive: bool = True) -> float:
    """A number from a grid or sweep file: YAML 1.1 reads `2e5` as a string, so both come."""
    if isinstance(value, bool):
        raise LabError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or positive and not number > 0:
        raise LabError(f"{where}: must be a positive number, got {value!r}")
    return number


# Where a name ends up: an MLflow experiment (at most 500 characters, MLflow's
# MAX_EXPERIMENT_NAME_LENGTH in mlflow/utils/validation.py) and its artifact folder
# mlruns/artifacts/<name> (one file name: at most 255 bytes on Linux file systems, NAME_MAX);
# a grid's or sweep's name also names a run (at most 250 characters, the `name` column of
# MLflow's runs table; a sweep's parent run is <name>/<variant>, variants up to 40), the
# report folder, and sweeps/<name>.journal with Optuna's lock files beside it
# (<journal>.lock<uuid4>.renamed: 57 more characters). Past these the name failed only
# once a run existed (issue 40).
MAX_NAME_CHARS = 128      # a grid's or sweep's name: every use above fits with room
MAX_EXPERIMENT_BYTES = 255


def check_name(name) -> str:
    """A grid's or sweep's name: it names the MLflow experiment and the report folder."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise LabError(f"name: {name!r} must be letters, digits, '_', '.' or '-' "
                       "(it names the MLflow experiment and the report folder)")
    if len(name) > MAX_NAME_CHARS:
        raise LabError(f"name: at most {MAX_NAME_CHARS} characters (it names the MLflow "
                       f"experiment, runs, files and folders), got {len(name)}: {name[:40]}...")
    return name


def check_experiment_name(field_name: str, name: str) -> str:
    """`gatelab train --experiment`: any text MLflow and the file system take (see above):
    not blank, no control characters (a newline would split every line that names it), and
    at most MAX_EXPERIMENT_BYTES in UTF-8 as its artifact folder's name."""
    if not name.strip():
        raise LabError(f"{field_name}: expected an MLflow experiment name, got {name!r}")
    control = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
    if control is not None:
        raise LabError(f"{field_name}: {name!r} holds the control character {control!r}; "
                       "an experiment name is one line of printable text")
    size = len(name.replace("/", "_").encode("utf-8", "surrogatepass"))
    if size > MAX_EXPERIMENT_BYTES:
        raise LabError(f"{field_name}: at most {MAX_EXPERIMENT_BYTES} bytes (it names the "
                       f"experiment's artifact folder), got {size}: {name[:40]!r}...")
    return name


# Lists of a grid or sweep file (or a command-line flag): a YAML list, one value, or "a,b".
def _seed(where: str, value) -> int:
    number = yaml_number(where, value, positive=False)
    if number != int(number) or number < 0:
        raise LabError(f"{where}: seeds are non-negative integers, got {value!r}")
    return int(number)


def _unique(where: str, values: list) -> tuple:
    if not values:
        raise LabError(f"{where}: must list at least one value")
    if len(set(values)) != len(values):
        raise LabError(f"{where}: lists a value twice: {values}")
    return tuple(values)


def _list(where: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def parse_seeds(value, where: str = "seeds") -> tuple[int, ...]:
    return _unique(where, [_seed(where, v) for v in _list(where, value)])


def parse_lrs(value, where: str = "lrs") -> tuple[float, ...]:
    return _unique(where, [yaml_number(where, v) for v in _list(where, value)])


def parse_variants(value, where: str = "variants") -> tuple[str, ...] | str:
    if value == "all" or value == ["all"]:
        return "all"
    names = _list(where, value)
    for name in names:
        if not isinstance(name, str):
            raise LabError(f"{where}: variant names are strings, got {name!r}")
    return _unique(where, names)
