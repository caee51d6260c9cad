"""lab/training/run.py: one run end to end. What other tests leave out: the device and data
checks before a run is recorded, the run summary and its final status, and the one-line result.

The run's record (tags, params, config artifact) is tests/unit/test_records_runs.py's, checkpoint
reading tests/unit/test_records_checkpoints.py's; parameter counts (`count_params`) are checked
against the paper's formulas in tests/unit/test_model.py and tests/unit/test_moe.py."""

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lab import records
from lab.config import resolve
from lab.errors import LabError
from lab.model.params import count_params
from lab.training.preflight import check_devices, preflight
from lab.training.corpus import open_data
from lab.training.run import (RunResult, describe, throughput_summary, to_json,
                              train_run)

# 16 optimizer steps of 8 windows of 32 tokens, validation every 4; no end-of-run analysis,
# which tests/unit/test_analysis.py covers and which would triple the run's time.
FAST = {"model.context": 32, "train.batch_size": 8, "train.val_every": 4, "train.val_batches": 2,
        "train.log_every": 2, "train.analysis_windows": 0, "train.long_context_factors": ""}
STEPS, TOKENS_PER_STEP = 16, 8 * 32


def fast_config(variant="baseline", seed=0, **overrides):
    return resolve(variant, "tiny", {**FAST, **overrides}, data="synthetic",
                   tokens=STEPS * TOKENS_PER_STEP, seed=seed)


def visible_gpus(monkeypatch, visible: int):
    """torch sees `visible` CUDA devices (none: a CPU machine), whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)


def artifact(run, name: str):
    """A run's YAML or JSON artifact, read back through MLflow (YAML reads both)."""
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/{name}",
                                                   dst_path=folder)
        return yaml.safe_load(Path(path).read_text())


# --- before anything is recorded -------------------------------------------------------

def test_devices_beyond_the_visible_gpus_are_refused_with_the_allowed_range(monkeypatch):
    visible_gpus(monkeypatch, 0)
    check_devices(1)  # a CPU run is one process
    with pytest.raises(LabError, match=r"^train\.devices: 2 devices per run, but no CUDA device "
                                       r"is visible \(a CPU run uses 1\); allowed: 1\.\.1$"):
        check_devices(2)
    visible_gpus(monkeypatch, 2)
    check_devices(2)
    with pytest.raises(LabError, match=r"^train\.devices: 3 devices per run, but 2 CUDA "
                                       r"device\(s\) are visible; allowed: 1\.\.2$"):
        check_devices(3)


def test_preflight_checks_the_devices_and_the_loss_kernel_on_the_device_it_is_given(monkeypatch):
    """lab/training/preflight.py: train, check and bench call it before anything is recorded."""
    visible_gpus(monkeypatch, 0)
    preflight(resolve("baseline", "tiny"), "cpu")
    with pytest.raises(LabError, match=r"^train\.devices: 2 devices per run, but no CUDA"):
        preflight(resolve("baseline", "tiny", {"train.devices": 2}), "cpu")
    liger = resolve("baseline", "tiny", {"train.fused_loss": "liger"})
    with pytest.raises(LabError, match=r"^train\.fused_loss=liger: .* needs a CUDA GPU"):
        preflight(liger, "cpu")
    visible_gpus(monkeypatch, 2)
    preflight(resolve("baseline", "tiny", {"train.devices": 2}), "cuda")


def test_train_run_refuses_a_kernel_this_machine_cannot_run_before_any_record(store, monkeypatch):  # noqa: F811
    visible_gpus(monkeypatch, 0)
    config = resolve("baseline", "tiny", {"train.fused_loss": "liger"}, data="synthetic")
    with pytest.raises(LabError, match=r"^train\.fused_loss=liger"):
        train_run(config, store, quiet=True)
    client = MlflowClient(store)
    assert [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])] == []


def test_a_run_checks_the_devices_before_it_opens_any_data(monkeypatch, store):
    """preflight comes first (train_run, and the grid and sweep before their first cell or
    trial): a run that cannot get its GPUs says so, not that its corpus is missing."""
    visible_gpus(monkeypatch, 0)
    config = resolve("baseline", "tiny", {"train.devices": 2}, data="no/such/corpus")
    with pytest.raises(LabError, match=r"^train\.devices: 2 devices"):
        train_run(config, store, quiet=True)


