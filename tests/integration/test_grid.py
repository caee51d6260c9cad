"""lab/experiments/grid/: grid files, cells, the MLflow layout, resume, workers and per-cell
failures."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from gridkit import TINY_OVERRIDES, TINY_TOKENS, run_statuses, tiny_grid
from lab.errors import LabError
from lab.experiments.grid.run import GridOptions, run_grid
from lab.experiments.grid.spec import parse_shard, plan, shard_cells
from lab.experiments.schema import grid_from_dict, load_grid, with_cli
from lab.records import owner_alive, owner_identity


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "")


FIGURES = {"analysis/first_token_attn.png", "analysis/max_activation.png",
           "analysis/gate_scores.png", "analysis/attention_maps.png"}  # a gated variant's


def _artifacts(client, run_id: str, folder: str = "analysis") -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def test_grid_file_reads_yaml_numbers_and_cli_flags_replace_fields(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nvariants: [baseline, sdpa_headwise_sigmoid_mul]\ntokens: 2e5\n"
                    "seeds: [0, 1]\nlrs: [3e-3, 1e-3]\noverrides: {train.val_every: 50}\n")
    spec = load_grid(path)
    assert spec.tokens == 2e5 and spec.lrs == (3e-3, 1e-3) and spec.seeds == (0, 1)
    assert spec.preset == "tiny" and spec.data == "synthetic"
    spec = with_cli(spec, tokens="1e4", seeds="2,3,4", variants="baseline",
                    overrides=["train.log_every=7"])
    assert spec.tokens == 1e4 and spec.seeds == (2, 3, 4) and spec.variants == ("baseline",)
    assert spec.overrides == {"train.val_every": 50, "train.log_every": "7"}
    cells = plan(spec)
    assert [c.name for c in cells] == [f"baseline/lr={lr:g}/seed={s}" for s in (2, 3, 4)
                                       for lr in (3e-3, 1e-3)]
    assert all(c.config.train.val_every == 50 and c.config.train.log_every == 7 for c in cells)
    assert len({c.config_hash for c in cells}) == len(cells)


def test_all_means_every_variant_available_at_the_preset():
    cells = plan(grid_from_dict({"name": "a", "variants": "all", "tokens": 1e4}))
    variants = {c.variant for c in cells}
    assert "baseline_add4experts" not in variants  # MoE-only, the tiny preset is dense
    assert {"baseline", "sdpa_elementwise_sigmoid_mul", "switchhead_v_1top1"} <= variants
    assert cells[0].variant == "baseline"


def test_lrs_from_sweep_asks_the_sweep_module(monkeypatch):
    import types

    fake = types.ModuleType("lab.experiments.sweep.results")
    fake.best_lrs = lambda name, storage=None: {"baseline": 1e-3, "sdpa_headwise_sigmoid_mul": 4e-3}
    monkeypatch.setitem(sys.modules, "lab.experiments.sweep.results", fake)
    spec = grid_from_dict({"name": "s", "variants": ["baseline", "sdpa_headwise_sigmoid_mul"],
                           "lrs": {"from_sweep": "lr-tiny"}, "tokens": 1e4})
    assert {(c.variant, c.lr) for c in plan(spec)} == {("baseline", 1e-3),
                                                       ("sdpa_headwise_sigmoid_mul", 4e-3)}
    fake.best_lrs = lambda name, storage=None: {"baseline": 1e-3}
    with pytest.raises(LabError, match="sdpa_headwise_sigmoid_mul"):
        plan(spec)


def test_shards_partition_the_cells():
    cells = plan(grid_from_dict({"name": "s", "variants": ["baseline", "sdpa_headwise_sigmoid_mul"],
                                 "seeds": [0, 1, 2], "tokens": 1e4}))
    parts = [shard_cells(cells, parse_shard(f"{i}/3")) for i in range(3)]
    assert sorted(c.name for p in parts for c in p) == sorted(c.name for c in cells)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(LabError, match="--shard"):
        parse_shard("3/3")


def test_dry_run_prints_cells_counts_and_estimate_and_writes_nothing(store, capsys, tmp_path):
    spec = grid_from_dict(tiny_grid("dry", ["baseline", "sdpa_elementwise_sigmoid_mul"]))
    run_grid(spec, GridOptions(dry_run=True))
    out = capsys.readouterr().out
    from lab.model.params import count_params

    for cell in plan(spec):
        counts = count_params(cell.config)
        assert f"{counts['total']:,}  {counts['added']:>10,}" in out
        assert cell.name in out and cell.config_hash in out
    assert "estimated time" in out and "basis:" in out
    from mlflow.tracking import MlflowClient

    assert MlflowClient(store).get_experiment_by_name("dry") is None


def test_measured_rates_keep_to_the_device_and_undo_packing(store):
    """The dry run's measured basis: only runs that trained on the kind of device asked
    about, each scaled to one cell alone (a run that shared its GPU with another ran at
    packing_speedup(2) / 2 of that); runs from before the device tag count as GPU runs
    when they logged GPU memory."""
    from mlflow.tracking import MlflowClient

    from lab.experiments.grid.estimate import measured_tokens_per_s, packing_speedup

    client = MlflowClient(store)
    experiment = client.create_experiment("rates")

    def run(tokens, wall, tags=None, metrics=None):
        run_id = client.create_run(experiment, tags={"preset": "small", "data": "synthetic",
                                                     **(tags or {})}).info.run_id
        for key, value in {"tokens/seen": tokens, "time/wall_s": wall, **(metrics or {})}.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, "FINISHED")

    run(1000, 10, {"device": "cpu"})
    run(1000, 1, {"device": "NVIDIA H200", "gatelab.runs_per_gpu": "2"})
    assert measured_tokens_per_s(store, "small", "synthetic", "cpu") == (100.0, 1)
    rate, n = measured_tokens_per_s(store, "small", "synthetic", "cuda")
    assert n == 1 and rate == pytest.approx(1000 * 2 / packing_speedup("small", 2))
    run(3000, 1, metrics={"memory/peak_gib": 2.0})  # before the tag: a GPU run by its memory
    assert measured_tokens_per_s(store, "small", "synthetic", "cuda")[1] == 2
    assert measured_tokens_per_s(store, "small", "synthetic", "cpu") == (100.0, 1)
    # With a batch size: only the runs at that batch, where the store holds any.
    for tokens in (500, 700):
        run_id = client.create_run(experiment, tags={"preset": "small", "data": "synthetic",
                                                     "device": "cpu"}).info.run_id
        client.log_param(run_id, "train.batch_size", "16")
        for key, value in {"tokens/seen": tokens, "time/wall_s": 10}.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, "FINISHED")
    assert measured_tokens_per_s(store, "small", "synthetic", "cpu", 16) == (70.0, 2)
    assert measured_tokens_per_s(store, "small", "synthetic", "cpu")[1] == 3  # all of them
    assert measured_tokens_per_s(store, "small", "synthetic", "cpu", 32)[1] == 3  # none at 32


def test_a_time_limit_admits_the_first_cells_by_the_measured_rate_with_packing(store,
                                                                                monkeypatch):
    """Before any cell of this process has ended, `--time-limit` admits a cell only if the
    store's measured rate says it ends in time, cells sharing a GPU each slower by
    runs_per_gpu / their measured speed-up (an unmeasured preset: no speed-up); with nothing
    measured it admits as before; once a cell has ended here, that cell's time rules."""
    from mlflow.tracking import MlflowClient

    from lab.config import resolve
    from lab.experiments.grid import run as grid
    from lab.experiments.grid.estimate import expected_cell_s

    config = resolve("baseline", "deep-narrow", tokens=3e8)
    assert expected_cell_s([config], store, "cuda", 1) is None
    client = MlflowClient(store)
    experiment = client.create_experiment("measured")
    run_id = client.create_run(experiment, tags={"preset": "deep-narrow", "data": config.data.source,
                                                 "device": "NVIDIA H200"}).info.run_id
    client.log_metric(run_id, "tokens/seen", 1e8)
    client.log_metric(run_id, "time/wall_s", 200.0)  # 5e5 tokens/s end to end
    client.set_terminated(run_id, "FINISHED")
    seconds, basis = expected_cell_s([config], store, "cuda", 1)
    assert seconds == pytest.approx(600.0) and "median of 1 finished deep-narrow" in basis
    assert expected_cell_s([config], store, "cuda", 3)[0] == pytest.approx(1800.0)
    assert expected_cell_s([config], store, "cpu", 1) is None

    clock = [0.0]
    monkeypatch.setattr(grid, "_now", lambda: clock[0])
    dispatch = grid.Dispatch(None, 0.0, 1000.0)
    assert dispatch.admit()  # nothing measured: as before
    dispatch.expected_s = seconds
    assert dispatch.admit()  # 0 + 600 < 1000
    clock[0] = 500.0
    assert not dispatch.admit()  # 500 + 600 > 1000
    dispatch.longest_s = 400.0  # a cell ended here after 400 s: it rules
    assert dispatch.admit()


