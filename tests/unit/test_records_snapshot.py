"""lab/records/snapshot.py: `gatelab store pack` and `unpack` move a store to another folder
with its artifacts readable there, and refuse what would lose or mix records."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest

from lab import records
from lab.cli import EXAMPLES, main
from lab.errors import LabError
from lab.records import snapshot
from storekit import make_store


def _store(folder: Path, monkeypatch) -> tuple[str, str]:
    """A store at `folder` with one lab experiment and a run that has a JSON and a PNG
    artifact, as the lab lays them out; (its URI, the run's id)."""
    make_store(folder)
    monkeypatch.setenv("GATELAB_STORE", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = records.tracking_uri()
    client = records.client(uri)
    experiment = records.experiment_id(client, "reproduce", uri)
    run = client.create_run(experiment, run_name="baseline/seed=0")
    client.log_metric(run.info.run_id, "val/loss", 3.75, step=7)
    work = folder.parent / "files"
    work.mkdir()
    (work / "loss_history.json").write_text(json.dumps({"loss": [4.0, 3.9]}))
    (work / "attention_maps.png").write_bytes(b"\x89PNG not really")
    client.log_artifact(run.info.run_id, str(work / "loss_history.json"))
    client.log_artifact(run.info.run_id, str(work / "attention_maps.png"), "analysis")
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


@pytest.mark.slow
def test_a_store_moves_to_another_folder_with_its_artifacts(tmp_path, monkeypatch):
    _, run_id = _store(tmp_path / "here" / "mlruns", monkeypatch)
    packed = snapshot.pack(tmp_path / "store.tar.xz")
    assert (packed.runs, packed.files) == (1, 1)  # the PNG stays behind by default
    with tarfile.open(tmp_path / "store.tar.xz") as tar:
        assert not any(str(tmp_path) in m.name for m in tar.getmembers())
    shutil.rmtree(tmp_path / "here")  # the old folder is gone: nothing may read from it

    there = tmp_path / "there" / "mlruns"
    monkeypatch.setenv("GATELAB_STORE", str(there))
    assert snapshot.unpack(tmp_path / "store.tar.xz").runs == 1
    client = records.client(records.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.artifact_uri == (there / "artifacts" / "reproduce" / run_id
                                     / "artifacts").as_uri()
    assert run.data.metrics["val/loss"] == 3.75
    got = Path(client.download_artifacts(run_id, "loss_history.json", str(tmp_path)))
    assert json.loads(got.read_text()) == {"loss": [4.0, 3.9]}
    assert client.list_artifacts(run_id, "analysis") == []  # the plot did not travel
    # the grid finds its experiment again, and new runs land under the new folder
    new = client.create_run(records.experiment_id(client, "reproduce", records.tracking_uri()))
    assert new.info.artifact_uri.startswith((there / "artifacts").as_uri())


def test_plots_travel_when_asked(tmp_path, monkeypatch):
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    assert snapshot.pack(tmp_path / "store.tar.xz", plots=True).files == 2


def test_a_store_copied_by_hand_is_re_rooted_too(tmp_path, monkeypatch):
    """The database names the folder it was made in; packed from a copy elsewhere (a
    tarball brought back from another machine), its locations still become relative."""
    _, run_id = _store(tmp_path / "made" / "mlruns", monkeypatch)
    shutil.copytree(tmp_path / "made", tmp_path / "copy")
    shutil.rmtree(tmp_path / "made")
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "copy" / "mlruns"))
    snapshot.pack(tmp_path / "store.tar.xz")
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "third" / "mlruns"))
    snapshot.unpack(tmp_path / "store.tar.xz")
    db = sqlite3.connect(tmp_path / "third" / "mlruns" / "mlflow.db")
    locations = [r[0] for r in db.execute("SELECT artifact_uri FROM runs")] + \
        [r[0] for r in db.execute("SELECT artifact_location FROM experiments "
                                  "WHERE name != 'Default'")]  # MLflow's own: made elsewhere
    db.close()
    root = (tmp_path / "third" / "mlruns").as_uri()
    assert len(locations) == 2 and all(loc.startswith(root + "/") for loc in locations), locations


def test_unpack_never_merges_into_a_store_that_holds_runs(tmp_path, monkeypatch, capsys):
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    snapshot.pack(tmp_path / "store.tar.xz")
    before = (tmp_path / "here" / "mlruns" / "mlflow.db").read_bytes()
    assert main(["store", "unpack", str(tmp_path / "store.tar.xz")]) == 2
    assert "already holds a store" in capsys.readouterr().err
    assert (tmp_path / "here" / "mlruns" / "mlflow.db").read_bytes() == before


