"""The MLflow store every command records to: the tracking URI, checked before any run is
created, and the SQLite store file, refused, created or upgraded whole.

Always an explicit tracking URI: `--tracking-uri`, else MLFLOW_TRACKING_URI, else the
SQLite store `mlruns/mlflow.db` under the working directory, with artifacts in
`mlruns/artifacts/` beside it (never the deprecated file store).
"""

from __future__ import annotations

import functools
import os
import socket
import sqlite3
import sys
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from lab.errors import LabError, check_free_space, writable_folder

# MLflow, alembic and SQLAlchemy are imported in the functions that use them: the store's
# folder and a check of a store file that does not exist yet need none of them, and MLflow
# alone takes 1.4 s to import (benchmarks/README.md, start-up).

STORE_DIR = "mlruns"


def store_dir() -> Path:
    return Path(os.environ.get("GATELAB_STORE", STORE_DIR)).resolve()


def tracking_uri(explicit: str | None = None) -> str:
    """The URI every command records to, checked (check_uri) before any run is created."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_uri(uri, "--tracking-uri" if explicit else "MLFLOW_TRACKING_URI")
        return uri
    store = store_dir()
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only, a file in the way, a full disk
        raise LabError(f"store: cannot create {store} ({err.strerror or err}); set "
                       "GATELAB_STORE to a writable folder") from None
    uri = default_uri()
    check_uri(uri, "store")
    return uri


# A run's checkpoint, as AtomicCheckpoint writes it: fp32 weights and Adam's two moments
# (3 x 4 bytes a parameter), twice while last.tmp replaces last.ckpt, plus the metrics and
# artifacts around it.
CHECKPOINT_BYTES_PER_PARAM = 2 * 3 * 4
RECORD_SLACK_BYTES = 16 * 2 ** 20


def check_writable(uri: str, params: int) -> None:
    """Before a run is made: the store folder (checkpoints, and artifacts and the database
    of a SQLite store) can be written, and holds room for a checkpoint of a model of
    `params` parameters; else one LabError line (a read-only folder, a full disk)."""
    folder = store_dir()
    need = params * CHECKPOINT_BYTES_PER_PARAM + RECORD_SLACK_BYTES
    check_free_space("store", folder, need, f"a checkpoint of {params:,} parameters (the "
                     "weights and Adam's moments, twice while one replaces the other)")
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if path is not None and path.parent != folder:
        writable_folder("store", path.parent)  # SQLite writes its journal beside the file


def default_uri() -> str:
    """The local store's URI, unchecked: the SQLite file in store_dir()."""
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def client(uri: str):
    """An MlflowClient on `uri`, its SQLite store first made whole (open_store), so that
    MLflow never creates or migrates a store file in place."""
    from mlflow.tracking import MlflowClient

    open_store(uri)
    return MlflowClient(tracking_uri=uri)


# --- the store: refused, created or upgraded whole -------------------------------------
# MLflow builds and upgrades a SQLite store with dozens of alembic migrations that are not
# one transaction (mlflow/store/db/utils.py `_upgrade_db` says so), so a kill midway leaves
# a file every later open fails on; and two processes migrating one file at once break it.
# The lab therefore builds or migrates a copy under a lock beside the file and renames the
# finished copy into place (os.replace is atomic on one filesystem). docs/reliability.md.

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQL dialects
SERVER_TIMEOUT_S = 5.0
LOCK_TIMEOUT_S = 600.0  # a creation takes seconds; a migration of a large store longer
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def check_uri(uri: str, source: str) -> None:
    """A tracking URI MLflow can use, or one LabError line naming `source` and the fix: a
    known scheme, a SQLite file that is absent (created on first use) or a complete MLflow
    store, or an MLflow server that accepts a connection within SERVER_TIMEOUT_S."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else None
    if scheme in (None, "file"):
        raise LabError(f"{source}: {uri!r} is a path, for MLflow's file store, which the lab does "
                       "not use; give sqlite:///<path>/mlflow.db, or http://<host>:<port> of "
                       "an MLflow server")
    if scheme in ("http", "https"):
        _check_server(uri, source)
    elif scheme in DATABASE_SCHEMES:
        from sqlalchemy.exc import ArgumentError

        try:
            path = sqlite_path(uri) if scheme == "sqlite" else None
        except ArgumentError as err:
            raise LabError(f"{source}: {uri!r} is not a database URL ({err})") from None
        if path is not None:
            check_store_file(path, source)
        elif scheme == "sqlite":
            raise LabError(f"{source}: {uri!r} is an in-memory SQLite database: MLflow opens "
                           "a new, empty one for each connection and nothing outlives the "
                           "command; give sqlite:///<folder>/mlflow.db")
    elif scheme != "databricks":
        raise LabError(f"{source}: {uri!r} has the unknown scheme {scheme!r}; use sqlite:///"
                       "<folder>/mlflow.db, http(s)://<host>:<port> of an MLflow server, or a "
                       "database URL (postgresql://, mysql://, mssql://)")


def _check_server(uri: str, source: str) -> None:
    """Something listens at the server's address: MLflow's client would retry a dead one
    for minutes before failing."""
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise LabError(f"{source}: {uri!r}: {err}") from None
    if not parts.hostname:
        raise LabError(f"{source}: {uri!r} names no host")
    try:
        socket.create_connection((parts.hostname, port), timeout=SERVER_TIMEOUT_S).close()
    except OSError as err:
        raise LabError(f"{source}: no MLflow server at {parts.hostname}:{port} ({err}); start "
                       "one (`mlflow server`, docs/reliability.md) or fix the URI") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite: URI; None for an in-memory database (or another
    database's URL)."""
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    database = url.database if url.get_backend_name() == "sqlite" else None
    return None if database in (None, "", ":memory:") else Path(database).absolute()


