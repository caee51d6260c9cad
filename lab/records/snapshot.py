"""A snapshot of the local store that moves to another machine or checkout: `gatelab store
pack` and `gatelab store unpack`.

MLflow writes every artifact location into the database as an absolute URI
(file:///<checkout>/mlruns/artifacts/<experiment>/<run>/artifacts), so a store copied as it
is reads its artifacts from the machine it came from, or from nowhere. A snapshot holds a
consistent copy of mlflow.db (SQLite's online backup, so a store in use can be packed) with
those locations made relative to the store folder, and the artifact files (without
checkpoints, which stay where they were written; without the runs' PNG plots unless asked);
unpacking re-roots the locations at the store it lands in. MLflow has no export of its own
for a tracking store (the separate mlflow-export-import project works run by run through a
server), and the lab's grids resume from the store, so the whole file travels.

A snapshot holds the whole store or, with `grid`, one grid's experiment: the lab commits
one file per grid (docs/store/<grid>.tar.xz), so a session that runs one grid rewrites only
that grid's file. Unpacking takes several snapshots at once and merges their experiments
into one new store (each experiment a new id; the same experiment name or run id in two of
them is refused); it refuses a store that already holds a database: nothing recorded there
is touched.

Snapshots are xz-compressed tar files and named so (SUFFIX): `pack` refuses another name
(a .tgz name on xz data made `tar tzf` fail) and an existing file unless `force`.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError
from lab.records.store import copy_database, open_store, store_dir, store_revision

DATABASE = "mlflow.db"
ARTIFACTS = "artifacts"  # lab/records/lookup.py puts every experiment's artifacts here
# The location columns of MLflow's schema: an experiment's root, a run's folder, a logged
# model's folder (those of them the database has: _columns).
LOCATION_COLUMNS = {("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location")}
SUFFIX = ".tar.xz"
DEFAULT_EXPERIMENT = 0  # MLflow's "Default", in every store: not a grid's, never merged
# Tables a merge does not copy: the schema's revision, the one workspace every store has,
# and the experiments, which are copied first under new ids (_merge).
NOT_MERGED = {"alembic_version", "workspaces", "experiments", "sqlite_sequence"}


@dataclass
class Snapshot:
    path: Path
    runs: int
    files: int
    size: int

    def describe(self, verb: str) -> str:
        return (f"{verb} {self.path}: {self.runs} runs, {self.files} artifact files, "
                f"{self.size / 1e6:.1f} MB")


def _columns(db: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [(table, column) for table in tables
            for column in (r[1] for r in db.execute(f'PRAGMA table_info("{table}")'))
            if (table, column) in LOCATION_COLUMNS]


def _rewrite(database: Path, old: list[str] | None, new: str) -> None:
    """Replace the prefix `old[i]` of every location value by `new`, or with `old` None,
    prefix `new` to every relative one (no scheme, not a path from /)."""
    db = sqlite3.connect(database)
    try:
        with db:
            for table, column in _columns(db):
                if old is None:
                    db.execute(f'UPDATE "{table}" SET "{column}" = ? || "{column}" WHERE '
                               f'"{column}" NOT LIKE \'%://%\' AND "{column}" NOT LIKE \'/%\'',
                               (new,))
                for prefix in old or []:
                    db.execute(f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                               f'WHERE substr("{column}", 1, ?) = ?',
                               (new, len(prefix) + 1, len(prefix), prefix))
    finally:
        db.close()


def _count_runs(database: Path) -> int:
    db = sqlite3.connect(database)
    try:
        return db.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        db.close()


def _roots(root: Path, database: Path) -> list[str]:
    """The prefixes that locate an artifact under a store's folder: the forms of `root` (a
    file URI, as the lab's experiments have it, and a plain path, as MLflow's Default
    experiment has it), and the folder the database's own experiments name, which differs
    from `root` in a store copied from elsewhere (each lab experiment's location is
    <store>/artifacts/<name>: lab/records/lookup.py)."""
    prefixes = [root.as_uri() + "/", str(root) + "/"]
    db = sqlite3.connect(database)
    try:
        for (location,) in db.execute("SELECT artifact_location FROM experiments"):
            head, _, name = (location or "").rstrip("/").rpartition(f"/{ARTIFACTS}/")
            if head and name and "/" not in name:
                prefixes.append(head + "/")
                if head.startswith("file://"):
                    prefixes.append(head[len("file://"):] + "/")  # the Default experiment's form
    finally:
        db.close()
    return list(dict.fromkeys(prefixes))  # each once, in the order found


def _check_out(out: Path, force: bool) -> None:
    if not out.name.endswith(SUFFIX) or out.name == SUFFIX:
        stem = out.name
        for old in (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar", ".xz", ".gz"):
            stem = stem.removesuffix(old)
        raise LabError(f"store pack: {out}: a snapshot is xz-compressed tar data; name it "
                       f"*{SUFFIX} (e.g. {out.with_name((stem or 'store') + SUFFIX)})")
    if out.exists() and not force:
        raise LabError(f"store pack: {out} exists; pass --force to replace it, or pack to "
                       "another file")


def _keep_experiment(database: Path, name: str, root: Path) -> None:
    """Delete from `database` every experiment but `name` (and MLflow's Default), and every
    row that belonged to them, following the schema's foreign keys to a fixed point (runs,
    then their metrics, params, tags...), so that whatever MLflow version wrote the store,
    no row of another experiment stays behind."""
    db = sqlite3.connect(database)
    try:
        with db:
            found = db.execute("SELECT experiment_id FROM experiments WHERE name = ?",
                               (name,)).fetchone()
            if found is None:
                names = [r[0] for r in db.execute(
                    "SELECT name FROM experiments WHERE experiment_id != ? ORDER BY name",
                    (DEFAULT_EXPERIMENT,))]
                raise LabError(f"store pack: --grid {name}: no such experiment in {root}; "
                               f"there: {', '.join(names) or 'none'}")
            db.execute("DELETE FROM experiments WHERE experiment_id NOT IN (?, ?)",
                       (DEFAULT_EXPERIMENT, found[0]))
            while _drop_orphans(db):
                pass
    finally:
        db.close()


def _drop_orphans(db: sqlite3.Connection) -> int:
    """One pass: delete the rows whose foreign key names a row that is gone; the rows that
    name an experiment without a declared key (MLflow's rollup tables); and dataset inputs,
    whose source and destination are typed ids, not keys. How many rows went."""
    deleted = 0
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        keys: dict[int, list[tuple[str, str, str]]] = {}
        for key in db.execute(f'PRAGMA foreign_key_list("{table}")'):
            keys.setdefault(key[0], []).append((key[2], key[3], key[4]))  # parent, from, to
        for pairs in keys.values():
            parent = pairs[0][0]
            match = " AND ".join(f'p."{to}" = t."{col}"' for _, col, to in pairs)
            present = " AND ".join(f't."{col}" IS NOT NULL' for _, col, _ in pairs)
            deleted += db.execute(
                f'DELETE FROM "{table}" WHERE rowid IN (SELECT t.rowid FROM "{table}" t WHERE '
                f'{present} AND NOT EXISTS (SELECT 1 FROM "{parent}" p WHERE {match}))'
            ).rowcount
        columns = {r[1] for r in db.execute(f'PRAGMA table_info("{table}")')}
        if not keys and "experiment_id" in columns and table != "experiments":
            deleted += db.execute(f'DELETE FROM "{table}" WHERE experiment_id NOT IN '
                                  "(SELECT experiment_id FROM experiments)").rowcount
    if "inputs" in tables:
        deleted += db.execute(
            "DELETE FROM inputs WHERE (destination_type = 'RUN' AND destination_id NOT IN "
            "(SELECT run_uuid FROM runs)) OR (source_type = 'DATASET' AND source_id NOT IN "
            "(SELECT dataset_uuid FROM datasets))").rowcount
    if "input_tags" in tables:
        deleted += db.execute("DELETE FROM input_tags WHERE input_uuid NOT IN "
                              "(SELECT input_uuid FROM inputs)").rowcount
    return deleted


def _location(database: Path, name: str) -> str:
    """The experiment's artifact folder, relative to the store (as _rewrite left it)."""
    db = sqlite3.connect(database)
    try:
        (location,) = db.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                 (name,)).fetchone()
    finally:
        db.close()
    return location.rstrip("/")