def test_open_data_gives_the_model_the_vocabulary_of_the_tokens(store):
    config = resolve("baseline", "tiny", {"data.vocab_size": 600}, data="synthetic")
    assert config.model.vocab_size == 512  # the preset's, until the tokens are known
    token_store, opened = open_data(config)
    assert token_store.vocab_size == 600 == opened.model.vocab_size
    assert opened.data == config.data and opened.train == config.train


def test_open_data_refuses_a_split_shorter_than_one_micro_batch(store):
    # The synthetic corpus's valid split has 100,000 tokens; 16 windows of 8,193 need more.
    config = resolve("baseline", "tiny", {"model.context": 8192}, data="synthetic",
                     tokens=16 * 8192)
    with pytest.raises(LabError, match=r"^data: the valid split of .* has 100,000 tokens, fewer "
                                       r"than one micro-batch \(16 windows of 8193 = 131,088\)"):
        open_data(config)


# --- the run summary -------------------------------------------------------------------

def monitor(rate=None, first_step_s=None, flops_per_token=None, peak_tflops=None):
    return SimpleNamespace(steady_tokens_per_s=lambda: rate, first_step_s=first_step_s,
                           flops_per_token=flops_per_token, peak_tflops=peak_tflops,
                           tokens_per_step=1000, mfu=lambda r: r * flops_per_token / 1e12 / peak_tflops)


def test_throughput_summary_reports_only_what_was_measured(monkeypatch):
    visible_gpus(monkeypatch, 0)
    plain = fast_config()
    assert throughput_summary(monitor(), plain) == {}
    assert throughput_summary(monitor(first_step_s=2.0), plain) == {"time/first_step_s": 2.0}
    assert throughput_summary(monitor(rate=500.0), plain) == \
        {"throughput/tokens_per_s_mean": 500.0}  # no peak known: no MFU
    measured = throughput_summary(monitor(rate=500.0, first_step_s=2.0, flops_per_token=6e9,
                                          peak_tflops=10.0), plain)
    assert measured == {"throughput/tokens_per_s_mean": 500.0, "throughput/mfu": 0.3,
                        "time/first_step_s": 2.0}
    # With compilation, the first step's excess over a steady one (1000 tokens at 500/s) is
    # the compile time, and never negative.
    compiled = fast_config(**{"train.compile": True})
    assert throughput_summary(monitor(rate=500.0, first_step_s=2.5), compiled)["time/compile_s"] \
        == pytest.approx(0.5)
    assert throughput_summary(monitor(rate=500.0, first_step_s=1.0), compiled)["time/compile_s"] == 0


def test_a_finished_run_records_its_summary_parameters_and_histories(store):
    config = fast_config("sdpa_elementwise_sigmoid_mul", **{"train.warmup_fraction": 0.25})
    result = train_run(config, store, "summary", quiet=True)
    assert result.status == "FINISHED" and result.diverged_step is None
    m = result.metrics
    assert m["tokens/seen"] == STEPS * TOKENS_PER_STEP
    assert m["val/best_loss"] <= m["val/final_loss"]
    assert m["val/ppl"] == pytest.approx(torch.tensor(m["val/final_loss"]).exp().item(), rel=1e-4)
    assert m["time/wall_s"] > 0

    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "false"
    counts = count_params(config)
    assert {k: run.data.metrics[f"params/{k}"] for k in counts} == counts
    for name in ("tokens/seen", "val/ppl", "test/ppl", "spikes/count", "train/grad_norm_max"):
        assert run.data.metrics[name] == pytest.approx(m[name])
    spikes = artifact(run, "spikes.json")
    assert m["spikes/count"] == len(spikes)
    assert m["spikes/max_excess"] == max((s["max_excess"] for s in spikes), default=0.0)
    history = artifact(run, "loss_history.json")
    assert history["step"] == list(range(1, STEPS + 1))  # one loss per optimizer step
    assert len(history["loss"]) == len(history["grad_norm"]) == STEPS
    assert m["train/grad_norm_max"] == max(history["grad_norm"])
    # after the warmup's int(0.25 x 16) = 4 steps (steps count from 1)
    assert run.data.metrics["train/grad_norm_max_after_warmup"] == pytest.approx(
        max(history["grad_norm"][4:]))
    assert describe(result) == (f"run {result.run_id}: val/ppl {m['val/ppl']:.3f}, test/ppl "
                                f"{m['test/ppl']:.3f}, 4,096 tokens in {m['time/wall_s']:.0f} s")
    # Its corpus as its dataset input, the corpus's fingerprint as the digest.
    (corpus,) = run.inputs.dataset_inputs
    store_used, _ = open_data(config)
    assert corpus.dataset.digest == store_used.fingerprint
    assert corpus.dataset.name == store_used.path.name
    assert json.loads(corpus.dataset.source)["uri"] == str(store_used.path.resolve())
    assert {t.key: t.value for t in corpus.tags} == {"mlflow.data.context": "train"}
    # A CPU run samples no system metrics unless asked (system_metrics_enabled).
    assert not [name for name in run.data.metrics if name.startswith("system/")]


