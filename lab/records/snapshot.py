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

Unpacking refuses a store that already holds a database: it never merges, and nothing that
is recorded there is touched.
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


def pack(out: str | Path, plots: bool = False) -> Snapshot:
    """Write the local store (store_dir()) as a snapshot at `out`: a tar archive, xz-compressed
    (the database's metric rows compress to 3.1 MB with xz against 5.5 MB with gzip at 48
    `small` runs, and the snapshot is committed: docs/store/README.md)."""
    root, out = store_dir(), Path(out)
    database = root / DATABASE
    if not database.exists():
        raise LabError(f"store pack: no store at {root} (no {DATABASE}); run a grid or "
                       "`gatelab train` first, or set GATELAB_STORE")
    open_store(f"sqlite:///{database}")  # whole and at MLflow's schema before it is copied
    files = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / DATABASE
        copy_database(database, copy)
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
                if (root / ARTIFACTS).is_dir():
                    tar.add(root / ARTIFACTS, arcname=ARTIFACTS, filter=keep)
        except BaseException:
            partial.unlink(missing_ok=True)  # no half-written snapshot is left to unpack
            raise
        os.replace(partial, out)
        return Snapshot(out, _count_runs(copy), files, out.stat().st_size)


def unpack(snapshot: str | Path) -> Snapshot:
    """Unpack a snapshot into the local store (store_dir()), which must hold no database."""
    root, snapshot = store_dir(), Path(snapshot)
    if not snapshot.is_file():
        raise LabError(f"store unpack: {snapshot} is not a file")
    if (root / DATABASE).exists():
        raise LabError(f"store unpack: {root} already holds a store ({DATABASE}); unpack into "
                       "an empty one (GATELAB_STORE=<new folder>) or move that one away: "
                       "stores are not merged")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpacking-") as tmp:
        work = Path(tmp)
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
        files = 0
        if (work / ARTIFACTS).is_dir():
            files = sum(1 for f in (work / ARTIFACTS).rglob("*") if f.is_file())
            # (into what a killed earlier unpack of it may have placed: the same files)
            shutil.copytree(work / ARTIFACTS, root / ARTIFACTS, dirs_exist_ok=True)
        os.replace(work / DATABASE, root / DATABASE)  # last: the store appears whole
        return Snapshot(root / DATABASE, _count_runs(root / DATABASE), files,
                        snapshot.stat().st_size)
