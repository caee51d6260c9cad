"""One run's record in MLflow: its name, tags, params, metrics and artifacts, how it is
created (RUNNING, with its config) and how it is closed, saying why.

A run ends FINISHED (a diverged run is FINISHED with the tag `diverged`), FAILED with
`gatelab.failure_kind` and `gatelab.failure` for any error, or KILLED with
`gatelab.killed_reason` for a stop signal (end_run), so no run is left RUNNING by a live
process.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from lab.config import RunConfig, flatten
from lab.data.store import TokenStore, cache_root
from lab.errors import LabError
from lab.interrupts import interruption, note_killed
from lab.records.cells import (CONFIG_HASH_TAG, DATA_TAG, FAILURE_KIND_TAG, FAILURE_TAG,
                               GIT_COMMIT_TAG, HEARTBEAT_TAG, KILLED_REASON_TAG, LR_TAG,
                               PRESET_TAG, SEED_TAG, VARIANT_TAG, cell_name, format_lr)
from lab.records.lookup import experiment_id
from lab.records.store import client, store_dir

# How often a run's heartbeat tag is refreshed while it trains (lab/records/owners.py
# owner_alive: how another host tells it is alive).
HEARTBEAT_S = 60.0


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@contextmanager
def heartbeat(mlflow_client, run_id: str, every_s: float = HEARTBEAT_S):
    """Refresh the run's heartbeat tag while it trains (how other hosts tell it is alive)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            try:
                mlflow_client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:
                pass  # a missed beat only makes the run look older

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


# System metrics (MLflow's `system/...`: GPU utilisation, memory and power through NVML,
# CPU, memory, disk, network) every SYSTEM_METRICS_INTERVAL_S while a run trains: a
# minute-long cell gets about 30 samples where MLflow's default of 10 s gave 6.
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides the interval (MLflow reads it).
SYSTEM_METRICS_INTERVAL_S = 2.0


def system_metrics_enabled() -> bool:
    """On for runs on a GPU, off on a CPU (where its sampling thread would share the few
    cores with training); MLflow's own switch, MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING (what
    mlflow.enable_system_metrics_logging() sets), decides where it is set."""
    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set():
        return MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get()
    return torch.cuda.is_available()


@contextmanager
def system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's SystemMetricsMonitor on the run while it trains (system_metrics_enabled), as
    `mlflow.start_run(log_system_metrics=True)` starts it for a fluent run; a resumed run
    continues its steps. The monitor stops by itself once the run is no longer RUNNING."""
    if not system_metrics_enabled():
        yield
        return
    try:
        # Imported here: psutil (MLflow's CPU monitor) and nvidia-ml-py are pinned, but a
        # lent GPU machine's environment is assembled by hand (docs/reproduce_gpu.sh carries
        # wheels); without them the run trains all the same, without system metrics.
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as err:
        print(f"warning: no system metrics for run {run_id}: {err} (pip install "
              "psutil nvidia-ml-py, pinned in pyproject.toml)", file=sys.stderr)
        yield
        return
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                   resume_logging=resumed, tracking_uri=uri)
    for gpu_monitor in (m for m in monitor.monitors if isinstance(m, GPUMonitor)):
        _keep_visible_gpus(gpu_monitor)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _keep_visible_gpus(gpu_monitor) -> None:
    """NVML sees every GPU of the host, whatever CUDA_VISIBLE_DEVICES says: a grid worker
    pinned to one GPU would log all eight. Keep the GPUs this process uses (matched by UUID,
    `system/gpu_0_...` being its first), or all of them where the match fails."""
    import pynvml  # there is a GPUMonitor, so it is installed (system_metrics)
    try:
        wanted = [str(torch.cuda.get_device_properties(i).uuid)
                  for i in range(torch.cuda.device_count())]
        handles = {pynvml.nvmlDeviceGetUUID(h).removeprefix("GPU-"): h
                   for h in gpu_monitor.gpu_handles}
        mine = [handles[uuid] for uuid in wanted if uuid in handles]
    except Exception:
        return
    if mine:
        gpu_monitor.gpu_handles, gpu_monitor.num_gpus = mine, len(mine)


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics MLflow can store: NaN, infinities and None left out."""
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """The finite ones in one log_batch call (MLflow splits it into batches it accepts)."""
    stamp = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, stamp, step)
                                             for k, v in finite_metrics(metrics).items()])


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


