"""Issue 9: bad input, divergence, crashes, concurrency, determinism and resources lose
nothing. The grid mechanics themselves are in test_grid.py."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from gridkit import (ForkedCommand, grid_processes, nothing, run_grid_process, run_statuses,
                     tiny_grid)
from storekit import make_store

CRASH_TRIALS = int(os.environ.get("GATELAB_CRASH_TRIALS", "10"))


def _loss_histories(uri: str, experiment: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    from lab.reports.figures import loss_history

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        if run.data.tags.get("mlflow.parentRunId"):
            out[run.data.tags["mlflow.runName"]] = loss_history(client, run.info.run_id)[1]
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_finishes_each_cell_exactly_once(store):
    """SIGKILL the grid process CRASH_TRIALS times at random moments (each restart is also a
    rerun: it must reconcile what the last one left), then let it finish. Every cell ends
    with exactly one FINISHED run, none RUNNING, and every resumed run's loss curve is
    bit-identical to an uninterrupted run of the same cell."""
    context = grid_processes()
    env = {k: os.environ[k] for k in ("GATELAB_STORE", "GATELAB_CACHE")}
    variants = ["baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul"]
    reference, crashed = tiny_grid("reference", variants), tiny_grid("crashed", variants)

    def grid(raw):
        process = context.Process(target=run_grid_process, args=(raw, env))
        process.start()
        return process

    warm_up = context.Process(target=nothing)  # starts the fork server, outside any timing
    warm_up.start()
    warm_up.join()
    started = time.perf_counter()
    process = grid(reference)
    process.join()
    assert process.exitcode == 0
    full = time.perf_counter() - started

    # Kill moments uniform over the first half of an uninterrupted grid's time: each restart
    # pays its start-up again, so the grid still advances through every phase.
    rng = random.Random(int(os.environ.get("GATELAB_CRASH_SEED", "9")))
    killed, unfinished_seen = 0, False
    for _ in range(CRASH_TRIALS):
        process = grid(crashed)
        process.join(timeout=rng.uniform(0.0, full / 2))
        if process.is_alive():
            process.kill()  # SIGKILL
            process.join()
            killed += 1
        statuses = run_statuses(store, "crashed")
        assert all(s.count("FINISHED") <= 1 for s in statuses.values()), statuses
        unfinished_seen |= any(s != "FINISHED" for runs in statuses.values() for s in runs)
    assert killed >= CRASH_TRIALS // 2
    process = grid(crashed)
    process.join()
    assert process.exitcode == 0

    final = run_statuses(store, "crashed")
    assert sorted(final) == sorted(f"{v}/lr=0.003/seed=0" for v in variants)
    for name, statuses in final.items():
        assert statuses.count("FINISHED") == 1, (name, statuses)
        assert "RUNNING" not in statuses, (name, statuses)
    assert unfinished_seen  # the kills did interrupt runs, not only start-ups
    assert _loss_histories(store, "crashed") == _loss_histories(store, "reference")


def _kill_resume_benchmark():
    """benchmarks/kill_resume.py, the measurement of docs/reliability.md, as a module."""
    import importlib.util
    import sys

    if "kill_resume" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_resume.py"
        spec = importlib.util.spec_from_file_location("kill_resume", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kill_resume"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["kill_resume"]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["grid", "sweep"])
def test_kill_resume_of_the_command_s_process_group(tmp_path, monkeypatch, what):
    """The reduced measurement of benchmarks/kill_resume.py: `gatelab grid` / `gatelab
    sweep` SIGKILLed as a whole process group at random moments (at least 2 kills), rerun
    after each, ends as the uninterrupted command on a fresh store does: one FINISHED run
    per cell (each ladder point finished once), nothing RUNNING or WAITING, the same final
    metrics, loss histories and trial values. Commands are forked from a preloaded server
    here (a fork, not an interpreter start) and use one worker on one torch thread."""
    kill_resume = _kill_resume_benchmark()
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    context = grid_processes()
    warm_up = context.Process(target=nothing)  # starts the fork server, outside any timing
    warm_up.start()
    warm_up.join()
    overrides = {"model.context": 32, "train.batch_size": 8, "train.val_every": 4,
                 "train.val_batches": 2, "train.log_every": 2, "train.checkpoint_every": 4,
                 "train.analysis_windows": 0}
    if what == "grid":
        case = kill_resume.GridCase(workers=1, spec=tiny_grid(
            "kill-resume-ci", ["baseline", "sdpa_elementwise_sigmoid_mul"], **overrides))
    else:
        case = kill_resume.SweepCase(workers=1, spec={
            "name": "kill-resume-ci-sweep", "preset": "tiny", "data": "synthetic",
            "tokens": 2048, "variants": ["baseline"], "lr": {"ladder": [3e-3, 30.0]},
            "pruner": "none", "overrides": overrides})
    prepare = case.prepare

    def prepare_with_a_store(workdir):
        # A migrated empty store, so that the kills reach training in a CI-sized run (the
        # benchmark, and tests/unit/test_records_store.py, kill the store's creation too).
        prepare(workdir)
        make_store(workdir / "mlruns")

    case.prepare = prepare_with_a_store

    def launch(argv, workdir, log):
        return ForkedCommand(context, argv, workdir, log, kill_resume.environment(workdir))

    measurement = kill_resume.measure(case, tmp_path, kills=2, seed=int(
        os.environ.get("GATELAB_CRASH_SEED", "9")), say=lambda line: None, launch=launch)
    assert measurement.kills >= 2
    for round_ in measurement.rounds:
        # In full: pytest cuts a long dict short, and CI's log is all there is of a failure.
        assert round_.checks["passed"], json.dumps(round_.checks, default=str)
        assert round_.attempts[-1].exit_code == 0 and not round_.attempts[-1].killed


# --- 1. validation up front ---------------------------------------------------------------

BASE = "name: bad\npreset: tiny\ntokens: 4096\nvariants: [baseline]\n"


@pytest.mark.parametrize("text, expected", [
    ("name: bad\nvariants: [baseline\n", "malformed YAML at line"),
    (BASE + "seed: [0]\n", "unknown field 'seed'; allowed: name, preset"),
    ("name: bad\nvariants: [baselin]\n", "variant: unknown variant 'baselin'"),
    (BASE.replace("tiny", "huge"), "preset: unknown preset 'huge'; allowed: tiny"),
    (BASE.replace("[baseline]", "[sdpa_elementwise_sigmoid_mul]")
     + "overrides: {gate.activation: tanh}\n", "gate.activation: 'tanh' is not one of sigmoid"),
    (BASE + "overrides: {train.nope: 1}\n", "unknown field 'nope' of train"),
    (BASE + "overrides: {model.n_kv_heads: 3}\n", "model.n_heads: 4 query heads are not divisible"),
    (BASE + "overrides: {train.lr: 1e-3}\n", "overrides.train.lr: set this with the grid's `lrs`"),
    (BASE.replace("4096", "0"), "tokens: must be a positive number"),
    (BASE + "seeds: [-1]\n", "seeds: seeds are non-negative integers"),
    (BASE + "lrs: [0]\n", "lrs: must be a positive number"),
    (BASE + "seeds: [0, 0]\n", "seeds: lists a value twice"),
    ("- just\n- a list\n", "expected a mapping with fields name, preset"),
])
def test_bad_grid_input_is_one_line_exit_2_and_creates_no_run(store, capsys, tmp_path, text,
                                                              expected):
    from mlflow.tracking import MlflowClient

    from lab.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["grid", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert [e.name for e in MlflowClient(store).search_experiments()] == ["Default"]


@pytest.mark.parametrize("flags, expected", [
    (["--seeds", "0,x"], "--seeds: expected a number"),
    (["--tokens", "-5"], "--tokens: must be a positive number"),
    (["--gpus", "0"], "--gpus: no CUDA device"),
    (["--shard", "2/2"], "--shard: expected i/n"),
    (["--cpu-workers", "0"], "--cpu-workers: must be at least 1"),
    (["--set", "model.n_layers=0"], "model.n_layers: must be a positive integer"),
])
def test_bad_grid_flags_are_one_line_exit_2(store, capsys, tmp_path, flags, expected):
    from lab.cli import main

    if flags[0] == "--gpus" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    path = tmp_path / "ok.yaml"
    path.write_text(BASE)
    assert main(["grid", str(path), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


# --- 3. divergence ---------------------------------------------------------------------------

class PoisonWeights(L.Callback):
    """Sets one weight to NaN after the given step: the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_nan_ends_the_run_as_diverged_and_keeps_the_last_finite_checkpoint(store):
    from mlflow.tracking import MlflowClient

    from lab.config import resolve
    from lab.records import checkpoint_dir
    from lab.training.run import train_run

    config = resolve("baseline", "tiny", {"model.context": 32, "train.batch_size": 8,
                     "train.log_every": 1, "train.val_every": 4, "train.checkpoint_every": 2},
                     data="synthetic", tokens=4096)
    result = train_run(config, store, "nan", quiet=True, callbacks=[PoisonWeights(5)])
    assert result.status == "FINISHED" and result.diverged_step == 6
    run = MlflowClient(store).get_run(result.run_id)
    assert run.data.tags["diverged"] == "true" and run.data.metrics["diverged/step"] == 6
    assert run.info.status == "FINISHED"
    state = torch.load(checkpoint_dir(result.run_id) / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["global_step"] <= 5
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_a_diverging_cell_does_not_stop_the_grid(store):
    from lab.experiments.grid.run import GridOptions, run_grid
    from lab.experiments.schema import grid_from_dict

    summary = run_grid(grid_from_dict(tiny_grid("diverging", ["baseline"], lrs=[1e3, 3e-3])),
                       GridOptions(quiet=True, cpu_threads=1))
    by_lr = {o.name: o for o in summary.outcomes}
    assert by_lr["baseline/lr=1000/seed=0"].diverged_step is not None
    assert by_lr["baseline/lr=0.003/seed=0"].diverged_step is None
    assert run_statuses(store, "diverging") == {"baseline/lr=1000/seed=0": ["FINISHED"],
                                                "baseline/lr=0.003/seed=0": ["FINISHED"]}
    again = run_grid(grid_from_dict(tiny_grid("diverging", ["baseline"], lrs=[1e3, 3e-3])),
                     GridOptions(quiet=True, cpu_threads=1))
    assert again.outcomes == []  # a diverged run is a result, not something to redo


# --- 6. determinism ----------------------------------------------------------------------------

def test_same_config_and_seed_give_a_bitwise_identical_loss_curve_on_cpu(store):
    from lab.config import resolve
    from lab.training.run import train_run

    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", {"model.context": 32,
                     "train.batch_size": 8, "train.val_every": 8}, data="synthetic",
                     tokens=2048, seed=3)
    first = train_run(config, store, "det-a", quiet=True)
    second = train_run(config, store, "det-b", quiet=True)
    histories = [_loss_histories_of(store, r.run_id) for r in (first, second)]
    assert len(histories[0]) == 8 and histories[0] == histories[1]
    assert first.metrics["val/ppl"] == second.metrics["val/ppl"]
    other_seed = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=4))
    assert _loss_histories_of(store, train_run(other_seed, store, "det-c", quiet=True).run_id) \
        != histories[0]