def test_a_time_limit_expects_no_more_cells_on_a_gpu_than_there_are_to_run(store):
    """A grid with one cell left at --runs-per-gpu 2 runs it alone: its expectation is one
    cell's time, not a packed cell's (which could refuse a cell that fits, on every rerun)."""
    from mlflow.tracking import MlflowClient

    from lab.config import resolve
    from lab.experiments.grid import run as grid
    from lab.experiments.grid.estimate import packing_speedup

    config = resolve("baseline", "small", tokens=1e8)
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("measured"), tags={
        "preset": "small", "data": config.data.source, "device": "NVIDIA H200"}).info.run_id
    client.log_metric(run_id, "tokens/seen", 1e8)
    client.log_metric(run_id, "time/wall_s", 200.0)
    client.set_terminated(run_id, "FINISHED")
    layout = grid.Layout(["0"], 1, 2, [], 2, 1, None)
    dispatch = grid.Dispatch(None, 0.0, 1000.0)
    dispatch.expect([config], store, layout, "g", quiet=True)
    assert dispatch.expected_s == pytest.approx(200.0)
    dispatch.expect([config, config], store, layout, "g", quiet=True)
    assert dispatch.expected_s == pytest.approx(200.0 * 2 / packing_speedup("small", 2))
    # a DDP cell over 2 GPUs: one GPU's measured rate is not its rate, so none is expected
    ddp = grid.Dispatch(None, grid._now(), 1000.0)
    ddp.expect([config], store, grid.Layout(["0", "1"], 2, 1, [], 1, 1, None), "g", quiet=True)
    assert ddp.expected_s == 0.0 and ddp.admit()