def read_artifact_text(mlflow_client, run_id: str, artifact_file: str) -> str | None:
    """The text of one of the run's artifacts, None when the run has no such file (a run
    made before it was logged); a file that is there but cannot be read raises."""
    folder = artifact_file.rpartition("/")[0] or None
    if artifact_file not in {a.path for a in mlflow_client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(mlflow_client.download_artifacts(run_id, artifact_file, tmp)).read_text()


def log_yaml(mlflow_client, run_id: str, data, artifact_file: str) -> None:
    """`data` as a YAML artifact of the run, in its own key order (what config.yaml, grid.yaml
    and sweep.yaml are). Not MlflowClient.log_dict, which writes YAML with PyYAML's full
    dumper and sorted keys: a tuple (a sweep's variants) would become `!!python/tuple`, which
    yaml.safe_load refuses. JSON artifacts go through log_dict itself."""
    mlflow_client.log_text(run_id, yaml.safe_dump(data, sort_keys=False), artifact_file)


LOG_INPUT_ATTEMPTS = 4


def log_corpus(mlflow_client, run_id: str, store: TokenStore) -> None:
    """The run's corpus as its MLflow dataset input (context `train`): named after the
    corpus's folder, its source that folder, its digest the corpus's fingerprint
    (TokenStore.fingerprint), so the UI's dataset column and filter tell runs on different
    corpora apart. MLflow keeps one input per dataset and run (SqlAlchemyStore.log_inputs
    skips one it holds), so a resumed run logging it again adds nothing."""
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-path source twice and warns that the path "can be
        # interpreted in multiple ways" (dataset_source_registry.py), both being the same class.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(store.path.resolve()))
    dataset = MetaDataset(source, name=store.path.name, digest=store.fingerprint)
    # MlflowClient.log_inputs wants the entity; mlflow.log_input makes it the same way.
    inputs = [DatasetInput(dataset._to_mlflow_entity(),
                           tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train")])]
    # MLflow looks for the experiment's dataset row and inserts it when missing, in two
    # steps (SqlAlchemyStore._log_inputs_impl): two grid workers starting on one corpus at
    # once both insert, and the second fails on the UNIQUE (experiment, name, digest)
    # constraint. Again, it finds the row.
    for attempt in range(LOG_INPUT_ATTEMPTS):
        try:
            mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException:
            if attempt == LOG_INPUT_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def log_params(mlflow_client, run_id: str, params: dict) -> None:
    """Every param in one log_batch call: MlflowClient.log_batch splits params into requests
    of MLflow's limit itself (100 each, MAX_PARAMS_TAGS_PER_BATCH; TrackingServiceClient.
    log_batch in mlflow/tracking/_tracking_service/client.py), for every store. Values are
    cut to MLflow's MAX_PARAM_VAL_LENGTH here, silently, where MLflow would warn once per
    long value."""
    mlflow_client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_VAL_LENGTH])
                                            for k, v in params.items()])


def run_tags(config: RunConfig) -> dict[str, str]:
    return {VARIANT_TAG: config.variant, SEED_TAG: str(config.train.seed),
            PRESET_TAG: config.preset, LR_TAG: format_lr(config.train.lr),
            CONFIG_HASH_TAG: config.hash(), GIT_COMMIT_TAG: git_commit(),
            DATA_TAG: config.data.source}


def start_run(config: RunConfig, uri: str, experiment: str, run_name: str | None = None,
              parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Create the MLflow run for `config` (RUNNING) with its params, tags and config artifact."""
    mlflow_client = client(uri)
    tags = run_tags(config)
    tags[MLFLOW_RUN_NAME] = run_name or cell_name(config.variant, config.train.lr, config.train.seed)
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    tags.update(extra_tags or {})
    run = mlflow_client.create_run(experiment_id(mlflow_client, experiment, uri), tags=tags)
    run_id = run.info.run_id
    try:
        log_params(mlflow_client, run_id, flatten(config.to_dict()))
        log_yaml(mlflow_client, run_id, config.to_dict(), "config.yaml")
    except BaseException as err:  # e.g. a full disk: the run exists, so it is closed FAILED
        end_run(mlflow_client, run_id, config, err)
        raise
    return run_id


def describe_failure(err: BaseException, config: RunConfig) -> tuple[str, str]:
    """(kind, one-line message) for a failed run: out of memory, disk full, bad input, error."""
    chain = list(_caused_by(err))
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, torch.OutOfMemoryError) for e in chain) or "out of memory" in text.lower():
        t = config.train
        smaller = max(1, t.micro_batch // 2)
        return "oom", (f"CUDA out of memory with {t.micro_batch} sequences x {config.model.context} "
                       f"tokens per micro-batch: use a smaller micro-batch with gradient "
                       f"accumulation, e.g. --set train.micro_batch_size={smaller} (the batch of "
                       f"{t.batch_size} sequences and the results stay the same)")
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) or \
            "no space left on device" in text.lower() or "database or disk is full" in text:
        where = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
        return "disk_full", (f"disk full{f' writing {where}' if where else ''}: free space for "
                             f"the store ({store_dir()}) and the cache ({cache_root()}), "
                             "then rerun; finished runs are kept")
    if isinstance(err, LabError):
        return "config", str(err)
    message = str(err).splitlines()[0] if str(err) else ""
    return "error", f"{type(err).__name__}: {message}"


def _caused_by(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def end_run(mlflow_client, run_id: str, config: RunConfig, err: BaseException | None,
            stopped_by: tuple[type[BaseException], ...] = ()) -> str:
    """Close the run and say why: FINISHED without `err`; KILLED for a stop signal (its name
    as `gatelab.killed_reason`) or an exception of `stopped_by` (its message); FAILED for
    anything else, with `gatelab.failure_kind` and `gatelab.failure` (describe_failure).
    With `err`, nothing here raises: on a full disk the store may refuse these writes too,
    and the run is then left to the next grid's reconcile (its owner is gone). Returns the
    status."""
    if err is None:
        mlflow_client.set_terminated(run_id, "FINISHED")
        return "FINISHED"
    interrupt = interruption(err)
    status = "KILLED" if interrupt is not None or isinstance(err, stopped_by) else "FAILED"
    if interrupt is not None:
        note_killed()
    try:
        if interrupt is not None:
            mlflow_client.set_tag(run_id, KILLED_REASON_TAG,
                                  f"stopped by {interrupt.name}")
        elif status == "KILLED":
            mlflow_client.set_tag(run_id, KILLED_REASON_TAG,
                                  f"{type(err).__name__}: {err}"[:4000])
        else:
            kind, message = describe_failure(err, config)
            mlflow_client.set_tag(run_id, FAILURE_KIND_TAG, kind)
            mlflow_client.set_tag(run_id, FAILURE_TAG, message[:4000])
        mlflow_client.set_terminated(run_id, status)
    except Exception as store_err:
        print(f"warning: could not record run {run_id} as {status} "
              f"({type(store_err).__name__}: {store_err})"[:500], file=sys.stderr)
    return status


