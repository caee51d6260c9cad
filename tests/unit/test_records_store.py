"""lab/records/store.py: the MLflow store is refused, created or upgraded whole (issue 25),
and a bad tracking URI is one line before anything is recorded."""

from __future__ import annotations

import os
import random
import shutil
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from gridkit import (TINY_OVERRIDES, TINY_TOKENS, cli_process, create_store_process,
                     grid_processes, nothing)
from lab.errors import LabError
from lab.records import store as mlflow_store
from storekit import Store, template_db

KILL_TRIALS = int(os.environ.get("GATELAB_STORE_KILL_TRIALS", "20"))
TRAIN = ["train", "--preset", "tiny", "--data", "synthetic", "--tokens", str(TINY_TOKENS),
         "--quiet"] + [arg for key, value in TINY_OVERRIDES.items()
                       for arg in ("--set", f"{key}={value}")]


def _head() -> str:
    return mlflow_store._migrations()[1]


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _copy_template(path: Path) -> Path:
    shutil.copy(template_db(), path)
    return path


# --- bad URIs and bad store files: one line, exit 2, nothing recorded or changed ----------

def _write(content: bytes):
    return lambda path: path.write_bytes(content)


@pytest.mark.parametrize("make, expected", [
    (_write(b""), "an empty file, not a store"),
    (_write(b"not a database at all\n" * 50), "not an SQLite database"),
    (_write(b"SQLite format 3\x00" + bytes(range(256)) * 8), "an unreadable SQLite database"),
    (lambda path: _sql(path, "CREATE TABLE notes (text)"), "no MLflow schema revision"),
    (lambda path: _sql(_copy_template(path), "CREATE TABLE _alembic_tmp_runs (x)"),
     "half-migrated (a migration stopped midway left _alembic_tmp_runs)"),
    (lambda path: _sql(_copy_template(path), "UPDATE alembic_version SET version_num = 'f00dfeed'"),
     "schema revision f00dfeed is unknown to the installed MLflow"),
    (lambda path: _sql(_copy_template(path), "DROP TABLE webhooks"),
     "at the current schema but without the tables webhooks"),
])
def test_a_store_file_that_is_not_a_whole_store_is_refused_and_left_as_it_is(
        tmp_path, monkeypatch, capsys, make, expected):
    from lab.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mlflow.db"
    make(path)
    before = path.read_bytes()
    assert main(TRAIN + ["--tracking-uri", f"sqlite:///{path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow store {path}: ") and err.count("\n") == 1, err
    assert expected in err and f"mv {path} {path}.broken" in err, err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no run, no lock


def test_an_empty_default_store_is_refused_by_a_grid_not_taken_as_a_new_one(store, tmp_path,
                                                                           capsys):
    """Issue 26: a 0-byte mlruns/mlflow.db (a full disk, a bad copy) held a store's runs;
    taken as a new store, the grid would silently train every cell again."""
    import yaml

    from gridkit import tiny_grid
    from lab.cli import main

    db = tmp_path / "mlruns" / "mlflow.db"
    db.write_bytes(b"")  # the fixture's store, its database emptied
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(tiny_grid("empty-store", ["baseline"])))
    assert main(["grid", "g.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: MLflow store {db}: an empty file, not a store; the lab does not open "
                   f"or migrate it: move it aside (mv {db} {db}.broken) to start a new, empty "
                   "store\n")
    assert db.read_bytes() == b"" and sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]