def check_store_file(path: Path, source: str) -> None:
    """A store file that can be created, or one that is a whole MLflow store (of this or an
    older schema); else one LabError line."""
    if path.is_dir():
        raise LabError(f"{source}: {path} is a folder, not an SQLite file; name a file in it, "
                       f"e.g. sqlite:///{path / 'mlflow.db'}")
    if not path.parent.is_dir():
        raise LabError(f"{source}: the folder {path.parent} of {path.name} does not exist; "
                       "create it or fix the path")
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise LabError(f"{source}: cannot create {path}: the folder is not writable"
                           f"{_read_only(path.parent)}")
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise LabError(f"{source}: {path} is not readable and writable by this user"
                       f"{_read_only(path.parent)}")
    store_revision(path)


def _read_only(folder: Path) -> str:
    """Why os.access said no, where the file system is mounted read-only (root included)."""
    return " (a read-only file system)" if os.statvfs(folder).f_flag & os.ST_RDONLY else ""


def _recovery(path: Path) -> str:
    """What to do with a store the lab refuses: the backups beside it, or a new store."""
    backups = sorted(path.parent.glob(f"{path.name}.bak-*"), key=lambda b: b.stat().st_mtime)
    restore = (f"restore a backup (the newest: cp {backups[-1]} {path}; all: "
               f"{', '.join(b.name for b in backups)}) or " if backups else "")
    return f"{restore}move it aside (mv {path} {path}.broken) to start a new, empty store"


@functools.cache
def _migrations():
    """MLflow's alembic script directory (the package's db_migrations) and its head."""
    import mlflow.store
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.store.__file__).parent / "db_migrations"))
    return scripts, scripts.get_current_head()


@functools.cache
def _mlflow_tables() -> frozenset[str]:
    """The tables MLflow's models declare (importing mlflow.store.db.utils registers all
    of them)."""
    import mlflow.store.db.utils  # noqa: F401
    from mlflow.store.db.base_sql_model import Base

    return frozenset(Base.metadata.tables)


def store_revision(path: Path) -> str:
    """The alembic revision of a whole MLflow store file (nothing written); LabError for an empty
    or non-SQLite file, a store left half-made, or one made by a newer MLflow."""
    def refuse(what: str) -> LabError:
        return LabError(f"MLflow store {path}: {what}; the lab does not open or migrate it: "
                        f"{_recovery(path)}")

    with path.open("rb") as file:
        header = file.read(len(SQLITE_HEADER))
    if not header:
        raise refuse("an empty file, not a store")
    if header != SQLITE_HEADER:
        raise refuse("not an SQLite database")
    try:
        # Read-write, as any open: a journal left by a killed writer is rolled back here.
        db = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=30)
        try:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = db.execute("SELECT version_num FROM alembic_version").fetchall() \
                if "alembic_version" in tables else []
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise refuse(f"an unreadable SQLite database ({err})") from None
    # alembic's batch migrations on SQLite copy a table to _alembic_tmp_<name> and rename
    # it back; one left over means a migration stopped midway.
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        raise refuse(f"half-migrated (a migration stopped midway left {', '.join(leftovers)})")
    if len(versions) != 1:
        raise refuse("no MLflow schema revision (alembic_version): another program's database, "
                     "or a store whose creation stopped midway")
    revision = versions[0][0]
    import mlflow
    from alembic.util import CommandError

    scripts, head = _migrations()
    try:
        known = scripts.get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise refuse(f"schema revision {revision} is unknown to the installed MLflow "
                     f"{mlflow.__version__} (made by a newer MLflow? install that version)")
    missing = sorted(_mlflow_tables() - tables)
    if revision == head and missing:
        raise refuse(f"at the current schema but without the tables {', '.join(missing[:3])}"
                     + (" ..." if len(missing) > 3 else ""))
    return revision


