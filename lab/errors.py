"""The one error type the CLI turns into a one-line message and exit code 2, and the checks
that raise it in one message style: `<field>: <what is allowed>, got <value>`."""

import functools
import math
import shutil
import tempfile
import types
import typing
from pathlib import Path


class LabError(Exception):
    """Bad input a user can fix: a config value, a file, a name.

    The CLI prints ``error: <message>`` and exits 2 with no traceback, so the
    message must name the field and, where there is a fixed set, the allowed values.
    """


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise LabError(f"{field}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _is_number(value) -> bool:
    """An int or a finite float; a bool is not a number here (YAML's `yes` is not 1)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_positive(field: str, value) -> None:
    if not _is_number(value) or not value > 0:
        raise LabError(f"{field}: must be a positive number, got {value!r}")


def check_nonnegative(field: str, value) -> None:
    if not _is_number(value) or value < 0:
        raise LabError(f"{field}: must be a non-negative number, got {value!r}")


def check_positive_int(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LabError(f"{field}: must be a positive integer, got {value!r}")


def check_nonnegative_int(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LabError(f"{field}: must be a non-negative integer, got {value!r}")


def check_int_range(field: str, value, low: int, high: int, why: str = "") -> None:
    """low <= value <= high, an integer; `why` says where the bounds come from."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        reason = f" ({why})" if why else ""
        raise LabError(f"{field}: must be an integer in [{low}, {high}]{reason}, got {value!r}")


def check_fraction(field: str, value, closed_high: bool = False) -> None:
    """A probability-like number in [0, 1), or [0, 1] with closed_high."""
    if not _is_number(value) or not (0 <= value <= 1 if closed_high else 0 <= value < 1):
        raise LabError(f"{field}: must lie in [0, 1{']' if closed_high else ')'}, got {value!r}")


@functools.cache
def _field_types(cls) -> dict[str, tuple]:
    """Each field's allowed types, from its annotation: `float | None` -> (float, None)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        out[name] = tuple(None if part is type(None) else part for part in parts)
    return out


def allows_none(cls, name: str) -> bool:
    """Whether field `name` of the config dataclass `cls` may hold None (its annotation)."""
    return None in _field_types(cls).get(name, ())


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def check_field_types(section: str, obj) -> None:
    """Every field of a config section holds its declared type, floats finite: a YAML file
    or a `--set` value can carry anything (`train.lr: inf`, `train.batch_size: 2.5`), and
    nothing downstream should meet it. A bool is not a number; an int is a float."""
    for name, allowed in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if value is None and None in allowed:
            continue
        kinds = [t for t in allowed if t is not None]
        ok = any(_has_type(value, t) for t in kinds)
        if not ok:
            words = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in kinds)
            words += " or none" if None in allowed else ""
            raise LabError(f"{section}.{name}: expected {words}, got {value!r}")


def _has_type(value, kind) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)



def writable_folder(field: str, path: str | Path) -> Path:
    """`path` is a folder this process can write in, or one it can create: its nearest
    existing ancestor is a folder, and a file can be made there (a probe, not os.access,
    which says yes to root on a read-only file system). Returns that ancestor."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LabError(f"{field}: {existing} is a file, not a folder"
                       + (f" (in the path {path})" if existing != Path(path).absolute() else ""))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise LabError(f"{field}: cannot write in {existing} ({err.strerror or err})") from None
    return existing


def check_free_space(field: str, path: str | Path, need_bytes: int, what: str) -> None:
    """At least `need_bytes` free where `path` is (or will be): a full disk found before a
    run exists, in one line, rather than in the middle of it."""
    free = shutil.disk_usage(writable_folder(field, path)).free
    if free < need_bytes:
        raise LabError(f"{field}: {free / 2 ** 20:,.0f} MiB free at {path}, but {what} takes "
                       f"about {need_bytes / 2 ** 20:,.0f} MiB; free space there, or point the "
                       "command elsewhere")
