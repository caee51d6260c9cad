"""lab/records/runs.py: one run's record: its tags and params, the config it carries, the
commit it names, its heartbeat while it trains, and how it is closed (FINISHED, FAILED with
the reason, KILLED)."""

import errno
import signal
import threading
import time

import pytest
import torch
import yaml
from mlflow.artifacts import load_text
from mlflow.tracking import MlflowClient

from lab.config import flatten, from_dict, resolve
from lab.errors import LabError
from lab.interrupts import Interrupted
from lab.records.cells import HEARTBEAT_TAG
from lab.records.runs import (describe_failure, end_run, git_commit, heartbeat, log_params,
                              log_yaml, read_artifact_text, run_tags, start_run)


def test_run_tags_name_the_cell_and_its_identity():
    config = resolve("sdpa_headwise_sigmoid_mul", "tiny", data="synthetic", seed=3, lr=2.5e-3)
    tags = run_tags(config)
    assert tags == {"variant": "sdpa_headwise_sigmoid_mul", "seed": "3", "preset": "tiny",
                    "lr": "0.0025", "config_hash": config.hash(), "git_commit": tags["git_commit"],
                    "data": "synthetic"}
    assert tags["git_commit"]


def test_start_run_records_a_running_run_with_its_config(store):
    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", data="synthetic", seed=2)
    client = MlflowClient(store)
    parent = client.create_run(client.create_experiment("parents")).info.run_id
    run_id = start_run(config, store, "start-run", parent_run_id=parent,
                       extra_tags={"gatelab.grid": "g"})
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert client.get_experiment(run.info.experiment_id).name == "start-run"
    assert run.data.tags["mlflow.runName"] == "sdpa_elementwise_sigmoid_mul/lr=0.003/seed=2"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["gatelab.grid"] == "g"
    assert {k: run.data.tags[k] for k in run_tags(config)} == run_tags(config)
    # Every config field is a param, flattened; MLflow stores them as strings.
    assert run.data.params == {k: str(v) for k, v in flatten(config.to_dict()).items()}
    assert run.data.params["model.gate.position"] == "sdpa"
    # The config artifact reads back into the same config.
    assert from_dict(yaml.safe_load(load_text(f"{run.info.artifact_uri}/config.yaml"))) == config

    named = start_run(config, store, "start-run", run_name="mine")
    assert client.get_run(named).data.tags["mlflow.runName"] == "mine"
    assert "mlflow.parentRunId" not in client.get_run(named).data.tags


def test_the_commit_tag_is_the_override_when_set_and_git_head_otherwise(monkeypatch):
    # A lent machine's copy of the tree can carry a stale .git (docs/results-2026-11.md)
    monkeypatch.delenv("GATELAB_GIT_COMMIT", raising=False)
    head = git_commit()
    assert head and head != "unknown"  # the suite runs in a checkout
    monkeypatch.setenv("GATELAB_GIT_COMMIT", "abc1234")
    assert git_commit() == "abc1234"


def test_more_params_than_one_request_takes_are_all_recorded_and_long_values_are_cut(store):
    """log_params hands MLflow all of them at once (its client splits them into requests of
    100); a value past MLflow's 6000 characters is cut, not refused."""
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("params")).info.run_id
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 7000}
    log_params(client, run_id, params)
    recorded = client.get_run(run_id).data.params
    assert recorded == {k: str(v) for k, v in params.items()} | {"long": "x" * 6000}


def test_a_yaml_artifact_keeps_its_key_order_and_reads_back_safely(store):
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("yaml"))
    log_yaml(client, run.info.run_id, {"name": "lr", "variants": ("b", "a"), "seeds": [0]},
             "sweep.yaml")
    text = load_text(f"{run.info.artifact_uri}/sweep.yaml")
    assert text == "name: lr\nvariants:\n- b\n- a\nseeds:\n- 0\n"
    assert yaml.safe_load(text) == {"name": "lr", "variants": ["b", "a"], "seeds": [0]}


def test_an_artifact_reads_back_as_text_or_none_when_the_run_has_none(store):
    """What the report reads (a parent's grid.yaml, a run's layer table, loss histories):
    the file's text, at the top or in a folder; None for a file the run never logged."""
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("texts")).info.run_id
    log_yaml(client, run_id, {"name": "g"}, "grid.yaml")
    client.log_text(run_id, '{"a": 1}', "analysis/layers.json")
    assert read_artifact_text(client, run_id, "grid.yaml") == "name: g\n"
    assert read_artifact_text(client, run_id, "analysis/layers.json") == '{"a": 1}'
    assert read_artifact_text(client, run_id, "sweep.yaml") is None
    assert read_artifact_text(client, run_id, "analysis/other.json") is None
    assert read_artifact_text(client, run_id, "nowhere/x.json") is None


