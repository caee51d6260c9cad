"""lab/records/cells.py: the run tags' names, the learning rate as text and back, and a run read
back as the cell it holds: on made-up runs, and on the committed snapshots (docs/store/*.tar.xz),
whose runs the grid wrote before the module existed and must read back unchanged."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab import records
from lab.config import resolve
from lab.errors import LabError
from lab.records import snapshot
from lab.records.cells import (CONFIG_HASH_TAG, DATA_TAG, DIVERGED_TAG, GIT_COMMIT_TAG, LR_TAG,
                               PRESET_TAG, SEED_TAG, VARIANT_TAG, CellRecord, cell_name,
                               format_lr, parse_lr)
from lab.reports.seeds import finished_records

STORE = Path(__file__).resolve().parents[2] / "docs" / "store"


@pytest.mark.parametrize("lr, text", [(3e-3, "0.003"), (2e-3, "0.002"), (1e-4, "0.0001"),
                                      (1e-5, "1e-05"), (8e-3, "0.008"), (1.0, "1"),
                                      (1e3, "1000"), (2.5e-4, "0.00025")])
def test_a_learning_rate_is_written_as_printf_g_and_read_back_to_the_same_number(lr, text):
    assert format_lr(lr) == text  # what every store already holds: f"{lr:g}"
    assert parse_lr(text) == lr


def test_a_missing_lr_reads_as_nan_and_a_garbled_one_is_a_lab_error():
    assert math.isnan(parse_lr(None))
    with pytest.raises(LabError, match="tag lr: 'fast' is not a learning rate"):
        parse_lr("fast")


def test_a_cells_run_name_spells_its_lr_as_its_tag_does():
    assert cell_name("baseline", 3e-3, 2) == "baseline/lr=0.003/seed=2"
    assert cell_name("baseline", 1e-5, 0) == f"baseline/lr={format_lr(1e-5)}/seed=0"


def test_run_tags_are_written_under_the_schemas_names():
    config = resolve("baseline", "tiny", seed=3, lr=2e-3)
    tags = records.run_tags(config)
    assert set(tags) == {VARIANT_TAG, SEED_TAG, PRESET_TAG, LR_TAG, CONFIG_HASH_TAG,
                         GIT_COMMIT_TAG, DATA_TAG}
    assert (tags[LR_TAG], tags[SEED_TAG], tags[CONFIG_HASH_TAG]) == ("0.002", "3", config.hash())
    assert parse_lr(tags[LR_TAG]) == config.train.lr


def _run(tags: dict, params: dict | None = None, status: str = "FINISHED", end: int = 2):
    info = SimpleNamespace(run_id=f"run-{len(tags)}-{end}", status=status, start_time=1,
                           end_time=end)
    return SimpleNamespace(info=info, data=SimpleNamespace(tags=tags, params=params or {}))


def test_a_run_becomes_its_cells_record():
    run = _run({VARIANT_TAG: "sdpa_elementwise_sigmoid_mul", LR_TAG: "0.003", SEED_TAG: "1",
                CONFIG_HASH_TAG: "abc", DIVERGED_TAG: "true", PRESET_TAG: "small",
                "gatelab.runs_per_gpu": "2"}, {"model.ffn": "moe"})
    record = CellRecord.from_run(run)
    assert (record.variant, record.lr, record.seed, record.config_hash, record.diverged,
            record.ffn, record.runs_per_gpu, record.finished) == \
        ("sdpa_elementwise_sigmoid_mul", 3e-3, 1, "abc", True, "moe", 2, True)
    assert record.name == "sdpa_elementwise_sigmoid_mul/lr=0.003/seed=1" and record.run is run
    bare = CellRecord.from_run(_run({}, status="RUNNING"))
    assert (bare.variant, bare.seed, bare.config_hash, bare.diverged, bare.ffn,
            bare.runs_per_gpu, bare.finished) == ("?", -1, None, False, "dense", 1, False)
    assert math.isnan(bare.lr)


def test_the_report_keeps_the_latest_finished_run_of_each_cell():
    tags = {VARIANT_TAG: "baseline", LR_TAG: "0.003", SEED_TAG: "0", CONFIG_HASH_TAG: "h"}
    runs = [_run(tags, end=5), _run(tags, end=9), _run(tags, status="KILLED", end=12),
            _run({**tags, CONFIG_HASH_TAG: "other", SEED_TAG: "1"}, end=3)]
    kept = finished_records(runs, lambda run: {"val/ppl": float(run.info.end_time)})
    assert [(r.run_id, r.seed, r.metrics["val/ppl"]) for r in kept] == \
        [(runs[1].info.run_id, 0, 9.0), (runs[3].info.run_id, 1, 3.0)]


@pytest.fixture(scope="module")
def committed_store(tmp_path_factory):
    """Every committed snapshot unpacked into one store (as `gatelab store unpack` does)."""
    folder = tmp_path_factory.mktemp("committed") / "mlruns"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATELAB_STORE", str(folder))
        # (an in-process MLflow run of an earlier test exports its store's URI here, which
        # would win over GATELAB_STORE)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        snapshot.unpack(sorted(STORE.glob("*.tar.xz")))
        yield records.client(records.tracking_uri())


# Per grid: cell runs in the store, cells the report reads (the latest FINISHED run per
# config hash), and its variants; as the committed snapshots hold them.
COMMITTED = {"reproduce": (57, 48, 16), "reproduce-base": (15, 15, 5),
             "reproduce-base-init": (9, 9, 3), "reproduce-base-lr": (2, 2, 2)}


@pytest.mark.parametrize("grid", sorted(COMMITTED))
def test_the_committed_grids_runs_read_back_to_the_records_they_were_written_as(
        committed_store, grid):
    """Every cell run the grid wrote before lab/records/cells.py reads back to the values its
    tags hold, and to what the report read from them then (the same expressions, kept here
    as the reference); its run name and lr tag are format_lr's spelling byte for byte."""
    _, runs = records.grid_cell_runs(committed_store, grid)
    for run in runs:
        tags, record = run.data.tags, CellRecord.from_run(run)
        before = (run.info.run_id, tags.get("variant", "?"), float(tags.get("lr", "nan")),
                  int(tags.get("seed", -1)), tags.get("diverged") == "true",
                  run.data.params.get("model.ffn", "dense"))
        assert (record.run_id, record.variant, record.lr, record.seed, record.diverged,
                record.ffn) == before
        assert record.config_hash == tags["config_hash"] and record.status == run.info.status
        assert format_lr(record.lr) == tags["lr"] and record.name == run.info.run_name
    read = finished_records(runs, lambda run: dict(run.data.metrics))
    assert (len(runs), len(read), len({r.variant for r in read})) == COMMITTED[grid]
    assert all(r.val_ppl is not None and 1 < r.val_ppl < 1e4 for r in read)


def test_a_resumed_grid_finds_the_committed_cells_done(committed_store, monkeypatch):
    """The grid's resume reads the committed runs through CellRecord: reproduce-base-lr's two
    FINISHED cells (seed 0) are done; its other seeds are still to train, from the start."""
    from lab.experiments.grid import spec
    from lab.experiments.grid.claims import reconcile
    from lab.experiments.schema import load_grid

    # The prepared corpus's vocabulary (16,384: docs/results.md), which CI does not have.
    monkeypatch.setattr(spec, "open_data", lambda config: (SimpleNamespace(vocab_size=16384),))
    root = Path(__file__).resolve().parents[2]
    cells = spec.plan(load_grid(root / "ablations" / "reproduce-base-lr.yaml"))
    _, runs = records.grid_cell_runs(committed_store, "reproduce-base-lr")
    plan = reconcile(committed_store, cells, runs)
    assert {cell.name for cell in plan.done} == {run.info.run_name for run in runs}
    assert len(plan.done) == 2 and len(plan.tasks) == len(cells) - 2 and plan.killed == []
    assert {task.config.train.seed for task in plan.tasks} == {1, 2}
    assert not any(task.resumed or task.run_id for task in plan.tasks)
