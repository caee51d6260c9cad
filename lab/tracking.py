"""MLflow: the local SQLite store, experiments, runs, and the Lightning logger.

Always an explicit tracking URI: `--tracking-uri`, else MLFLOW_TRACKING_URI, else the
SQLite store `mlruns/mlflow.db` under the working directory, with artifacts in
`mlruns/artifacts/` beside it (never the deprecated file store).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

STORE_DIR = "mlruns"
# Why a run ended other than FINISHED (lab/training/run.py end_run; the grid's reconcile and workers).
FAILURE_KIND_TAG = "gatelab.failure_kind"   # oom, disk_full, config, error, worker_died
FAILURE_TAG = "gatelab.failure"             # the one-line message
KILLED_REASON_TAG = "gatelab.killed_reason"


def cell_name(variant: str, lr: float, seed: int) -> str:
    """A run's name in the store: a grid cell's, and the default for a single run."""
    return f"{variant}/lr={lr:g}/seed={seed}"



def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics MLflow can store: NaN, infinities and None left out."""
    import math

    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """The finite ones in one log_batch call (MLflow splits it into batches it accepts)."""
    import time

    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, stamp, step)
                                             for k, v in finite_metrics(metrics).items()])

def store_dir() -> Path:
    return Path(os.environ.get("GATELAB_STORE", STORE_DIR)).resolve()


def tracking_uri(explicit: str | None = None) -> str:
    """The URI every command records to, checked (check_uri) before any run is created."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_uri(uri, "--tracking-uri" if explicit else "MLFLOW_TRACKING_URI")
        return uri
    store = store_dir()
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    check_uri(uri, "store")
    return uri


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
    from lab.errors import LabError

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
    elif scheme != "databricks":
        raise LabError(f"{source}: {uri!r} has the unknown scheme {scheme!r}; use sqlite:///"
                       "<folder>/mlflow.db, http(s)://<host>:<port> of an MLflow server, or a "
                       "database URL (postgresql://, mysql://, mssql://)")


def _check_server(uri: str, source: str) -> None:
    """Something listens at the server's address: MLflow's client would retry a dead one
    for minutes before failing."""
    import socket
    from urllib.parse import urlsplit

    from lab.errors import LabError

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
    from lab.errors import LabError

    if path.is_dir():
        raise LabError(f"{source}: {path} is a folder, not an SQLite file; name a file in it, "
                       f"e.g. sqlite:///{path / 'mlflow.db'}")
    if not path.parent.is_dir():
        raise LabError(f"{source}: the folder {path.parent} of {path.name} does not exist; "
                       "create it or fix the path")
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise LabError(f"{source}: cannot create {path}: the folder is not writable")
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise LabError(f"{source}: {path} is not readable and writable by this user")
    store_revision(path)


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
    """The tables MLflow's models declare; importing its db utils registers all of them."""
    import mlflow.store.db.utils  # noqa: F401
    from mlflow.store.db.base_sql_model import Base

    return frozenset(Base.metadata.tables)


def store_revision(path: Path) -> str:
    """The alembic revision of a whole MLflow store file (nothing written); LabError for an empty
    or non-SQLite file, a store left half-made, or one made by a newer MLflow."""
    import sqlite3

    import mlflow
    from alembic.util import CommandError

    from lab.errors import LabError

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
    from filelock import FileLock, Timeout

    from lab.errors import LabError

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
    import sys

    import mlflow
    from mlflow.db import upgrade

    from lab.errors import LabError

    _remove_database(work)  # what a killed earlier attempt left; the lock makes it stale
    if revision is not None:
        _copy_database(path, work)
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
        _copy_database(path, backup)
    return backup


def _copy_database(path: Path, copy_path: Path) -> None:
    """A consistent copy of a database others may be writing (SQLite's online backup API)."""
    import sqlite3

    source, copy = sqlite3.connect(path, timeout=30), sqlite3.connect(copy_path)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