@pytest.mark.slow
def test_dry_run_after_a_run_marks_finished_cells_done(store, capsys):
    """A dry run of a grid that has partly run lists its FINISHED cells as done and times
    only the rest, from the finished runs' own speed on this kind of device."""
    raw = tiny_grid("partial", ["baseline"], seeds=[0])
    run_grid(grid_from_dict(raw), GridOptions(quiet=True, cpu_threads=1))
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("partial").experiment_id],
        "tags.variant = 'baseline'")
    assert [r.data.tags["device"] for r in runs] == ["cpu"]
    capsys.readouterr()
    run_grid(grid_from_dict({**raw, "seeds": [0, 1]}), GridOptions(dry_run=True))
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if "/seed=" in line}
    assert lines["baseline/lr=0.003/seed=0"].split()[3] == "done"
    assert lines["baseline/lr=0.003/seed=1"].split()[3] != "done"
    assert "for 1 cell(s) to run (1 already FINISHED in the store)" in out
    assert "median of 1 finished tiny runs on cpu" in out


@pytest.mark.slow
def test_grid_layout_and_rerun_skips_finished_cells(store):
    """Parent run per grid, one child per cell with its tags; a rerun runs nothing; more
    seeds run only the new cells, under the same parent."""
    raw = tiny_grid("layout", ["baseline", "sdpa_headwise_sigmoid_mul"])
    options = GridOptions(quiet=True, cpu_threads=1)
    first = run_grid(grid_from_dict(raw), options)
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    client, runs = _runs(store, "layout")
    parents = [r for r in runs if r.data.tags.get("gatelab.grid_parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.runName"] == f"{tags['variant']}/lr={tags['lr']}/seed={tags['seed']}"
        assert tags["preset"] == "tiny" and len(tags["config_hash"]) == 16
        for name in ("val/ppl", "test/ppl", "val/best_loss", "val/final_loss", "tokens/seen",
                     "time/wall_s", "params/total", "params/added", "spikes/count",
                     "spikes/max_excess"):
            assert name in metrics, name
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"spikes.json", "loss_history.json", "config.yaml"} <= artifacts

    again = run_grid(grid_from_dict(raw), options)
    assert again.outcomes == [] and again.already_done == 2
    more = run_grid(grid_from_dict({**raw, "seeds": [0, 1]}), options)
    assert len(more.outcomes) == 2 and more.already_done == 2
    assert {n: s for n, s in run_statuses(store, "layout").items()} == {
        f"{v}/lr=0.003/seed={s}": ["FINISHED"] for v in ("baseline", "sdpa_headwise_sigmoid_mul")
        for s in (0, 1)}
    _, runs = _runs(store, "layout")
    assert sum(r.data.tags.get("gatelab.grid_parent") == "true" for r in runs) == 1