def test_system_metrics_are_on_for_gpu_runs_and_mlflows_switch_decides_where_set(monkeypatch):
    # set, then removed: monkeypatch restores the variable after the test whatever MLflow's
    # own switches below write into the environment
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")
    visible_gpus(monkeypatch, 0)
    assert not records.system_metrics_enabled()
    visible_gpus(monkeypatch, 1)
    assert records.system_metrics_enabled()
    mlflow.disable_system_metrics_logging()  # MLflow's own switch, through the environment
    assert not records.system_metrics_enabled()
    visible_gpus(monkeypatch, 0)
    mlflow.enable_system_metrics_logging()
    assert records.system_metrics_enabled()


def test_a_run_with_system_metrics_on_samples_them_while_it_trains(store, monkeypatch):
    """On a CPU (what a test can run) MLflow's monitor samples the CPU, memory and disk; on a
    GPU the same monitor adds system/gpu_0_... through NVML."""
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setattr(records.runs, "SYSTEM_METRICS_INTERVAL_S", 0.05)
    slow = SlowSteps(0.02)  # a run long enough for several samples
    result = train_run(fast_config(), store, "system", quiet=True, callbacks=[slow])
    client = MlflowClient(store)
    history = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 3
    assert [m.step for m in history] == list(range(len(history)))
    assert "system/system_memory_usage_megabytes" in client.get_run(result.run_id).data.metrics


def test_without_psutil_a_run_trains_without_system_metrics_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    # as where MLflow's monitor cannot be imported (its CPU monitor needs psutil)
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    with records.system_metrics("run-1", "sqlite:///unused.db", resumed=False):
        pass
    err = capsys.readouterr().err
    assert err.startswith("warning: no system metrics for run run-1") and "psutil" in err


def test_a_workers_system_metrics_cover_its_own_gpus_only(monkeypatch):
    """NVML lists the host's GPUs whatever CUDA_VISIBLE_DEVICES says; the monitor keeps the
    ones torch sees here (by UUID), in torch's order, and all of them where none matches."""
    from lab.records import runs

    import pynvml

    host = {f"nvml-{i}": f"GPU-uuid-{i}" for i in range(4)}   # NVML handle -> its UUID
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda handle: host[handle])
    visible_gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(uuid=["uuid-2", "uuid-1"][i]))
    monitor = SimpleNamespace(gpu_handles=list(host), num_gpus=4)
    runs._keep_visible_gpus(monitor)
    assert monitor.gpu_handles == ["nvml-2", "nvml-1"] and monitor.num_gpus == 2
    other_host = SimpleNamespace(gpu_handles=["nvml-0"], num_gpus=1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda handle: "GPU-elsewhere")
    runs._keep_visible_gpus(other_host)
    assert other_host.gpu_handles == ["nvml-0"] and other_host.num_gpus == 1


class SlowSteps(L.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class StopAt(L.Callback):
    """Raises `error` after optimizer step `step`, as Ctrl-C or a crash would there."""

    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.error


def test_a_crash_marks_the_run_failed_and_passes_the_error_on(store):
    with pytest.raises(RuntimeError, match="boom"):
        train_run(fast_config(), store, "crash", quiet=True,
                  callbacks=[StopAt(3, RuntimeError("boom"))])
    (run,) = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("crash").experiment_id])
    assert run.info.status == "FAILED"