def test_snapshots_are_xz_and_gzip_ones_from_before_still_unpack(tmp_path, monkeypatch):
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    snapshot.pack(tmp_path / "store.tar.xz")
    with open(tmp_path / "store.tar.xz", "rb") as handle:
        assert handle.read(6) == b"\xfd7zXZ\x00"  # the xz magic
    with tarfile.open(tmp_path / "store.tar.xz", "r:xz") as old, \
            tarfile.open(tmp_path / "old.tgz", "w:gz") as tgz:  # as pack wrote them before
        for member in old.getmembers():
            tgz.addfile(member, old.extractfile(member) if member.isfile() else None)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "there" / "mlruns"))
    assert snapshot.unpack(tmp_path / "old.tgz").runs == 1


def test_bad_snapshots_are_one_line_and_leave_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "empty" / "mlruns"))
    not_a_store = tmp_path / "other.tgz"
    (tmp_path / "notes.txt").write_text("hello")
    with tarfile.open(not_a_store, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    (tmp_path / "garbage.tgz").write_bytes(b"not gzip")
    for bad, message in ((not_a_store, "not a store snapshot"),
                         (tmp_path / "garbage.tgz", "garbage.tgz"),
                         (tmp_path / "absent.tgz", "is not a file")):
        with pytest.raises(LabError, match=message):
            snapshot.unpack(bad)
    assert not (tmp_path / "empty" / "mlruns" / "mlflow.db").exists()
    with pytest.raises(LabError, match="no store"):
        snapshot.pack(tmp_path / "out.tar.xz")


def _add_grid(name: str, val_loss: float) -> str:
    """Another grid's experiment with one finished run in the store GATELAB_STORE names."""
    uri = records.tracking_uri()
    client = records.client(uri)
    run = client.create_run(records.experiment_id(client, name, uri), run_name="baseline/seed=0")
    client.log_metric(run.info.run_id, "val/loss", val_loss, step=3)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _runs_by_experiment(database: Path) -> dict[str, list[str]]:
    db = sqlite3.connect(database)
    try:
        found: dict[str, list[str]] = {}
        for name, run in db.execute("SELECT e.name, r.run_uuid FROM runs r JOIN experiments e "
                                    "ON e.experiment_id = r.experiment_id ORDER BY r.run_uuid"):
            found.setdefault(name, []).append(run)
        return found
    finally:
        db.close()


def test_pack_never_overwrites_a_file_without_force(tmp_path, monkeypatch, capsys):
    """The example in `gatelab store --help` once overwrote the committed 81-run snapshot
    with a 16-run one: an existing file is replaced only with --force."""
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    out = tmp_path / "kept.tar.xz"
    out.write_bytes(b"an earlier snapshot")
    assert main(["store", "pack", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: store pack: {out} exists; pass --force to replace it, or pack to " \
                  "another file\n"
    assert out.read_bytes() == b"an earlier snapshot"
    assert main(["store", "pack", str(out), "--force", "--quiet"]) == 0
    with tarfile.open(out) as tar:
        assert "mlflow.db" in tar.getnames()
    assert "docs/store" not in EXAMPLES["store"]  # the help's example writes elsewhere


@pytest.mark.parametrize("name", ["store.tgz", "store.tar.gz", "store.xz", "store"])
def test_pack_names_its_xz_data_honestly(name, tmp_path, monkeypatch, capsys):
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    assert main(["store", "pack", str(tmp_path / name)]) == 2
    assert f"name it *.tar.xz (e.g. {tmp_path / 'store.tar.xz'})" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_one_file_per_grid_and_several_unpack_into_one_store(tmp_path, monkeypatch):
    """`pack --grid` writes one grid's experiment (its runs, metrics and artifacts, no other
    grid's rows), and `unpack A B` merges the files into one store that equals the whole."""
    from mlflow.entities import Dataset, DatasetInput

    here = tmp_path / "here" / "mlruns"
    uri, run_id = _store(here, monkeypatch)
    other = _add_grid("reproduce-base", 2.5)
    # a run's corpus as an MLflow dataset input: a row in datasets, inputs and input_tags
    records.client(uri).log_inputs(run_id, [DatasetInput(Dataset(
        "gutenberg-en", "digest-1", "local", "cache/gutenberg-en"))])
    whole = _runs_by_experiment(here / "mlflow.db")
    assert snapshot.pack(tmp_path / "reproduce.tar.xz", grid="reproduce").runs == 1
    assert snapshot.pack(tmp_path / "reproduce-base.tar.xz", grid="reproduce-base").runs == 1
    with tarfile.open(tmp_path / "reproduce-base.tar.xz") as tar:
        assert not any(n.startswith("artifacts/reproduce/") for n in tar.getnames())
        tar.extract("mlflow.db", tmp_path / "base-only", filter="data")
    db = sqlite3.connect(tmp_path / "base-only" / "mlflow.db")
    assert [r[0] for r in db.execute("SELECT name FROM experiments ORDER BY name")] == \
        ["Default", "reproduce-base"]
    assert {r[0] for r in db.execute("SELECT DISTINCT run_uuid FROM metrics")} == {other}
    assert db.execute("SELECT count(*) FROM params WHERE run_uuid = ?", (run_id,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM inputs").fetchone() == (0,)  # the other grid's
    assert db.execute("SELECT count(*) FROM datasets").fetchone() == (0,)
    db.close()
    with pytest.raises(LabError, match="no such experiment in .*there: reproduce, reproduce-base"):
        snapshot.pack(tmp_path / "x.tar.xz", grid="nope")

    there = tmp_path / "there" / "mlruns"
    monkeypatch.setenv("GATELAB_STORE", str(there))
    assert main(["store", "unpack", str(tmp_path / "reproduce-base.tar.xz"),
                 str(tmp_path / "reproduce.tar.xz"), "--quiet"]) == 0
    assert _runs_by_experiment(there / "mlflow.db") == whole
    client = records.client(records.tracking_uri())
    assert client.get_run(other).data.metrics["val/loss"] == 2.5
    assert client.get_run(run_id).data.metrics["val/loss"] == 3.75
    dataset = client.get_run(run_id).inputs.dataset_inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("gutenberg-en", "digest-1")
    got = Path(client.download_artifacts(run_id, "loss_history.json", str(tmp_path)))
    assert json.loads(got.read_text()) == {"loss": [4.0, 3.9]}
    # each experiment a grid finds by name, new runs under the store's own folder
    new = client.create_run(records.experiment_id(client, "reproduce", records.tracking_uri()))
    assert new.info.artifact_uri.startswith((there / "artifacts" / "reproduce").as_uri())


def test_unpack_refuses_two_snapshots_of_one_grid_and_writes_nothing(tmp_path, monkeypatch):
    _store(tmp_path / "here" / "mlruns", monkeypatch)
    snapshot.pack(tmp_path / "a.tar.xz", grid="reproduce")
    snapshot.pack(tmp_path / "whole.tar.xz")
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "there" / "mlruns"))
    with pytest.raises(LabError, match="whole.tar.xz holds experiment.s. reproduce that another"):
        snapshot.unpack([tmp_path / "a.tar.xz", tmp_path / "whole.tar.xz"])
    assert not (tmp_path / "there" / "mlruns" / "mlflow.db").exists()
    with pytest.raises(LabError, match="absent.tar.xz is not a file"):
        snapshot.unpack([tmp_path / "a.tar.xz", tmp_path / "absent.tar.xz"])


@pytest.mark.slow
def test_the_committed_snapshots_resume_the_reproduction_grids(tmp_path, monkeypatch):
    """docs/store/<grid>.tar.xz, one file per grid, is where the reproduction goes on from:
    each holds that grid's experiment alone, and every run it holds as FINISHED is a cell
    of the grid's file (ablations/<grid>.yaml) as the code plans it now, so a change to what
    identifies a cell (lab/config.py, the hash) cannot make the next GPU session train
    those cells again unnoticed."""
    from types import SimpleNamespace

    from lab.experiments.grid import spec as grid
    from lab.experiments.schema import load_grid

    files = sorted((Path(__file__).resolve().parents[2] / "docs" / "store").glob("*.tar.xz"))
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    snapshot.unpack(files)
    db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    finished: dict[str, set[str]] = {}
    for experiment, config_hash in db.execute(
            "SELECT e.name, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE r.status = 'FINISHED' AND t.key = 'config_hash'"):
        finished.setdefault(experiment, set()).add(config_hash)
    db.close()
    # one file per grid, named after it, holding only it
    assert set(_runs_by_experiment(tmp_path / "mlruns" / "mlflow.db")) == \
        {f.name.removesuffix(".tar.xz") for f in files}
    # The cells as plan() resolves them, the corpus it opens for their vocabulary replaced by
    # the prepared one's size (16,384, the BPE `gatelab prepare` trains: docs/results.md),
    # which CI does not have.
    monkeypatch.setattr(grid, "open_data", lambda config: (SimpleNamespace(vocab_size=16384),))
    assert len(finished.get("reproduce", ())) >= 25 and "reproduce-base" in finished
    # (a grid's experiment is named by its file's `name`, which for every file under
    # ablations/ is the file's stem)
    for name, hashes in finished.items():
        planned = {cell.config.hash()
                   for cell in grid.plan(load_grid(f"ablations/{name}.yaml"))}
        assert hashes <= planned, (name, sorted(hashes - planned))