@pytest.mark.slow
def test_four_cpu_workers_write_one_sqlite_store(store):
    """Four worker processes train and log at once into one SQLite store: every cell is
    recorded exactly once, with all its metrics."""
    variants = ["baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul",
                "value_elementwise_sigmoid_mul"]
    summary = run_grid(grid_from_dict(tiny_grid("four", variants)),
                       GridOptions(cpu_workers=4, cpu_threads=1, quiet=True))
    assert sorted(o.status for o in summary.outcomes) == ["FINISHED"] * 4, \
        [o.failure for o in summary.outcomes]
    assert run_statuses(store, "four") == {f"{v}/lr=0.003/seed=0": ["FINISHED"] for v in variants}
    client, runs = _runs(store, "four")
    for run in runs:
        if run.data.tags.get("mlflow.parentRunId"):
            assert {"val/ppl", "test/ppl", "params/total"} <= set(run.data.metrics)
            assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 8
            # the workers' plots, drawn by the grid's process before the grid returned
            gated = run.data.tags["variant"] != "baseline"
            assert FIGURES - ({"analysis/gate_scores.png"} if not gated else set()) <= \
                _artifacts(client, run.info.run_id)
    assert all(o.unplotted is None for o in summary.outcomes)  # not kept in the summary


def test_a_run_can_hand_its_plots_to_the_grids_process(store):
    """train_run's `plots_elsewhere` (a pool worker's cell): the run logs its analysis
    without the figures and hands the analysis over; the grid's ParentPlots draws them into
    the run's `analysis` folder, the same files an inline run logs."""
    from lab.config import resolve
    from lab.experiments.grid.plots import ParentPlots
    from lab.records import client as store_client
    from lab.training.run import train_run

    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny",
                     {**TINY_OVERRIDES, "train.tokens": TINY_TOKENS,
                      "train.analysis_windows": 2, "train.long_context_factors": ""})
    handed = []
    result = train_run(config, store, "handed", quiet=True, plots_elsewhere=handed.append)
    client = store_client(store)
    assert "analysis/analysis.json" in _artifacts(client, result.run_id)
    assert not FIGURES & _artifacts(client, result.run_id)
    assert len(handed) == 1 and handed[0].attention_maps and handed[0].gate_samples is not None
    plots = ParentPlots(store)
    plots.draw(result.run_id, handed[0])
    plots.close()
    assert FIGURES <= _artifacts(client, result.run_id)
    inline = train_run(config, store, "inline", quiet=True)
    assert _artifacts(client, inline.run_id) == _artifacts(client, result.run_id)