def pack(out: str | Path, plots: bool = False, grid: str | None = None,
         force: bool = False) -> Snapshot:
    """Write the local store (store_dir()), or only the experiment of `grid`, as a snapshot
    at `out`: a tar archive, xz-compressed (the database's metric rows compress to 3.1 MB
    with xz against 5.5 MB with gzip at 48 `small` runs, and the snapshots are committed:
    docs/store/README.md). An existing `out` is replaced only with `force`."""
    root, out = store_dir(), Path(out)
    _check_out(out, force)
    database = root / DATABASE
    if not database.exists():
        raise LabError(f"store pack: no store at {root} (no {DATABASE}); run a grid or "
                       "`gatelab train` first, or set GATELAB_STORE")
    open_store(f"sqlite:///{database}")  # whole and at MLflow's schema before it is copied
    files = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / DATABASE
        copy_database(database, copy)
        if grid is not None:
            _keep_experiment(copy, grid, root)
        _rewrite(copy, _roots(root, copy), "")
        db = sqlite3.connect(copy)
        db.execute("VACUUM")  # the old locations leave no trace in freed pages either
        db.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            nonlocal files
            if info.isfile():
                if not plots and info.name.endswith(".png"):
                    return None
                files += 1
            return info

        try:
            with tarfile.open(partial, "w:xz", preset=9) as tar:
                tar.add(copy, arcname=DATABASE)
                # (a lab experiment's artifacts are under its location, artifacts/<its name>
                # made relative above: lab/records/lookup.py experiment_id)
                artifacts = ARTIFACTS if grid is None else _location(copy, grid)
                if (root / artifacts).is_dir():
                    tar.add(root / artifacts, arcname=artifacts, filter=keep)
        except BaseException:
            partial.unlink(missing_ok=True)  # no half-written snapshot is left to unpack
            raise
        os.replace(partial, out)
        return Snapshot(out, _count_runs(copy), files, out.stat().st_size)


