"""Where a sweep's studies live: an Optuna journal file (`sweeps/<name>.journal`, by default)
or an RDB URL, opened with a one-line error where it cannot be; the trials' artifact folder
beside it; and a storage URL as it may be printed (its password hidden).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from lab.errors import LabError
from lab.experiments.sweep.spec import Sweep

SWEEP_DIR = "sweeps"


def default_storage(name: str) -> str:
    return str(Path(SWEEP_DIR) / f"{name}.journal")


def storage_url(sweep_name: str, explicit: str | None = None) -> str:
    """--storage, else the sweep file's `storage`, else `sweeps/<name>.journal`.

    Looks for `sweeps/<name>.yaml` under the working directory when only a name is given
    (sweep-report, best_lrs), so a sweep that names its own storage is found again."""
    if explicit:
        return explicit
    path = Path(SWEEP_DIR) / f"{sweep_name}.yaml"
    if path.is_file():
        try:
            raw = Sweep.read_extended(path)  # a `storage` it extends counts too
        except LabError:
            raw = None
        if isinstance(raw, dict) and raw.get("name") == sweep_name and raw.get("storage"):
            return raw["storage"]
    return default_storage(sweep_name)


def open_storage(url: str, create: bool = True):
    """A URL with a scheme (postgresql://, mysql://, sqlite:///) is an RDB storage; anything
    else is a path to an Optuna journal file (the form optuna-dashboard also accepts)."""
    if "://" in url:
        if url.startswith(("postgresql://", "postgres://")):
            # SQLAlchemy 2.1 maps a plain postgresql:// URL to the psycopg (3) driver.
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise LabError("--storage: a postgresql:// storage needs the psycopg driver: "
                               "pip install 'psycopg[binary]==3.3.9' (the postgres extra)") from None
        try:
            return optuna.storages.RDBStorage(url, skip_table_creation=not create,
                                              engine_kwargs={"pool_pre_ping": True})
        except Exception as err:  # sqlalchemy's errors are many; the user needs one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LabError(f"--storage: cannot open {redact(url)}: {first}") from None
    path = Path(url)
    if not create and not path.is_file():
        raise LabError(f"--storage: no sweep storage at {path} (run `gatelab sweep` first, or "
                       "pass --storage)")
    if path.is_dir():
        raise LabError(f"--storage: {path} is a directory; pass a journal file path in it, "
                       f"e.g. {path / 'sweep.journal'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every trial appends to the journal and takes a lock file beside it: both must be
        # writable now, not when the first trial has trained.
        for place in (path.parent, path) if path.exists() else (path.parent,):
            if not os.access(place, os.W_OK):
                raise PermissionError(errno.EACCES, f"{place} is not writable")
        # Default lock (a symlink lock file beside the journal): atomic on local and NFS file
        # systems, and the lock optuna-dashboard takes when it opens the same file. The path
        # made absolute: the lock is a symlink to the journal as named here, and a relative
        # name resolves from the lock's own folder, where it dangles; Optuna then never starts
        # the lock's grace period (its os.stat of the lock fails, and it retries at once), so
        # a lock left by a killed process was never broken and the next start spun forever.
        return JournalStorage(JournalFileBackend(str(path.resolve())))
    except OSError as err:  # read-only place, a parent that is a file, a full disk
        raise LabError(f"--storage: cannot write the journal file {path}: "
                       f"{err.strerror or err}; pass a writable path") from None


def artifact_dir(url: str, sweep_name: str) -> Path:
    """Where the sweep's Optuna artifacts go, created: beside a journal file, its name with
    `.artifacts` for `.journal` (`sweeps/lr.journal` -> `sweeps/lr.artifacts/`); for an RDB
    storage, `sweeps/<name>.artifacts/` under the working directory of each machine."""
    journal = Path(url) if "://" not in url else Path(SWEEP_DIR) / sweep_name
    folder = journal.with_suffix(".artifacts") if journal.suffix == ".journal" else \
        journal.with_name(journal.name + ".artifacts")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabError(f"--storage: cannot create the artifact folder {folder} beside it: "
                       f"{err.strerror or err}") from None
    return folder.resolve()


def redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (a journal file's
    path as it is)"""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}://{credentials}{at}{host}"
