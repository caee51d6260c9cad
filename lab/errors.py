"""The one error type the CLI turns into a one-line message and exit code 2, and the checks
that raise it in one message style: `<field>: <what is allowed>, got <value>`."""

import math


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