def open_store(uri: str) -> None:
    """Make the SQLite store of `uri` whole before MLflow touches it: build a missing one in
    a copy, upgrade an older one in a copy (keeping the old file as a backup), and rename
    the finished copy into place, all under a lock beside the file that serialises every
    lab process opening it first (another one waits, then finds the store complete)."""
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None  # checked by check_uri
    if path is None:
        return
    _, head = _migrations()
    if path.exists() and store_revision(path) == head:
        return  # the common case: no lock, nothing written
    try:
        with FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
            if not path.exists():
                _build(path, path.with_name(f"{path.name}.creating"), None)
                return
            revision = store_revision(path)
            if revision != head:
                _build(path, path.with_name(f"{path.name}.upgrading"), revision)
    except Timeout:
        raise LabError(f"MLflow store {path}: another process has held {path}.lock for "
                       f"{LOCK_TIMEOUT_S:.0f} s while creating or upgrading it; wait for it "
                       "or end it") from None


def _remove_database(path: Path) -> None:
    """A database file and the journals SQLite keeps beside it: a stale journal left beside
    a new file of the same name would be rolled back into it."""
    for name in (path.name, f"{path.name}-journal", f"{path.name}-wal", f"{path.name}-shm"):
        path.with_name(name).unlink(missing_ok=True)


def _build(path: Path, work: Path, revision: str | None) -> None:
    """Under the store's lock: migrate `work` (a new file, or a copy of the store at
    `revision`) to MLflow's head with `mlflow db upgrade`, then rename it over `path`; an
    upgrade first keeps the old file as <store>.bak-<revision> and says so in one line."""
    import mlflow
    from mlflow.db import upgrade

    _remove_database(work)  # what a killed earlier attempt left; the lock makes it stale
    if revision is not None:
        copy_database(path, work)
    try:
        upgrade.callback(f"sqlite:///{work}")  # MLflow's `mlflow db upgrade <url>`
        if store_revision(work) != _migrations()[1]:
            raise RuntimeError(f"the copy is not at MLflow's head revision {_migrations()[1]}")
    except Exception as err:
        _remove_database(work)
        doing = "creating it" if revision is None else f"upgrading it from revision {revision}"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = _recovery(path) if revision is not None else "fix that and rerun"
        raise LabError(f"MLflow store {path}: {doing} failed ({detail}); {hint} "
                       "(the store file was not changed)") from None
    if revision is not None:
        backup = _keep_backup(path, revision)
    os.replace(work, path)
    if revision is not None:
        print(f"MLflow store {path}: upgraded from schema {revision} to {_migrations()[1]} for "
              f"MLflow {mlflow.__version__}; the old file is kept as {backup}", file=sys.stderr)


def _keep_backup(path: Path, revision: str) -> Path:
    """<store>.bak-<revision> as a second name of the store's file (a hard link, so writes
    that still reach the old file land in the backup), or a copy where links fail."""
    backup, n = path.with_name(f"{path.name}.bak-{revision}"), 1
    while backup.exists() and not os.path.samefile(backup, path):
        n += 1
        backup = path.with_name(f"{path.name}.bak-{revision}-{n}")
    if backup.exists():
        return backup  # linked by an attempt killed before its rename
    try:
        os.link(path, backup)
    except OSError:
        copy_database(path, backup)
    return backup


def copy_database(path: Path, copy_path: Path) -> None:
    """A consistent copy of a database others may be writing (SQLite's online backup API)."""
    source, copy = sqlite3.connect(path, timeout=30), sqlite3.connect(copy_path)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