class Pruned(Exception):
    """Stands for the sweep's pruning: an exception train_run is told ends a run KILLED."""


def _disk_full() -> BaseException:
    """A full disk met under another error, as a store write raises it."""
    err = RuntimeError("while logging")
    err.__cause__ = OSError(errno.ENOSPC, "No space left on device", "mlruns/artifacts")
    return err


@pytest.mark.parametrize("make_error, kind, message", [
    (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom",
     "CUDA out of memory with 16 sequences x 128 tokens per micro-batch: use a smaller "
     "micro-batch with gradient accumulation, e.g. --set train.micro_batch_size=8"),
    (_disk_full, "disk_full", "disk full writing mlruns/artifacts: free space for the store"),
    (lambda: LabError("data: no such corpus"), "config", "data: no such corpus"),
    (lambda: ValueError("bad\nsecond line"), "error", "ValueError: bad"),
])
def test_a_failure_is_described_by_its_kind_in_one_line(make_error, kind, message):
    config = resolve("baseline", "tiny", {"train.batch_size": 16})
    described_kind, described = describe_failure(make_error(), config)
    assert described_kind == kind and described.startswith(message) and "\n" not in described


@pytest.mark.parametrize("err, status, tags", [
    (None, "FINISHED", {}),
    (RuntimeError("boom"), "FAILED",
     {"gatelab.failure_kind": "error", "gatelab.failure": "RuntimeError: boom"}),
    (Interrupted(signal.SIGTERM), "KILLED", {"gatelab.killed_reason": "stopped by SIGTERM"}),
    (Pruned("trial 3 pruned at step 40"), "KILLED",
     {"gatelab.killed_reason": "Pruned: trial 3 pruned at step 40"}),
])
def test_end_run_closes_the_run_and_says_why(store, err, status, tags):
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("ends")).info.run_id
    assert end_run(client, run_id, resolve("baseline", "tiny"), err, stopped_by=(Pruned,)) == status
    run = client.get_run(run_id)
    assert run.info.status == status
    assert {k: v for k, v in run.data.tags.items() if k.startswith("gatelab.")} == tags


class BeatRecorder:
    """Stands in for MlflowClient.set_tag; its first call fails as a store that is briefly
    unreachable does."""

    def __init__(self):
        self.beats: list[tuple[str, str, str]] = []

    def set_tag(self, run_id, key, value):
        self.beats.append((run_id, key, value))
        if len(self.beats) == 1:
            raise ConnectionError("store unreachable")


def test_the_heartbeat_refreshes_its_tag_while_the_run_trains_and_stops_after():
    recorder = BeatRecorder()
    started = int(time.time())
    with heartbeat(recorder, "run-1", every_s=0.02):
        time.sleep(0.3)
    time.sleep(0.05)  # a beat already past its wait when the block ended lands now
    count = len(recorder.beats)
    assert count >= 3  # the failed first beat did not end the thread
    assert {(run, key) for run, key, _ in recorder.beats} == {("run-1", HEARTBEAT_TAG)}
    assert all(int(value) >= started for _, _, value in recorder.beats)
    time.sleep(0.1)
    assert len(recorder.beats) == count


def test_runs_starting_together_on_one_corpus_each_get_it_as_their_input(store, tmp_path):
    """Grid workers start their cells at once: MLflow's check-then-insert of the
    experiment's dataset row races, and the loser's UNIQUE error is retried (log_corpus)."""
    from lab.data.store import prepare_synthetic
    from lab.records import experiment_id, log_corpus

    corpus = prepare_synthetic(512, 60_000, 3, root=tmp_path)
    client = MlflowClient(store)
    experiment = experiment_id(client, "together", store)
    run_ids = [client.create_run(experiment).info.run_id for _ in range(6)]
    start = threading.Barrier(len(run_ids))
    errors = []

    def log(run_id):
        start.wait()
        try:
            log_corpus(MlflowClient(store), run_id, corpus)
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for run_id in run_ids:
        (given,) = client.get_run(run_id).inputs.dataset_inputs
        assert given.dataset.digest == corpus.fingerprint


def test_a_dataset_input_refused_once_is_logged_on_the_next_attempt(store, tmp_path):
    from mlflow.exceptions import MlflowException

    from lab.data.store import prepare_synthetic
    from lab.records import experiment_id, log_corpus

    corpus = prepare_synthetic(512, 60_000, 3, root=tmp_path)
    client = MlflowClient(store)
    run_id = client.create_run(experiment_id(client, "retry", store)).info.run_id
    calls = []

    class RefusesOnce:
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            if len(calls) == 1:
                raise MlflowException("UNIQUE constraint failed: datasets.experiment_id, ...")
            client.log_inputs(run_id, datasets=datasets)

    log_corpus(RefusesOnce(), run_id, corpus)
    assert len(calls) == 2 and len(client.get_run(run_id).inputs.dataset_inputs) == 1