@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:{port}", "no MLflow server at 127.0.0.1:{port}"),
    ("sqlite:///{tmp}/missing/x.db", "the folder {tmp}/missing of x.db does not exist"),
    ("sqlite:///{tmp}", "{tmp} is a folder, not an SQLite file"),
    ("foo://bar", "'foo://bar' has the unknown scheme 'foo'"),
    ("{tmp}/runs", "is a path, for MLflow's file store"),
    ("file://{tmp}/runs", "is a path, for MLflow's file store"),
    ("http://127.0.0.1:99999", "Port out of range"),
])
def test_a_bad_tracking_uri_is_one_line_exit_2_before_anything_is_recorded(
        tmp_path, monkeypatch, capsys, uri, expected):
    from lab.cli import main

    monkeypatch.chdir(tmp_path)
    port = _free_port()
    uri, expected = (text.format(port=port, tmp=tmp_path) for text in (uri, expected))
    started = time.perf_counter()
    assert main(TRAIN + ["--tracking-uri", uri]) == 2
    assert time.perf_counter() - started < 2 * mlflow_store.SERVER_TIMEOUT_S
    err = capsys.readouterr().err
    assert err.startswith("error: --tracking-uri: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_environment_variable_is_named_when_it_holds_the_bad_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    with pytest.raises(LabError, match="^MLFLOW_TRACKING_URI: 'foo://bar' has the unknown"):
        mlflow_store.tracking_uri()


# --- creation: atomic under SIGKILL, serialised between processes --------------------------

@pytest.mark.slow
def test_sigkill_while_a_store_is_created_leaves_no_store_or_a_whole_one(tmp_path):
    """KILL_TRIALS creations of a fresh store, each SIGKILLed at a random moment of an
    uncut creation's time: each path afterwards has no store or one that opens with its
    experiments, and a rerun on a path a kill cut short builds the store whole."""
    from mlflow.tracking import MlflowClient

    context = grid_processes()
    warm_up = context.Process(target=nothing)  # starts the fork server outside any timing
    warm_up.start()
    warm_up.join()

    def create(path: Path):
        process = context.Process(target=create_store_process, args=(f"sqlite:///{path}",))
        process.start()
        return process

    started = time.perf_counter()
    uncut = create(tmp_path / "uncut.db")
    uncut.join()
    full = time.perf_counter() - started
    assert uncut.exitcode == 0

    rng = random.Random(int(os.environ.get("GATELAB_CRASH_SEED", "25")))
    outcomes = {"absent": 0, "whole": 0}
    cut_short = None
    for trial in range(KILL_TRIALS):
        path = tmp_path / f"trial{trial}" / "mlflow.db"
        path.parent.mkdir()
        process = create(path)
        process.join(timeout=rng.uniform(0.0, full))
        process.kill()
        process.join()
        if not path.exists():
            outcomes["absent"] += 1
            cut_short = cut_short or (path if path.with_name("mlflow.db.creating").exists()
                                      else None)
            continue
        assert mlflow_store.store_revision(path) == _head()
        names = {e.name for e in MlflowClient(f"sqlite:///{path}").search_experiments()}
        assert names in ({"Default"}, {"Default", "kept"}), names
        outcomes["whole"] += 1
    assert outcomes["absent"] >= KILL_TRIALS // 4, outcomes  # the kills did land mid-creation
    assert cut_short is not None, outcomes
    rerun = create(cut_short)
    rerun.join()
    assert rerun.exitcode == 0 and mlflow_store.store_revision(cut_short) == _head()
    assert {e.name for e in MlflowClient(f"sqlite:///{cut_short}").search_experiments()} == \
        {"Default", "kept"}
    assert not cut_short.with_name("mlflow.db.creating").exists()


@pytest.mark.slow
def test_six_runs_started_together_on_a_fresh_store_all_finish(tmp_path, monkeypatch):
    """Issue 20: six `gatelab train` processes on a store none has created yet; MLflow
    alone breaks the schema (alembic migrations racing) and all six die."""
    context = grid_processes()
    root = tmp_path / "mlruns"
    env = Store(root).env  # nothing there yet: the six runs create the store
    monkeypatch.setenv("GATELAB_CACHE", env["GATELAB_CACHE"])
    from lab.data.store import prepare_synthetic

    prepare_synthetic(512)  # the shared corpus exists first: this test is about the store
    processes = [context.Process(target=cli_process, args=(TRAIN + ["--seed", str(seed)], env))
                 for seed in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert [p.exitcode for p in processes] == [0] * 6
    db = sqlite3.connect(root / "mlflow.db")
    try:
        rows = db.execute("SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = "
                          "r.run_uuid AND t.key = 'seed'").fetchall()
    finally:
        db.close()
    assert sorted(rows) == [("FINISHED", str(seed)) for seed in range(6)]


# --- upgrade: a copy is migrated, the old file kept as the backup --------------------------

RUNS = {"run-a": {"loss": 2.5, "ppl": 12.2}, "run-b": {"loss": 3.25, "ppl": 25.8}}


@pytest.fixture(scope="module")
def old_store(tmp_path_factory) -> tuple[Path, str]:
    """A store built by MLflow's own migrations stopped a few revisions before the head
    (alembic's command.upgrade to that revision), holding an experiment with two runs."""
    import mlflow.store
    import sqlalchemy
    from alembic import command
    from alembic.config import Config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    scripts, head = mlflow_store._migrations()
    old = [r.revision for r in scripts.walk_revisions()][4]
    path = tmp_path_factory.mktemp("old") / "mlflow.db"
    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    InitialBase.metadata.create_all(engine)  # what MLflow creates before its first migration
    engine.dispose()
    migrations = Path(mlflow.store.__file__).parent / "db_migrations"
    config = Config(str(migrations / "alembic.ini"))
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, old)
    statements = ["INSERT INTO experiments (experiment_id, name, artifact_location, "
                  "lifecycle_stage, creation_time, last_update_time) VALUES "
                  "(1, 'old-grid', 'file:///a', 'active', 1, 1)"]
    for name, metrics in RUNS.items():
        statements += [f"INSERT INTO runs (run_uuid, name, status, start_time, end_time, "
                       f"lifecycle_stage, artifact_uri, experiment_id, source_type, user_id) "
                       f"VALUES ('{name}', '{name}', 'FINISHED', 1, 2, 'active', 'file:///a', 1, "
                       f"'LOCAL', 'lab')",
                       f"INSERT INTO params (key, value, run_uuid) VALUES ('lr', '0.003', "
                       f"'{name}')",
                       f"INSERT INTO tags (key, value, run_uuid) VALUES ('variant', 'baseline', "
                       f"'{name}')"]
        for key, value in metrics.items():
            for table in ("metrics", "latest_metrics"):
                statements.append(f"INSERT INTO {table} (key, value, timestamp, step, is_nan, "
                                  f"run_uuid) VALUES ('{key}', {value}, 1, 7, 0, '{name}')")
    _sql(path, *statements)
    assert mlflow_store.store_revision(path) == old != head
    return path, old


def _runs_of(path: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path}")
    experiment = client.get_experiment_by_name("old-grid")
    return {run.info.run_name: (run.info.status, run.data.metrics, run.data.params,
                                run.data.tags["variant"])
            for run in client.search_runs([experiment.experiment_id])}


def test_an_older_store_is_upgraded_in_a_copy_keeping_every_run_and_the_backup(
        old_store, tmp_path, capsys):
    source, old = old_store
    path = tmp_path / "mlflow.db"
    shutil.copy(source, path)
    mlflow_store.open_store(f"sqlite:///{path}")
    err = capsys.readouterr().err
    backup = tmp_path / f"mlflow.db.bak-{old}"
    assert err == (f"MLflow store {path}: upgraded from schema {old} to {_head()} for MLflow "
                   f"{__import__('mlflow').__version__}; the old file is kept as {backup}\n")
    assert mlflow_store.store_revision(path) == _head()
    assert backup.read_bytes() == source.read_bytes()
    assert _runs_of(path) == {name: ("FINISHED", metrics, {"lr": "0.003"}, "baseline")
                              for name, metrics in RUNS.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mlflow.db", "mlflow.db.lock", backup.name])
    mlflow_store.open_store(f"sqlite:///{path}")  # whole now: nothing more to do or say
    assert capsys.readouterr().err == ""


def test_a_store_stamped_behind_its_tables_is_refused_unchanged_naming_the_backup(
        old_store, tmp_path):
    """Half-migrated past its recorded revision (a migration ran, its stamp did not): the
    copy's upgrade fails, the store file is untouched and the message names the backup."""
    source, old = old_store
    scripts, _ = mlflow_store._migrations()
    path = tmp_path / "mlflow.db"
    shutil.copy(source, path)
    behind = scripts.get_revision(old).down_revision
    _sql(path, f"UPDATE alembic_version SET version_num = '{behind}'")
    backup = tmp_path / f"mlflow.db.bak-{behind}"
    shutil.copy(path, backup)  # as an earlier upgrade would have left it
    before = path.read_bytes()
    with pytest.raises(LabError) as refused:
        mlflow_store.open_store(f"sqlite:///{path}")
    message = str(refused.value)
    assert message.startswith(f"MLflow store {path}: upgrading it from revision {behind} failed")
    assert f"cp {backup} {path}" in message and "the store file was not changed" in message
    assert "\n" not in message
    assert path.read_bytes() == before
    assert not (tmp_path / "mlflow.db.upgrading").exists()