def _extract(snapshot: Path, work: Path, root: Path) -> None:
    """One snapshot into `work`: checked to hold a store and nothing else, its locations
    rooted at `root`, its database at this MLflow's schema."""
    try:
        # (any compression tarfile knows: the gzip snapshots packed before xz unpack too)
        with tarfile.open(snapshot, "r:*") as tar:
            names = tar.getnames()
            stray = [n for n in names if n != DATABASE and n != ARTIFACTS
                     and not n.startswith(ARTIFACTS + "/")]
            if DATABASE not in names or stray:
                raise LabError(f"store unpack: {snapshot} is not a store snapshot (it "
                               f"holds {', '.join((stray or names)[:3]) or 'nothing'})")
            tar.extractall(work, filter="data")  # no absolute paths, links out or devices
    except (tarfile.TarError, EOFError, OSError) as err:
        raise LabError(f"store unpack: {snapshot}: {err}") from None
    store_revision(work / DATABASE)  # a whole MLflow store, of this or an older schema
    _rewrite(work / DATABASE, None, root.as_uri() + "/")  # every relative location
    open_store(f"sqlite:///{work / DATABASE}")  # an older MLflow's snapshot is upgraded


def _merge(database: Path, other: Path, snapshot: Path) -> None:
    """Copy every row of the store `other` into the store `database` (both at one schema):
    its experiments under new ids after the highest there, every row that names one of
    them renamed alike, MLflow's Default experiment left as it is. An experiment name or a
    row key (a run id) in both is refused, and nothing of `other` is written."""
    db = sqlite3.connect(database)
    try:
        db.execute("ATTACH DATABASE ? AS other", (str(other),))
        clash = [r[0] for r in db.execute(
            "SELECT name FROM other.experiments WHERE experiment_id != ? AND name IN "
            "(SELECT name FROM main.experiments) ORDER BY name", (DEFAULT_EXPERIMENT,))]
        if clash:
            raise LabError(f"store unpack: {snapshot} holds experiment(s) {', '.join(clash)} "
                           "that another snapshot given holds too; unpack one of them")
        with db:
            db.execute("CREATE TEMP TABLE ids (old INTEGER PRIMARY KEY, new INTEGER)")
            db.execute("INSERT INTO ids SELECT experiment_id, (SELECT max(experiment_id) FROM "
                       "main.experiments) + row_number() OVER (ORDER BY experiment_id) FROM "
                       "other.experiments WHERE experiment_id != ?", (DEFAULT_EXPERIMENT,))
            db.execute("INSERT INTO ids VALUES (?, ?)", (DEFAULT_EXPERIMENT, DEFAULT_EXPERIMENT))
            tables = [r[0] for r in db.execute(
                "SELECT name FROM other.sqlite_master WHERE type = 'table'")]
            for table in ["experiments"] + [t for t in tables if t not in NOT_MERGED]:
                columns = [r[1] for r in db.execute(f'PRAGMA main.table_info("{table}")')]
                values = ", ".join("(SELECT new FROM ids WHERE old = o.experiment_id)"
                                   if c == "experiment_id" else f'o."{c}"' for c in columns)
                names = ", ".join(f'"{c}"' for c in columns)
                where = (f" WHERE o.experiment_id != {DEFAULT_EXPERIMENT}"
                         if table == "experiments" else "")
                try:
                    db.execute(f'INSERT INTO main."{table}" ({names}) SELECT {values} '
                               f'FROM other."{table}" o{where}')
                except sqlite3.IntegrityError as err:
                    raise LabError(f"store unpack: {snapshot}: its {table} clash with another "
                                   f"snapshot's ({err}); the same runs are in both") from None
    finally:
        db.close()