def test_an_interrupted_run_is_killed_and_continues_from_its_checkpoint(store):
    config = fast_config(**{"train.checkpoint_every": 2})
    started = []
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning makes Ctrl-C an exit
        train_run(config, store, "interrupted", quiet=True, on_start=started.append,
                  callbacks=[StopAt(5, KeyboardInterrupt())])
    client = MlflowClient(store)
    assert client.get_run(started[0]).info.status == "KILLED"

    result = train_run(config, store, "interrupted", run_id=started[0], quiet=True)
    assert result.run_id == started[0] and result.status == "FINISHED"
    experiment = client.get_experiment_by_name("interrupted").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [started[0]]
    # The loss history is whole: the steps before the checkpoint come back with it, the
    # steps after it were trained again, none twice.
    history = artifact(client.get_run(started[0]), "loss_history.json")
    assert history["step"] == list(range(1, STEPS + 1))
    assert result.metrics["tokens/seen"] == STEPS * TOKENS_PER_STEP
    # The corpus logged again on resume is still one input (MLflow keeps one per dataset).
    assert len(client.get_run(started[0]).inputs.dataset_inputs) == 1


# --- the one-line result ---------------------------------------------------------------

def test_interval_metrics_are_written_in_the_background_and_waited_for(store, monkeypatch):
    """The training loop does not wait for the store (RunLogger.log_metrics_in_background):
    with the store's write held back, the call returns and nothing is in the store yet;
    wait_for_writes returns once the write is in."""
    import threading

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from lab import records
    from lab.training.run import lightning_logger

    release, original = threading.Event(), SqlAlchemyStore.log_batch

    def held(self, *args, **kwargs):
        assert release.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", held)  # before the store is built
    client = records.client(store)
    run_id = client.create_run(client.create_experiment("background")).info.run_id
    logger = lightning_logger(store, run_id)
    logger.log_metrics_in_background({"train/loss": 1.5, "lr": 0.001}, step=10)
    assert client.get_metric_history(run_id, "train/loss") == []  # returned, write still held
    release.set()
    logger.wait_for_writes()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 1.5)]
    assert logger._writes == []


def test_the_end_of_training_stops_mlflows_writer_so_closing_the_run_does_not_wait(store):
    """Closing a run stops MLflow's async-logging thread, which first sleeps out its queue's
    1-s poll; RunLogger.end_background_writes (the end of training) waits for the writes and
    has that thread stopped in the background, so the close, after the final evaluation and
    the analysis, finds it stopped. With the code before, the queue was still running at the
    close (0.6-0.9 s a cell). A later background write starts it again."""
    from lab import records
    from lab.training.run import lightning_logger

    client = records.client(store)
    run_id = client.create_run(client.create_experiment("stop-writer")).info.run_id
    logger = lightning_logger(store, run_id)
    queue = logger.experiment._tracking_client.store._async_logging_queue
    logger.log_metrics_in_background({"train/loss": 1.5}, step=10)
    assert queue.is_active()
    stopping = logger.end_background_writes()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 1.5)]
    stopping.join(10)
    assert not stopping.is_alive() and queue.is_idle()  # set_terminated has nothing to wait for
    logger.log_metrics_in_background({"train/loss": 1.25}, step=20)
    assert queue.is_active()
    logger.wait_for_writes()
    client.set_terminated(run_id, "FINISHED")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_describe_and_to_json_of_a_diverged_run():
    result = RunResult("abc123", "FINISHED", {"diverged/step": 6.0}, diverged_step=6)
    assert describe(result) == "run abc123: diverged at step 6"
    assert json.loads(to_json(result)) == {"run_id": "abc123", "status": "FINISHED",
                                           "metrics": {"diverged/step": 6.0}, "diverged_step": 6}


def test_a_compiled_runs_other_ranks_inherit_the_labs_inductor_cache(store, monkeypatch):
    """Lightning starts a DDP run's other ranks as `fit` begins, before the model compiles
    (when this rank would name the lab's Inductor folder); they inherit this process's
    environment, where importing Lightning set torch's temporary folder, and cannot tell who
    set it (lab/__init__.py INDUCTOR_CACHE_GIVEN): `gatelab train` on 2 GPUs compiled rank 1
    into torch's folder. The lab's folder is named before `fit`."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    import lab
    from lab.data.store import cache_root
    from lab.training import step

    monkeypatch.setattr(lab, "INDUCTOR_CACHE_GIVEN", False)
    monkeypatch.setenv(step.COMPILE_CACHE_ENV, default_cache_dir())
    at_fit = []

    class Stop(Exception):
        pass

    def fit(self, *args, **kwargs):
        at_fit.append(os.environ[step.COMPILE_CACHE_ENV])
        raise Stop

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with pytest.raises(Stop):
        train_run(fast_config(**{"train.compile": "true"}), store, quiet=True)
    assert at_fit == [str(cache_root() / "inductor")]