@pytest.mark.slow
def test_a_failing_cell_is_marked_failed_and_the_grid_moves_on(store, monkeypatch):
    """CUDA OOM and a full disk, injected into two cells' training steps: each ends FAILED
    with a tag saying why (OOM: a smaller micro-batch), and the other cells finish."""
    from lab.training.module import LanguageModel

    original = LanguageModel.training_step

    def failing_step(self, batch, batch_idx):
        if self.config.variant == "sdpa_headwise_sigmoid_mul":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.config.variant == "value_elementwise_sigmoid_mul" and self.global_step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", "/store/last.ckpt")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModel, "training_step", failing_step)
    variants = ["sdpa_headwise_sigmoid_mul", "value_elementwise_sigmoid_mul", "baseline"]
    summary = run_grid(grid_from_dict(tiny_grid("failing", variants)),
                       GridOptions(quiet=True, cpu_threads=1))
    by_variant = {o.name.split("/")[0]: o for o in summary.outcomes}
    assert by_variant["baseline"].status == "FINISHED"
    assert "train.micro_batch_size=4" in by_variant["sdpa_headwise_sigmoid_mul"].failure
    assert by_variant["value_elementwise_sigmoid_mul"].failure.startswith("disk full writing")
    _, runs = _runs(store, "failing")
    kinds = {r.data.tags.get("variant"): (r.info.status, r.data.tags.get("gatelab.failure_kind"))
             for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert kinds == {"sdpa_headwise_sigmoid_mul": ("FAILED", "oom"),
                     "value_elementwise_sigmoid_mul": ("FAILED", "disk_full"),
                     "baseline": ("FINISHED", None)}
    parent = next(r for r in runs if r.data.tags.get("gatelab.grid_parent"))
    assert parent.info.status == "FAILED"


def test_owner_liveness():
    assert owner_alive(owner_identity(), None)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not owner_alive(owner_identity(child.pid), None)  # exited
    host, pid, start = owner_identity().rsplit(":", 2)
    assert not owner_alive(f"{host}:{pid}:{start}0", None)    # pid reused by another process
    now = time.time()
    other = "elsewhere.invalid:123:456"
    assert socket.gethostname() != "elsewhere.invalid"
    assert owner_alive(other, str(int(now - 30)), stale_after_s=600, now=now)
    assert not owner_alive(other, str(int(now - 900)), stale_after_s=600, now=now)
    assert not owner_alive(None, None)


def test_runs_per_gpu_gives_each_gpu_that_many_worker_slots(store, monkeypatch):
    """Two GPUs x three runs each: six workers, each pinned to one GPU, the host's cores split
    between them. (No GPU here: the device list and the pool are stand-ins.)"""
    from lab.experiments.grid import run as grid

    pools, events = [], []

    class RecordingPool:
        begun = False

        def __init__(self, slots, threads):
            pools.append((slots, threads))
            events.append("workers started")

        def begin(self, ctx):
            self.begun = True
            events.append("context handed")

        def run(self, tasks, finished, dispatched, admit, **orderings):
            return []  # no task left unstarted

        def close(self):
            pass

    def check(spec, cells, layout, options):
        events.append("check")
        return None, 0.0

    monkeypatch.setattr(grid, "parse_gpus", lambda text: ["0", "1"])
    monkeypatch.setattr(grid, "CellPool", RecordingPool)
    monkeypatch.setattr(grid, "_check_variants", check)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    spec = grid_from_dict(tiny_grid("packed", ["baseline"], seeds=(0, 1)))
    run_grid(spec, GridOptions(gpus="all", runs_per_gpu=3, quiet=True))
    (slots, threads), = pools
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "0", "1", "1", "1"]
    assert threads == 2
    # the workers start before the check, so that their imports overlap it
    assert events == ["workers started", "check", "context handed"]
    # ... unless the store holds every cell FINISHED: then none starts early (here the store
    # is made to say so, and its runs, which the stand-in pool never trained, still start
    # them after the check, as a grid did before workers started early)
    monkeypatch.setattr(grid, "finished_in_store",
                        lambda uri, name: {cell.config_hash for cell in plan(spec)})
    events.clear()
    run_grid(spec, GridOptions(gpus="all", runs_per_gpu=3, quiet=True))
    assert events == ["check", "workers started", "context handed"]


def test_the_check_covers_only_the_variants_with_cells_left_to_train(store, monkeypatch):
    """A grid resumed on a GPU machine checks the variants it will train, not one whose cells
    the store holds finished; with every cell finished it checks nothing. (No GPU here: the
    device list, the pool and the store's finished cells are stand-ins.)"""
    from lab import check as lab_check
    from lab.experiments.grid import run as grid

    checked = []

    class IdlePool:
        begun = False

        def __init__(self, slots, threads):
            pass

        def begin(self, ctx):
            self.begun = True

        def run(self, tasks, finished, dispatched, admit, **orderings):
            return []

        def close(self):
            pass

    monkeypatch.setattr(grid, "parse_gpus", lambda text: ["0"])
    monkeypatch.setattr(grid, "CellPool", IdlePool)
    monkeypatch.setattr(lab_check, "check_before_training",
                        lambda preset, variants, *args, **kwargs: checked.append(variants))
    spec = grid_from_dict(tiny_grid("resumed", ["baseline", "sdpa_elementwise_sigmoid_mul"],
                                    seeds=(0, 1)))
    baseline_done = {c.config_hash for c in plan(spec) if c.variant == "baseline"}
    monkeypatch.setattr(grid, "finished_in_store", lambda uri, name: baseline_done)
    run_grid(spec, GridOptions(gpus="all", runs_per_gpu=2, quiet=True))
    assert checked == [["sdpa_elementwise_sigmoid_mul"]]
    monkeypatch.setattr(grid, "finished_in_store",
                        lambda uri, name: {c.config_hash for c in plan(spec)})
    run_grid(spec, GridOptions(gpus="all", runs_per_gpu=2, quiet=True))
    assert checked == [["sdpa_elementwise_sigmoid_mul"]]  # nothing to train, nothing checked