def _loss_histories_of(uri, run_id):
    from mlflow.tracking import MlflowClient

    from lab.reports.figures import loss_history

    return loss_history(MlflowClient(uri), run_id)[1]


def test_the_data_order_is_a_function_of_seed_and_step_only(store):
    """What makes GPU runs see the same batches as CPU runs: no loader state."""
    from lab.data.store import prepare_synthetic
    from lab.data.windows import WindowSampler

    store_ = prepare_synthetic(512)
    a, b = WindowSampler(store_, 32, 4, seed=7), WindowSampler(store_, 32, 4, seed=7)
    assert all(torch.equal(a.batch(i)[0], b.batch(i)[0]) for i in (0, 5, 1000))
    assert not torch.equal(a.batch(0)[0], WindowSampler(store_, 32, 4, seed=8).batch(0)[0])


# --- 8. exposure -------------------------------------------------------------------------------

def test_the_ui_binds_to_loopback_unless_asked():
    from lab.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"


# --- issue 26: checkpoints run no code ----------------------------------------------------------

class Payload:
    """What a malicious checkpoint carries: unpickling it runs a shell command (here one that
    leaves a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poisoned_checkpoint(path: Path, marker: Path, like: dict | None = None) -> Path:
    """A file shaped like a lab checkpoint (or a copy of `like`) with the payload inside."""
    content = dict(like or {"state_dict": {}, "global_step": 1,
                            "hyper_parameters": {"config": {}}})
    content["loops"] = {"payload": Payload(marker)}
    torch.save(content, path)
    return path


@pytest.mark.parametrize("command", [["analyze"], ["export", "--out", "exported"]])
def test_a_checkpoint_carrying_code_is_refused_by_analyze_and_export(store, tmp_path, capsys,
                                                                    command):
    from lab.cli import main

    marker = tmp_path / "payload-ran"
    evil = _poisoned_checkpoint(tmp_path / "evil.ckpt", marker)
    assert main([command[0], str(evil), *command[1:], "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {command[0]}: {evil} refused: loading it would create "
                          "posix.system") and err.count("\n") == 1, err
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()


def test_the_labs_checkpoint_holds_only_tensors_and_plain_data_and_a_poisoned_one_is_not_resumed(
        store, tmp_path, capsys):
    """A real checkpoint needs no type beyond torch's weights_only set. Replaced by one
    carrying code, a grid resuming that run refuses it in one line before anything trains,
    and so does train_run itself: the payload never runs and no run is left RUNNING."""
    import yaml
    from mlflow.tracking import MlflowClient

    from lab.cli import main
    from lab.errors import LabError
    from lab.experiments.grid.spec import plan
    from lab.experiments.schema import grid_from_dict
    from lab.records import checkpoint_dir
    from lab.training.run import train_run

    raw = tiny_grid("poisoned", ["baseline"])
    grid_file = tmp_path / "poisoned.yaml"
    grid_file.write_text(yaml.safe_dump(raw))
    assert main(["grid", str(grid_file), "--quiet", "--cpu-threads", "1"]) == 0
    client = MlflowClient(store)
    run = next(r for r in client.search_runs(
        [client.get_experiment_by_name("poisoned").experiment_id], "")
        if r.data.tags.get("mlflow.parentRunId"))
    ckpt = checkpoint_dir(run.info.run_id) / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []

    # As if the grid had been SIGKILLed (its parent left RUNNING, owned by a process that is
    # gone) and someone swapped the checkpoint of its killed run.
    import socket

    parent = run.data.tags["mlflow.parentRunId"]
    client.update_run(parent, status="RUNNING")
    client.set_tag(parent, "gatelab.owner", f"{socket.gethostname()}:{2 ** 22 + 7}:")
    client.set_terminated(run.info.run_id, "KILLED")
    marker = tmp_path / "payload-ran"
    _poisoned_checkpoint(ckpt, marker, like=torch.load(ckpt, weights_only=True))
    assert main(["grid", str(grid_file), "--quiet", "--cpu-threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: grid: {ckpt} refused: loading it would create posix.system")
    assert err.count("\n") == 1 and f"rm {ckpt}" in err, err
    # issue 40: the refused resume leaves no parent RUNNING for good
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FAILED"
    assert parent_run.data.tags["gatelab.failure"].startswith(f"resume refused: grid: {ckpt}")
    with pytest.raises(LabError, match="resume: .* refused: loading it would create posix.system"):
        train_run(plan(grid_from_dict(raw))[0].config, store, "poisoned",
                  run_id=run.info.run_id, quiet=True)
    assert not marker.exists()
    assert run_statuses(store, "poisoned") == {"baseline/lr=0.003/seed=0": ["KILLED"]}


# --- issue 26: a stop signal ends the command with 128 + its number, its runs KILLED -------------

def _runs_of(uri: str, experiment: str) -> list[tuple[str, str, dict]]:
    """(name, status, tags) of the experiment's active runs, read with sqlite3."""
    import sqlite3

    with sqlite3.connect(uri[len("sqlite:///"):], timeout=30) as db:
        runs = db.execute("SELECT r.run_uuid, r.name, r.status FROM runs r JOIN experiments e ON "
                          "r.experiment_id = e.experiment_id WHERE e.name = ? AND "
                          "r.lifecycle_stage = 'active'", (experiment,)).fetchall()
        return [(name, status, dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?",
                                                (run_id,)).fetchall()))
                for run_id, name, status in runs]