# MLflow's experiment kind, an experiment tag its UI reads (the key and values are the UI's
# own constants, mlflow/server/js: "genai_development", "custom_model_development"). Every
# experiment the lab creates is a model-training one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, created on first use (artifacts under mlruns/artifacts/<name>),
    marked as a model-training experiment and given the comparison view (below); an older
    experiment gets both the first time the lab opens it again."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        if EXPERIMENT_KIND_TAG not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG,
                                             MODEL_TRAINING_KIND)
        if VIEW_TAG_PREFIX + COMPARISON_VIEW not in found.tags:
            write_comparison_view(mlflow_client, found.experiment_id)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (store_dir() / "artifacts" / name.replace("/", "_")).as_uri()
    try:
        created = mlflow_client.create_experiment(name, artifact_location=location,
                                                  tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except MlflowException:  # another worker created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id
    write_comparison_view(mlflow_client, created)
    return created


# --- the MLflow UI ----------------------------------------------------------------------
#
# MLflow 3.17's UI shows an experiment in its GenAI layout or its model-training layout by a
# browser-wide switch (stored in the browser, default GenAI; the URL parameter
# `workflowType=machine_learning` selects model training for that page), not by the
# experiment's kind tag. A runs page opens on a saved view when its URL carries
# `viewStateShareKey=<key>`: the view is the experiment tag `mlflow.sharedViewState.<key>`,
# JSON {name, createdAt, updatedAt, state}, `state` being "deflate;" + base64 of the
# zlib-compressed JSON of the page's search and table settings, the form the UI's own
# "Views > Save as new view" writes (tests/test_ui.py opens it in Chromium).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARISON_VIEW = "gatelab-runs"
COMPARISON_COLUMNS = ("val/ppl", "test/ppl", "spikes/count", "gate/mean")
# The view's first chart section (MLflow adds its generated ones, one per metric prefix,
# after it), with cards in the fields of the UI's chart cards (RunsChartsCardConfig).
COMPARISON_SECTION = {"uuid": "gatelab-comparison", "name": "gatelab: loss and perplexity",
                      "display": True, "isReordered": False, "deleted": False,
                      "isGenerated": False}
COMPARISON_CHARTS = (("LINE", "train/loss"), ("LINE", "val/loss"), ("BAR", "val/ppl"),
                     ("BAR", "test/ppl"))
CHART_RUNS = 1000  # runs a chart draws (MLflow's default, 10, left a grid's 11th run out)


def _chart(kind: str, metric: str) -> dict:
    card = {"uuid": f"gatelab-{metric.replace('/', '-')}", "type": kind, "metricKey": metric,
            "displayName": metric, "runsCountToCompare": CHART_RUNS,
            "metricSectionId": COMPARISON_SECTION["uuid"], "deleted": False, "isGenerated": False}
    if kind == "LINE":
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear", range={},
                    xAxisKey="step", selectedXAxisMetricKey="", yAxisKey="metric",
                    yAxisExpressions=[], ignoreOutliers=False, useGlobalXaxisKey=True,
                    useGlobalLineSmoothing=True)
    return card


def comparison_view_state() -> dict:
    """A grid's runs page as a researcher compares it: the runs that carry a config_hash tag
    (the cells; their parent, which would fold them away, is left out) by name, the
    COMPARISON_COLUMNS metrics as columns, every run in the charts, and a first chart
    section with every run's training and validation loss and its PPLs."""
    metrics = [f"metrics.`{name}`" for name in COMPARISON_COLUMNS]
    return {"searchFilter": "tags.config_hash LIKE '%'", "orderByKey": "tags.`mlflow.runName`",
            "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active",
            "datasetsFilter": [], "modelVersionFilter": "All Runs", "selectedColumns": metrics,
            "columnOrder": metrics, "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
            "viewMaximized": False, "runListHidden": False,
            "isAccordionReordered": True,  # keeps the lab's section first
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
            "groupsExpanded": {}, "compareRunSections": [COMPARISON_SECTION],
            "compareRunCharts": [_chart(kind, metric) for kind, metric in COMPARISON_CHARTS],
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                      "selectedXAxisMetricKey": ""}}