@pytest.mark.parametrize("overrides, runs_per_gpu, message", [
    ({}, 0, "--runs-per-gpu: must be at least 1"),
    ({"train.devices": 2}, 2, "--runs-per-gpu: a DDP cell"),
])
def test_runs_per_gpu_refuses_nonsense_before_training(store, monkeypatch, overrides,
                                                       runs_per_gpu, message):
    from lab.experiments.grid import run as grid
    from lab.training import preflight

    monkeypatch.setattr(grid, "parse_gpus", lambda text: ["0", "1"])
    monkeypatch.setattr(preflight, "check_devices", lambda devices: None)  # the two faked GPUs
    with pytest.raises(LabError, match=message):
        run_grid(grid_from_dict(tiny_grid("refused", ["baseline"], **overrides)),
                 GridOptions(gpus="all", runs_per_gpu=runs_per_gpu, quiet=True))
    assert run_statuses(store, "refused") == {}


# --- one claim per cell (issue 26) ----------------------------------------------------------

def test_a_cell_is_claimed_once_and_taken_over_only_from_a_dead_holder(store):
    """claim_cell on the store alone (no training): the first claimant of an attempt holds
    it; another process is turned away while the holder lives, takes the next attempt once
    it is dead, and nobody claims a cell that has a FINISHED run."""
    from lab import records
    from lab.experiments.grid.claims import GridContext, Task, claim_cell
    from lab.records import find_or_create_grid_parent

    raw = tiny_grid("claims", ["baseline"])
    [cell] = plan(grid_from_dict(raw))
    client = records.client(store)
    experiment = records.experiment_id(client, "claims", store)
    ctx = GridContext(store, "claims", find_or_create_grid_parent(client, experiment, "claims"),
                      "claims", True)
    task = Task(0, cell.name, cell.config)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    dead, alive = owner_identity(exited.pid), owner_identity()

    claimed, _ = claim_cell(task, ctx, dead)
    assert claimed.claim == f"{cell.config_hash}/1" and claimed.run_id is None
    mine, _ = claim_cell(task, ctx, alive)               # the holder is gone: attempt 2
    assert mine.claim == f"{cell.config_hash}/2"
    other, why = claim_cell(task, ctx, "elsewhere.invalid:1:1")  # fresh claim time: alive
    assert other is None and f"claimed by {alive}" in why
    assert claim_cell(task, ctx, alive)[0].claim == mine.claim   # one process, one claim
    params = client.get_run(ctx.parent_run_id).data.params
    assert {k: v.rpartition("@")[0] for k, v in params.items()} == {
        f"gatelab.claim/{cell.config_hash}/1": dead, f"gatelab.claim/{cell.config_hash}/2": alive}

    from lab.experiments.grid.cells import create_cell_run

    run_id = create_cell_run(mine, ctx, alive)
    assert client.get_run(run_id).data.tags["gatelab.claim"] == mine.claim
    client.set_terminated(run_id, "FINISHED")
    assert claim_cell(task, ctx, "elsewhere.invalid:1:1") == (None, "FINISHED by another process")


@pytest.mark.slow
def test_two_grids_started_together_on_one_store_train_each_cell_once(store, tmp_path):
    """Two `gatelab grid` processes on one store with nothing in it yet (no experiment, no
    parent): every cell ends with exactly one run, FINISHED, under one parent."""
    import yaml

    from gridkit import cli_process, grid_processes

    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(tiny_grid("twice", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                             seeds=(0, 1))))
    env = {k: os.environ[k] for k in ("GATELAB_STORE", "GATELAB_CACHE")}
    context = grid_processes()
    grids = [context.Process(target=cli_process,
                             args=(["grid", str(path), "--quiet", "--cpu-threads", "1"], env))
             for _ in range(2)]
    for process in grids:
        process.start()
    for process in grids:
        process.join(timeout=300)
    assert [p.exitcode for p in grids] == [0, 0]
    assert run_statuses(store, "twice") == {
        f"{v}/lr=0.003/seed={s}": ["FINISHED"] for v in ("baseline", "sdpa_headwise_sigmoid_mul")
        for s in (0, 1)}
    client, runs = _runs(store, "twice")
    [parent] = [r for r in runs if r.data.tags.get("gatelab.grid_parent") == "true"]
    assert parent.info.status == "FINISHED"
    claims = [k for k in parent.data.params if k.startswith("gatelab.claim/")]
    assert len(claims) >= 4