def _wait_until_training(uri: str, experiment: str, process, runs: int = 1,
                         timeout_s: float = 120.0) -> None:
    """Until `runs` RUNNING runs of the experiment have logged a training loss (their fits
    are under way)."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.is_alive(), f"exited with {process.exitcode} before training"
        try:
            with sqlite3.connect(uri[len("sqlite:///"):], timeout=30) as db:
                if db.execute("SELECT count(DISTINCT r.run_uuid) FROM runs r JOIN experiments e "
                              "ON r.experiment_id = e.experiment_id JOIN metrics m ON "
                              "m.run_uuid = r.run_uuid WHERE e.name = ? AND r.status = "
                              "'RUNNING' AND m.key = 'train/loss'",
                              (experiment,)).fetchone()[0] >= runs:
                    return
        except sqlite3.OperationalError:
            pass  # the store is being written
        time.sleep(0.1)
    raise AssertionError(f"no run of {experiment} trained within {timeout_s} s")


def _long_command(command: str, tmp_path: Path) -> list[str]:
    """`command` on the tiny model with a budget far beyond the test's patience."""
    import yaml

    tokens, small = 5e6, {"model.context": 32, "train.batch_size": 8, "train.log_every": 1}
    if command == "train":
        sets = [item for key, value in small.items() for item in ("--set", f"{key}={value}")]
        return ["train", "--data", "synthetic", "--tokens", str(tokens), "--experiment",
                "stopped", *sets]
    if command.startswith("grid"):
        workers = 2 if command == "grid-2-workers" else 1
        path = tmp_path / "stopped.yaml"
        path.write_text(yaml.safe_dump({**tiny_grid("stopped", ["baseline"], seeds=range(workers)),
                                        "tokens": tokens}))
        return ["grid", str(path), "--cpu-threads", "1", "--cpu-workers", str(workers)]
    path = tmp_path / "stopped-sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "stopped", "preset": "tiny", "data": "synthetic",
                                    "tokens": tokens, "variants": ["baseline"],
                                    "lr": {"ladder": [3e-3]}, "overrides": small}))
    return ["sweep", str(path), "--storage", str(tmp_path / "stopped.journal")]