def write_comparison_view(mlflow_client, experiment_id: str) -> None:
    """Save `comparison_view_state` as the experiment's view COMPARISON_VIEW (replaced)."""
    import base64
    import json
    import time
    import zlib

    state = json.dumps(comparison_view_state(), separators=(",", ":")).encode()
    now = int(time.time() * 1000)
    value = {"name": "gatelab: the runs side by side", "createdAt": now, "updatedAt": now,
             "state": "deflate;" + base64.b64encode(zlib.compress(state)).decode("ascii")}
    mlflow_client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + COMPARISON_VIEW,
                                     json.dumps(value, separators=(",", ":")))


def runs_page_url(base_url: str, experiment_id: str, view: str | None = COMPARISON_VIEW,
                  charts: bool = False) -> str:
    """The experiment's runs page in the model-training layout, on `view`, as the table or
    (`charts`) the chart view."""
    url = f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "") + (
        "&compareRunsMode=CHART" if charts else "")


def search_all(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """Every active run of the experiment matching the filter, over all result pages."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                                         max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_run(mlflow_client, experiment_id: str, match_tags: dict[str, str]) -> str | None:
    """The earliest active run carrying every tag of `match_tags`, or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in match_tags.items())
    runs = search_all(mlflow_client, experiment_id, query)
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))
    return runs[0].info.run_id if runs else None


def find_or_create_run(mlflow_client, experiment_id: str, match_tags: dict[str, str],
                       run_name: str, extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The earliest run carrying `match_tags` (a grid's or a study's parent), else a new one
    with them and `extra_tags`. Returns (run id, created by this call).

    On a SQLite store, processes look and create under a lock beside the file, so two
    started together find one run. Elsewhere (a tracking server, another database) two
    processes creating it at once both look again: the earliest run wins and the other
    deletes its own."""
    from contextlib import nullcontext

    from filelock import FileLock
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    uri = str(mlflow_client.tracking_uri)
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    with FileLock(f"{path}.parent.lock", timeout=LOCK_TIMEOUT_S) if path else nullcontext():
        found = find_run(mlflow_client, experiment_id, match_tags)
        if found:
            return found, False
        mine = mlflow_client.create_run(experiment_id,
                                        tags={MLFLOW_RUN_NAME: run_name, **match_tags,
                                              **(extra_tags or {})}).info.run_id
        winner = find_run(mlflow_client, experiment_id, match_tags)
    if winner != mine:
        mlflow_client.delete_run(mine)
    return winner, winner == mine


def git_commit() -> str:
    """The commit the running code came from: GATELAB_GIT_COMMIT when set, else git's HEAD.

    The override is for machines that get a copy of the working tree whose .git is missing or
    older than the tree (a lent GPU machine's copy read a stale HEAD: docs/results-2026-11.md);
    docs/reproduce_gpu.sh sets it from the clean checkout that was sent.
    """
    if os.environ.get("GATELAB_GIT_COMMIT"):
        return os.environ["GATELAB_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_check_table(mlflow_client, run_id: str, table: str) -> None:
    """Keep a `gatelab check` table on the parent run whose cells it vouched for, one file
    per start (`check-<UTC time>.txt`): a resumed grid on another machine adds its own."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    mlflow_client.log_text(run_id, table, f"check-{stamp}.txt")


def log_dict_artifact(mlflow_client, run_id: str, data, filename: str) -> None:
    """Write `data` as YAML or JSON (by extension) and attach it to the run."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        if filename.endswith((".yaml", ".yml")):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2, default=str))
        mlflow_client.log_artifact(run_id, str(path))


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def lightning_logger(uri: str, run_id: str):
    """Lightning's MLflow logger on an existing run; the run's status is ours to set."""
    from lightning.pytorch.loggers import MLFlowLogger

    class _RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            pass  # lab/training/run.py terminates the run once test metrics and artifacts are in

        def log_hyperparams(self, params) -> None:
            pass  # the resolved config is logged once, flattened, by lab/training/run.py

    return _RunLogger(tracking_uri=uri, run_id=run_id, synchronous=True)