@pytest.mark.slow
def test_a_cell_job_runs_as_its_own_process_through_the_packages_main(store):
    """run_ddp_cell's job (`python -m lab.experiments.grid --run-cell`, what each DDP rank
    runs) on the CPU, with no GPU given: the job trains the cell the grid claimed and created
    its run for, and the grid reads the outcome it wrote."""
    from lab import records
    from lab.experiments.grid.cells import run_ddp_cell
    from lab.experiments.grid.claims import GridContext, Task

    [cell] = plan(grid_from_dict(tiny_grid("job", ["baseline"])))
    client = records.client(store)
    experiment = records.experiment_id(client, "job", store)
    parent = records.find_or_create_grid_parent(client, experiment, "job")
    outcome = run_ddp_cell(Task(0, cell.name, cell.config),
                           GridContext(store, "job", parent, "job", True), [])
    assert outcome.status == "FINISHED" and outcome.val_ppl > 1, outcome
    assert run_statuses(store, "job") == {cell.name: ["FINISHED"]}
    assert client.get_run(outcome.run_id).data.tags["gatelab.claim"] == f"{cell.config_hash}/1"


@pytest.mark.slow
def test_a_time_limit_starts_no_cell_that_would_not_end_in_time(store, monkeypatch):
    """Each cell takes 100 s of a made-up clock; under a 250 s limit the second cell starts
    (100 + 100 < 250) and the third does not (200 + 100 > 250): it is left, said so, and a
    rerun without the limit trains only it."""
    from lab.experiments.grid import run as grid

    clock = [0.0]
    original = grid.execute_cell

    def cell_of_100_s(task, ctx, **kwargs):
        outcome = original(task, ctx, **kwargs)
        clock[0] += 100.0
        return outcome

    monkeypatch.setattr(grid, "_now", lambda: clock[0])
    monkeypatch.setattr(grid, "execute_cell", cell_of_100_s)
    raw = tiny_grid("limited", ["baseline", "sdpa_headwise_sigmoid_mul", "sdpa_elementwise_sigmoid_mul"])
    summary = run_grid(grid_from_dict(raw), GridOptions(quiet=True, cpu_threads=1, time_limit_s=250))
    assert [o.status for o in summary.outcomes] == ["FINISHED", "FINISHED"]
    assert summary.left_for_time == 1
    assert "1 cell(s) not started" in grid.describe_summary(summary)
    assert len(run_statuses(store, "limited")) == 2
    again = run_grid(grid_from_dict(raw), GridOptions(quiet=True, cpu_threads=1))
    assert len(again.outcomes) == 1 and again.already_done == 2 and again.left_for_time == 0
    with pytest.raises(LabError, match="--time-limit"):
        run_grid(grid_from_dict(raw), GridOptions(quiet=True, time_limit_s=0))


def test_a_compiled_shape_is_the_model_and_step_not_the_seed_or_learning_rate():
    from lab.config import resolve
    from lab.training.step import compile_shape

    shape = compile_shape(resolve("baseline", "small", seed=0, lr=3e-3))
    assert compile_shape(resolve("baseline", "small", seed=2, lr=1e-3)) == shape
    for other in (resolve("sdpa_headwise_sigmoid_mul", "small"),
                  resolve("baseline", "small", ["train.compile_mode=reduce-overhead"]),
                  resolve("baseline", "small", ["train.micro_batch_size=16"]),
                  resolve("baseline", "base")):
        assert compile_shape(other) != shape