@pytest.mark.slow
@pytest.mark.parametrize("command, signum", [
    (command, signum) for command in ("train", "grid", "sweep")
    for signum in (signal.SIGTERM, signal.SIGINT)] + [("grid-2-workers", signal.SIGTERM)])
def test_a_stop_signal_ends_the_command_with_128_plus_its_number_and_every_run_killed(
        store, tmp_path, command, signum):
    """What a scheduler (SIGTERM) or Ctrl-C (SIGINT) gets: exit code 143 or 130, the runs in
    training KILLED with the signal as their reason (in worker processes too: the grid
    passes the signal on), the grid's or sweep's parent KILLED too, nothing left RUNNING."""
    from gridkit import cli_process

    env = {k: os.environ[k] for k in ("GATELAB_STORE", "GATELAB_CACHE")}
    process = grid_processes().Process(target=cli_process,
                                       args=(_long_command(command, tmp_path) + ["--quiet"], env))
    process.start()
    try:
        _wait_until_training(store, "stopped", process, runs=2 if "workers" in command else 1)
        os.kill(process.pid, signum)
        process.join(timeout=60)
    finally:
        if process.is_alive():
            process.kill()
    assert process.exitcode == 128 + signum
    runs = _runs_of(store, "stopped")
    assert {status for _, status, _ in runs} == {"KILLED"}, runs
    trained = [tags for _, _, tags in runs if "config_hash" in tags]
    assert len(runs) == len(trained) + (command != "train"), runs
    assert len(trained) == (2 if command == "grid-2-workers" else 1), runs
    assert {tags["gatelab.killed_reason"] for tags in trained} == \
        {f"stopped by {signal.Signals(signum).name}"}