def unpack(snapshots: str | Path | list[str | Path]) -> Snapshot:
    """Unpack one snapshot, or several merged (_merge), into the local store (store_dir()),
    which must hold no database. All are checked before the store is written."""
    root = store_dir()
    paths = [Path(s) for s in (snapshots if isinstance(snapshots, list) else [snapshots])]
    for path in paths:
        if not path.is_file():
            raise LabError(f"store unpack: {path} is not a file")
    if (root / DATABASE).exists():
        raise LabError(f"store unpack: {root} already holds a store ({DATABASE}); unpack into "
                       "an empty one (GATELAB_STORE=<new folder>) or move that one away: "
                       "stores are not merged")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpacking-") as tmp:
        works = [Path(tmp) / str(i) for i in range(len(paths))]
        for path, work in zip(paths, works):
            _extract(path, work, root)
        for path, work in zip(paths[1:], works[1:]):
            _merge(works[0] / DATABASE, work / DATABASE, path)
        files = 0
        for work in works:
            if (work / ARTIFACTS).is_dir():
                files += sum(1 for f in (work / ARTIFACTS).rglob("*") if f.is_file())
                # (into what a killed earlier unpack of it may have placed: the same files)
                shutil.copytree(work / ARTIFACTS, root / ARTIFACTS, dirs_exist_ok=True)
        os.replace(works[0] / DATABASE, root / DATABASE)  # last: the store appears whole
        return Snapshot(root / DATABASE, _count_runs(root / DATABASE), files,
                        sum(path.stat().st_size for path in paths))
