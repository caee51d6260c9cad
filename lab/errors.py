"""The one error type the CLI turns into a one-line message and exit code 2."""


class LabError(Exception):
    """Bad input a user can fix: a config value, a file, a name.

    The CLI prints ``error: <message>`` and exits 2 with no traceback, so the
    message must name the field and, where there is a fixed set, the allowed values.
    """


def check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise LabError(f"{field}: {value!r} is not one of {', '.join(map(str, allowed))}")


def check_positive(field: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise LabError(f"{field}: must be a positive number, got {value!r}")


def check_nonnegative_int(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LabError(f"{field}: must be a non-negative integer, got {value!r}")