@pytest.mark.slow
def test_a_signal_inside_a_store_write_waits_for_its_commit_and_the_run_still_ends_killed(store):
    """Raised between an INSERT and its COMMIT, the interrupt would leave that SQLite write
    transaction open, and marking the run KILLED would wait out the 20 s busy timeout and
    fail, leaving it RUNNING. The signal is held until the connection is back in the pool."""
    from mlflow.tracking import MlflowClient
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from lab.config import resolve
    from lab.interrupts import Interrupted, stop_on_signals
    from lab.training.run import train_run

    def signal_inside_the_write(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO metrics") and "train/loss" in str(parameters):
            os.kill(os.getpid(), signal.SIGTERM)

    config = resolve("baseline", "tiny", {"model.context": 32, "train.batch_size": 8,
                     "train.log_every": 1}, data="synthetic", tokens=4096)
    event.listen(Engine, "after_cursor_execute", signal_inside_the_write)
    started = time.monotonic()
    try:
        with stop_on_signals(), pytest.raises(Interrupted, match="SIGTERM"):
            train_run(config, store, "in-a-write", quiet=True)
    finally:
        event.remove(Engine, "after_cursor_execute", signal_inside_the_write)
    assert time.monotonic() - started < 15
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("in-a-write").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["gatelab.killed_reason"] == "stopped by SIGTERM"


# --- issue 26: every failure after a run exists ends it FAILED, with the reason ---------------

def _tiny_config(tokens: int = 2048):
    from lab.config import resolve

    return resolve("baseline", "tiny", {"model.context": 32, "train.batch_size": 8,
                   "train.val_every": 4}, data="synthetic", tokens=tokens)


def _only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_an_error_after_the_run_exists_ends_it_failed_with_the_reason(store, monkeypatch):
    """Anything that raises once the run is RUNNING (here seeding, which the config check
    now keeps from seeing a bad seed) closes it FAILED, saying why."""
    from lab.training.run import train_run

    def broken_seeding(seed, workers=False, verbose=True):
        raise ValueError(f"Seed must be between 0 and 2**32 - 1, got {seed}")

    monkeypatch.setattr(L, "seed_everything", broken_seeding)
    with pytest.raises(ValueError):
        train_run(_tiny_config(), store, "seeding", quiet=True)
    run = _only_run(store, "seeding")
    assert run.info.status == "FAILED" and run.data.tags["gatelab.failure_kind"] == "error"
    assert run.data.tags["gatelab.failure"] == "ValueError: Seed must be between 0 and " \
        "2**32 - 1, got 0"


def test_a_full_disk_while_the_cell_run_is_created_ends_it_failed_not_running(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lab.experiments.grid.run import GridOptions, run_grid
    from lab.experiments.schema import grid_from_dict

    original = MlflowClient.log_text

    def full_disk(client, run_id, text, artifact_file):
        if artifact_file == "config.yaml":  # the cell's run exists, its record is half written
            raise OSError(errno.ENOSPC, "No space left on device", "mlruns/artifacts")
        return original(client, run_id, text, artifact_file)

    monkeypatch.setattr(MlflowClient, "log_text", full_disk)
    summary = run_grid(grid_from_dict(tiny_grid("full", ["baseline"])),
                       GridOptions(quiet=True, cpu_threads=1))
    assert [o.status for o in summary.outcomes] == ["FAILED"]
    assert summary.outcomes[0].failure.startswith("disk full writing mlruns/artifacts")
    assert run_statuses(store, "full") == {"baseline/lr=0.003/seed=0": ["FAILED"]}
    client = MlflowClient(store)
    cells = [r for r in client.search_runs([client.get_experiment_by_name("full").experiment_id])
             if r.data.tags.get("mlflow.parentRunId")]
    assert [r.data.tags["gatelab.failure_kind"] for r in cells] == ["disk_full"]


def test_a_partial_checkpoint_is_removed_after_a_failed_write_and_before_a_resume(store,
                                                                                monkeypatch):
    from mlflow.tracking import MlflowClient

    from lab.records import checkpoint_dir
    from lab.training.run import train_run

    original = L.Trainer.save_checkpoint

    def full_disk(self, filepath, weights_only=None, storage_options=None):
        Path(filepath).write_bytes(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_disk)
    with pytest.raises(OSError):
        train_run(_tiny_config(), store, "partial", quiet=True)
    run = _only_run(store, "partial")
    assert run.info.status == "FAILED" and run.data.tags["gatelab.failure_kind"] == "disk_full"
    assert list(checkpoint_dir(run.info.run_id).iterdir()) == []

    # A kill mid-write leaves last.tmp beside the checkpoint; the resumed run removes it.
    monkeypatch.setattr(L.Trainer, "save_checkpoint", original)
    done = train_run(_tiny_config(), store, "resumed", quiet=True)
    partial = checkpoint_dir(done.run_id) / "last.tmp"
    partial.write_bytes(b"the first bytes of a checkpoint")
    MlflowClient(store).set_terminated(done.run_id, "KILLED")
    again = train_run(_tiny_config(), store, "resumed", run_id=done.run_id, quiet=True)
    assert again.status == "FINISHED" and not partial.exists()
    assert (checkpoint_dir(done.run_id) / "last.ckpt").exists()


# --- issue 40: a stop signal in the first seconds, before any run exists --------------------

def _catches(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for `signum` (/proc/<pid>/status SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _command_process(argv: list[str], sigint_ignored: bool):
    """`python -m lab ARGV` as its own process; with `sigint_ignored`, started the way a
    non-interactive shell starts a background job (SIGINT inherited as SIG_IGN)."""
    import subprocess
    import sys

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "lab", *argv], env=env, text=True,
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=ignore_sigint if sigint_ignored else None)


@pytest.mark.slow
@pytest.mark.parametrize("signum, sigint_ignored", [
    (signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, False)])
def test_a_stop_signal_during_the_start_up_is_one_line_and_leaves_no_run(store, tmp_path, signum,
                                                                         sigint_ignored):
    """Sent as soon as the command has its handlers (within the first fraction of a second,
    while torch, Lightning and MLflow are still being imported): exit 128 + the number, one
    line that says no run was in progress, no traceback, no run; also when SIGINT was
    inherited ignored, where the signal used to be lost and the command trained to its end."""
    process = _command_process(["train", *_long_command("train", tmp_path)[1:], "--quiet"],
                               sigint_ignored)
    try:
        deadline = time.monotonic() + 30
        while not (_catches(process.pid, signal.SIGINT) and _catches(process.pid, signal.SIGTERM)):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.005)
        os.kill(process.pid, signum)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    assert err.splitlines() == [f"gatelab train: stopped by {name}; no run was in progress"], err
    assert _runs_of(store, "stopped") == []


@pytest.mark.slow
def test_sigint_inherited_ignored_still_stops_a_training_run_killed(store, tmp_path):
    """The background-job case once the run trains: SIGINT ends it KILLED, exit 130."""
    process = _command_process([*_long_command("train", tmp_path), "--quiet"], True)
    try:
        _wait_until_training(store, "stopped", type("Alive", (), {
            "is_alive": lambda self: process.poll() is None,
            "exitcode": property(lambda self: process.returncode)})())
        os.kill(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.splitlines() == ["gatelab train: stopped by SIGINT; its run is KILLED"], err
    [(_, status, tags)] = _runs_of(store, "stopped")
    assert status == "KILLED" and tags["gatelab.killed_reason"] == "stopped by SIGINT"


# --- issue 40: train and sweep end the runs a SIGKILL left RUNNING, as the grid does -----------

def _sigkill_while_training(store, argv: list[str]) -> None:
    """`gatelab ARGV` in a forked process, SIGKILLed once its run trains."""
    from gridkit import cli_process

    env = {k: os.environ[k] for k in ("GATELAB_STORE", "GATELAB_CACHE")}
    process = grid_processes().Process(target=cli_process, args=(argv + ["--quiet"], env))
    process.start()
    try:
        _wait_until_training(store, "stopped", process)
    finally:
        process.kill()
        process.join()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_rerun_ends_the_runs_a_sigkill_left_running(store, tmp_path, command):
    """A `train` or `sweep` SIGKILLed mid-run cannot close its run; the next command that
    makes runs in the experiment finds its owner gone and ends it KILLED, saying so (the
    sweep's rerun here uses a new storage, so that no trial of the old one points at the
    run: the run is found by its owner alone)."""
    from lab.cli import main

    _sigkill_while_training(store, _long_command(command, tmp_path))
    assert "RUNNING" in {status for _, status, _ in _runs_of(store, "stopped")}
    if command == "train":
        rerun = ["train", "--data", "synthetic", "--tokens", "2048", "--experiment", "stopped",
                 "--set", "model.context=32", "--set", "train.batch_size=8"]
        when = "another run of the experiment started"
    else:
        rerun = _long_command("sweep", tmp_path)
        rerun[rerun.index("--storage") + 1] = str(tmp_path / "other.journal")
        rerun += ["--set", "model.context=32", "--tokens", "2048"]
        when = "the sweep started again"
    assert main(rerun + ["--quiet"]) == 0
    runs = _runs_of(store, "stopped")
    assert "RUNNING" not in {status for _, status, _ in runs}, runs
    killed = [tags for _, status, tags in runs if status == "KILLED"]
    assert killed and all(tags["gatelab.killed_reason"].endswith(f"was gone when {when}")
                          for tags in killed), killed