def what_the_pool_is_handed(monkeypatch, spec, options: GridOptions) -> dict:
    """The grid's run with its pool replaced by one that starts nothing and keeps the set of
    each ordering key it was handed (None where it was handed no such function)."""
    from lab.experiments.grid import run as grid

    seen = {}

    def run(self, tasks, on_outcome, on_dispatch, admit, shape_of=None, model_of=None):
        seen["shapes"] = shape_of and {shape_of(task) for task in tasks}
        seen["models"] = {model_of(task) for task in tasks}
        return list(tasks)  # none started

    monkeypatch.setattr(grid.CellPool, "__init__", lambda self, *args: None)
    monkeypatch.setattr(grid.CellPool, "begin", lambda self, ctx: setattr(self, "begun", True))
    monkeypatch.setattr(grid.CellPool, "run", run)
    monkeypatch.setattr(grid.CellPool, "close", lambda self, signum=None: None)
    run_grid(spec, options)
    return seen


@pytest.mark.parametrize("warm_first", [False, True])
def test_warm_first_hands_the_pool_each_cells_compiled_shape(store, monkeypatch, warm_first):
    spec = grid_from_dict(tiny_grid("warm", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                    seeds=(0, 1)))
    seen = what_the_pool_is_handed(monkeypatch, spec, GridOptions(cpu_workers=2, quiet=True,
                                                                  warm_first=warm_first))
    assert (seen["shapes"] is None) if not warm_first else len(seen["shapes"]) == 2
    assert len(seen["models"]) == 2  # a worker's next cell: another seed of its variant first


def what_is_compiled_ahead(monkeypatch, spec, options: GridOptions) -> list[str] | None:
    """The variants the grid hands its compile-ahead process (lab/experiments/grid/ahead.py),
    in order, with its pool replaced as above; None where it starts none."""
    from lab.experiments.grid import ahead

    handed = {}

    def start(configs, started, gpus, label, quiet):
        handed["variants"] = [c.variant for c in ahead.shapes_ahead(configs, started, cuda=False)]

    monkeypatch.setattr(ahead, "start_compile_ahead", start)
    what_the_pool_is_handed(monkeypatch, spec, options)
    return handed.get("variants")


@pytest.mark.parametrize("warm_first, expected", [(False, ["sdpa_headwise_sigmoid_mul"]),
                                                  (True, [])])
def test_the_shapes_compiled_ahead_are_those_the_first_cells_do_not_compile(
        store, monkeypatch, warm_first, expected):
    """Two workers: the first two cells in order (two learning rates of the baseline, one
    shape) start at once, so the headwise variant's shape is compiled ahead; with
    --warm-first the second worker starts on the headwise cell, and nothing is left to."""
    spec = grid_from_dict(tiny_grid("ahead", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                    lrs=(3e-3, 1e-2), **{"train.compile": True}))
    assert what_is_compiled_ahead(monkeypatch, spec, GridOptions(
        cpu_workers=2, quiet=True, warm_first=warm_first)) == expected
    assert what_is_compiled_ahead(monkeypatch, spec, GridOptions(
        cpu_workers=2, quiet=True, compile_ahead=False)) is None


def test_a_compile_ahead_process_that_cannot_start_leaves_the_grid_to_its_cells(
        store, monkeypatch, capfd):
    """The process only ever fills Inductor's cache: where it cannot start (here: no process
    to be had), the grid goes on to its pool, its cells compiling their shapes themselves,
    and says so."""
    from lab.experiments.grid import ahead

    def no_process(self, *args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(ahead.CompileAhead, "__init__", no_process)
    spec = grid_from_dict(tiny_grid("ahead-fails", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                    lrs=(3e-3, 1e-2), **{"train.compile": True}))
    seen = what_the_pool_is_handed(monkeypatch, spec, GridOptions(cpu_workers=2, quiet=True))
    assert len(seen["models"]) == 2  # the pool was handed the cells
    assert "grid ahead-fails: compiling ahead did not start" in capfd.readouterr().err


def test_under_cuda_graphs_the_pool_keeps_the_plans_order(store, monkeypatch):
    """A worker resets Dynamo for every run under CUDA graphs (lab/training/step.py
    compile_for_training), so there is no model to keep: the pool is handed none, and keeps
    the plan's seed-major order (a ladder cut by --time-limit holds its first seed's pairs),
    instead of training every cell of one variant first for nothing."""
    spec = grid_from_dict(tiny_grid("graphs", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                    seeds=(0, 1), **{"train.compile_mode": "reduce-overhead"}))
    seen = what_the_pool_is_handed(monkeypatch, spec, GridOptions(cpu_workers=2, quiet=True))
    assert seen["models"] == {None}
