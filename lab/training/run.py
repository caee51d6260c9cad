"""One training run, end to end: config -> data -> model -> Lightning -> MLflow.

`train_run` is what `gatelab train`, the grid and the sweep all call. The config arrives
validated; the run's MLflow record is created before training and closed after the test
evaluation, as FINISHED (a diverged run is FINISHED with the tag `diverged`), FAILED or
KILLED. Once the run exists, every way out of `train_run` closes it (end_run): FAILED with
`gatelab.failure_kind` and `gatelab.failure` for any error, KILLED with
`gatelab.killed_reason` for a stop signal, so no run is left RUNNING by a live process.

Checkpoints hold tensors and plain data only, and every load of one (resume, `analyze`,
`export`, Lightning's own) goes through torch's restricted unpickler (load_checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lab.config import RunConfig, flatten, with_vocab
from lab.data.sources import open_source
from lab.data.store import TokenStore
from lab.data.windows import check_batch_fits
from lab.model.decoder import Decoder
from lab.model.flops import device_peak_tflops
from lab.model.params import count_params, model_flops_per_token
from lab import tracking


DDP_RUN_ID = "GATELAB_DDP_RUN_ID"


@dataclass
class RunResult:
    run_id: str
    status: str
    metrics: dict = field(default_factory=dict)
    diverged_step: int | None = None


def check_devices(devices: int) -> None:
    """train.devices GPUs must be visible here: without CUDA the Trainer would quietly train
    on one CPU process instead (lab.training.run.train_run)."""
    from lab.errors import LabError

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices > max(1, available):
        where = f"{available} CUDA device(s) are visible" if available else \
            "no CUDA device is visible (a CPU run uses 1)"
        raise LabError(f"train.devices: {devices} devices per run, but {where}; allowed: "
                       f"1..{max(1, available)}")


def open_data(config: RunConfig) -> tuple[TokenStore, RunConfig]:
    check_devices(config.train.devices)
    d = config.data
    store = open_source(d.source, d.vocab_size, d.valid, d.test)
    from lab.training.schedule import total_steps

    check_batch_fits(store, config.model.context, config.train.micro_batch, d.bos_aligned,
                     total_steps(config) * config.train.batch_size)
    return store, with_vocab(config, store.vocab_size)


def run_tags(config: RunConfig) -> dict[str, str]:
    return {"variant": config.variant, "seed": str(config.train.seed), "preset": config.preset,
            "lr": f"{config.train.lr:g}", "config_hash": config.hash(),
            "git_commit": tracking.git_commit(), "data": config.data.source}


def start_run(config: RunConfig, uri: str, experiment: str, run_name: str | None = None,
              parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Create the MLflow run for `config` (RUNNING) with its params, tags and config artifact."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    mlflow_client = tracking.client(uri)
    tags = run_tags(config)
    tags[MLFLOW_RUN_NAME] = run_name or tracking.cell_name(config.variant, config.train.lr, config.train.seed)
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    tags.update(extra_tags or {})
    run = mlflow_client.create_run(tracking.experiment_id(mlflow_client, experiment, uri), tags=tags)
    run_id = run.info.run_id
    try:
        tracking.log_params(mlflow_client, run_id, flatten(config.to_dict()))
        tracking.log_dict_artifact(mlflow_client, run_id, config.to_dict(), "config.yaml")
    except BaseException as err:  # e.g. a full disk: the run exists, so it is closed FAILED
        end_run(mlflow_client, run_id, config, err)
        raise
    return run_id


def describe_failure(err: BaseException, config: RunConfig) -> tuple[str, str]:
    """(kind, one-line message) for a failed run: out of memory, disk full, bad input, error."""
    import errno

    from lab.data.store import cache_root
    from lab.errors import LabError

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
                             f"the store ({tracking.store_dir()}) and the cache ({cache_root()}), "
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
    import sys

    from lab.interrupts import interruption

    if err is None:
        mlflow_client.set_terminated(run_id, "FINISHED")
        return "FINISHED"
    interrupt = interruption(err)
    status = "KILLED" if interrupt is not None or isinstance(err, stopped_by) else "FAILED"
    try:
        if interrupt is not None:
            mlflow_client.set_tag(run_id, tracking.KILLED_REASON_TAG,
                                  f"stopped by {interrupt.name}")
        elif status == "KILLED":
            mlflow_client.set_tag(run_id, tracking.KILLED_REASON_TAG,
                                  f"{type(err).__name__}: {err}"[:4000])
        else:
            kind, message = describe_failure(err, config)
            mlflow_client.set_tag(run_id, tracking.FAILURE_KIND_TAG, kind)
            mlflow_client.set_tag(run_id, tracking.FAILURE_TAG, message[:4000])
        mlflow_client.set_terminated(run_id, status)
    except Exception as store_err:
        print(f"warning: could not record run {run_id} as {status} "
              f"({type(store_err).__name__}: {store_err})"[:500], file=sys.stderr)
    return status


def checkpoint_dir(run_id: str) -> Path:
    return tracking.store_dir() / "checkpoints" / run_id


def checkpoint_path(run_or_path: str, command: str) -> Path:
    """A checkpoint file, a directory holding last.ckpt, or an MLflow run id or a unique
    prefix of one (its last.ckpt); `command` names the caller in the one-line error when
    there is none."""
    from lab.errors import LabError

    path = Path(run_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        path = path / "last.ckpt"
    else:
        path = checkpoint_dir(run_id_from_prefix(run_or_path, command)) / "last.ckpt"
    if not path.exists():
        raise LabError(f"{command}: no checkpoint at {path} (pass a run id with a checkpoint "
                       "under <store>/checkpoints/<run id>/, or a .ckpt file)")
    return path


def run_id_from_prefix(text: str, command: str) -> str:
    """The run id of the store's checkpoints that starts with `text` (MLflow's ids are 32 hex
    digits; as with git, a unique prefix names one); `text` itself when none does. Several
    matches are a LabError that lists them."""
    from lab.errors import LabError

    text = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,31}", text):
        return text
    root = tracking.store_dir() / "checkpoints"  # checkpoint_dir's parent
    matches = sorted(p.name for p in root.glob(f"{text}*") if (p / "last.ckpt").exists()) \
        if root.is_dir() else []
    if len(matches) > 1:
        shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10
                                           else "")
        raise LabError(f"{command}: run id prefix {text!r} matches {len(matches)} runs with a "
                       f"checkpoint: {shown}; give more characters")
    return matches[0] if matches else text


def load_checkpoint(path: Path, command: str, mmap: bool = False) -> dict:
    """A checkpoint file read with torch's restricted unpickler (`weights_only=True`): it
    rebuilds tensors and plain data (dicts, lists, tuples, strings, numbers, booleans, None)
    and refuses every other object before creating it, so loading runs no code from the file.
    The lab writes nothing else into a checkpoint (the config is a plain dict; the callbacks'
    states are lists of numbers), so it allow-lists no further type. A file that needs more,
    or is no checkpoint at all, is one LabError line naming `command`. `mmap`: tensors are
    mapped, not read (for a caller that needs only the plain data)."""
    from lab.errors import LabError

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # nothing was created from the file but plain data
        needed = _unsafe_globals(path, err)
        if needed:
            raise LabError(f"{command}: {path} refused: loading it would create "
                           f"{', '.join(needed[:5])}, not only tensors and plain data (a gatelab "
                           "checkpoint holds nothing else; such a file can run code when "
                           "loaded)") from None
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(raw, dict):
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"(it holds a {type(raw).__name__}, not a dict)")
    return raw


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The objects beyond plain data that a refused file asks for (`posix.system`), read
    from its pickle without creating them; for a file in torch's older, non-zip format,
    from the restricted unpickler's message."""
    import pickle

    if not isinstance(err, pickle.UnpicklingError):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return re.findall(r"GLOBAL (\S+)", str(err))[:1]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_checkpoint(path: Path, command: str) -> tuple[RunConfig, dict, int]:
    """A training checkpoint -> (its RunConfig, the Decoder's state dict without the
    LightningModule's `model.` prefix, its global step). `command` names the caller in the
    one-line error a file that is not a gatelab checkpoint gives."""
    from lab.config import from_dict
    from lab.errors import LabError

    raw = load_checkpoint(path, command)
    try:
        config = from_dict(raw["hyper_parameters"]["config"])
        state = {name.removeprefix("model."): tensor
                 for name, tensor in raw["state_dict"].items() if name.startswith("model.")}
        step = int(raw.get("global_step", 0))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"({type(err).__name__}: {_first_line(err)})") from None
    return config, state, step


def train_run(config: RunConfig, uri: str | None = None, experiment: str = "gatelab",
              run_name: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, extra_tags: dict | None = None, quiet: bool = False,
              callbacks: list | None = None,
              on_start: Callable[[str], None] | None = None,
              stopped_by: tuple[type[BaseException], ...] = ()) -> RunResult:
    """Train, evaluate and record one run. `run_id` continues an existing (killed) run from
    its last checkpoint; otherwise a new run is created. An exception of `stopped_by` (the
    sweep's pruning) ends the run KILLED rather than FAILED (end_run)."""
    from lab.interrupts import interruption

    uri = tracking.tracking_uri(uri)
    store, config = open_data(config)
    mlflow_client = tracking.client(uri)
    # Under DDP, Lightning starts ranks > 0 by running the same command again; they join
    # the run rank 0 created (passed through the environment) and write nothing to MLflow.
    primary = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not primary:
        run_id = os.environ[DDP_RUN_ID]
    start_step = 0
    if run_id is not None:
        # A checkpoint that is refused is refused here, before the run is RUNNING again.
        # Only the step is needed (the data order resumes there); mmap reads no tensors.
        ckpt = checkpoint_dir(run_id) / "last.ckpt"
        if ckpt.exists():
            start_step = int(load_checkpoint(ckpt, "resume", mmap=True)["global_step"])
    try:
        if primary and run_id is None:
            run_id = start_run(config, uri, experiment, run_name, parent_run_id, extra_tags)
        elif primary:
            mlflow_client.update_run(run_id, status="RUNNING")
        return _train(config, store, run_id, uri, mlflow_client, primary, start_step, quiet,
                      callbacks, on_start)
    except BaseException as err:
        if primary and run_id is not None:  # (start_run closes a run it could not finish)
            end_run(mlflow_client, run_id, config, err, stopped_by)
        interrupt = interruption(err)
        if interrupt is not None and interrupt is not err:
            raise interrupt from None  # the stop signal, not Lightning's sys.exit(1) for it
        raise


def _train(config: RunConfig, store, run_id: str, uri: str, mlflow_client, primary: bool,
           start_step: int, quiet: bool, callbacks, on_start) -> RunResult:
    """train_run once its run exists: whatever this raises, train_run closes the run."""
    import lightning as L

    from lab.training.callbacks import (AnalysisMonitor, AtomicCheckpoint, GateInsertion, LossMonitor,
                               RoutingStats)
    from lab.training.module import LanguageModel, TokenDataModule
    from lab.training.schedule import accumulation, total_steps

    os.environ[DDP_RUN_ID] = run_id
    if on_start and primary:
        on_start(run_id)
    counts = count_params(config)
    if primary:
        for name, value in counts.items():
            mlflow_client.log_metric(run_id, f"params/{name}", value)
    if not quiet and primary:
        added = f", {counts['added']:,} added over baseline"
        active = f", {counts['active']:,} active" if counts["active"] != counts["total"] else ""
        print(f"[{config.variant}] parameters: {counts['total']:,} total{active}, "
              f"{counts['non_embedding']:,} non-embedding{added}", flush=True)

    started = time.time()
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    module = LanguageModel(config)
    ckpt = checkpoint_dir(run_id) / "last.ckpt"
    data = TokenDataModule(store, config, start_step=start_step)
    steps = total_steps(config)
    monitor = LossMonitor(config, accumulate=accumulation(config),
                          flops_per_token=model_flops_per_token(config, counts),
                          peak_tflops=device_peak_tflops())
    checkpoints = AtomicCheckpoint(checkpoint_dir(run_id),
                                   config.train.checkpoint_every or config.train.val_every, monitor,
                                   # an explicit step cadence is kept as asked
                                   0.0 if config.train.checkpoint_every else
                                   config.train.checkpoint_min_interval_s)
    all_callbacks = [monitor, checkpoints, *(callbacks or [])]
    if not quiet and primary:
        from lab.progress import RunProgress

        all_callbacks.append(RunProgress(config.variant, steps,
                                         config.train.batch_size * config.model.context,
                                         min_interval_s=10.0))
    if config.model.gate_insert_fraction is not None:
        all_callbacks.append(GateInsertion(int(config.model.gate_insert_fraction * steps)))
    if config.model.ffn == "moe":
        all_callbacks.append(RoutingStats(config.train.log_every))
    if config.train.analysis_every and config.train.analysis_windows:
        all_callbacks.append(AnalysisMonitor(store, config))
    cuda = torch.cuda.is_available()
    precision = config.train.precision_on(cuda)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=config.train.devices if cuda else 1,
        strategy="ddp" if cuda and config.train.devices > 1 else "auto",
        precision=precision, max_steps=steps, val_check_interval=config.train.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        accumulate_grad_batches=accumulation(config), log_every_n_steps=config.train.log_every,
        logger=tracking.lightning_logger(uri, run_id), callbacks=all_callbacks,
        # Progress is the lab's RunProgress lines (lab/progress.py), not Lightning's bar.
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=config.train.deterministic, default_root_dir=str(checkpoint_dir(run_id)),
        # a compiled run evaluates through its training graph (lab/training/module.py _eval_step)
        inference_mode=not config.train.compile_on(cuda))
    # Lightning's own load of the checkpoint, restricted the same way as load_checkpoint.
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt.exists() else None,
                weights_only=True)
    metrics = _finish(trainer, module, data, monitor, config,
                      mlflow_client if primary else None, run_id, started)
    if primary:
        end_run(mlflow_client, run_id, config, None)
    return RunResult(run_id, "FINISHED", metrics, monitor.diverged_step)


def _finish(trainer, module, data, monitor, config, mlflow_client, run_id, started) -> dict:
    """Final evaluation (every rank takes part) and the run's summary (`mlflow_client` is None
    on DDP ranks > 0, which record nothing)."""
    metrics: dict[str, float] = {}
    steps_done = trainer.global_step
    tokens_per_step = config.train.batch_size * config.model.context
    if monitor.diverged_step is not None:
        metrics["diverged/step"] = monitor.diverged_step
    else:
        # Final evaluation at the last step (validation may not fall on it), then test.
        val = trainer.validate(module, datamodule=data, verbose=False)[0]
        test = trainer.test(module, datamodule=data, verbose=False)[0]
        metrics.update({"val/final_loss": val["val/loss"], "val/ppl": val["val/ppl"],
                        "test/loss": test["test/loss"], "test/ppl": test["test/ppl"]})
        metrics["val/best_loss"] = min(monitor.val_losses + [val["val/loss"]])
    spikes = monitor.spikes()
    metrics["spikes/count"] = len(spikes)
    metrics["spikes/max_excess"] = max((s.max_excess for s in spikes), default=0.0)
    metrics["tokens/seen"] = steps_done * tokens_per_step
    metrics["time/wall_s"] = time.time() - started
    metrics.update(throughput_summary(monitor, config))
    if monitor.grad_norms:
        finite = [n for n in monitor.grad_norms if math.isfinite(n)]
        metrics["train/grad_norm_max"] = max(finite, default=float("nan"))
    if mlflow_client is None:
        return metrics
    mlflow_client.set_tag(run_id, "diverged", str(monitor.diverged_step is not None).lower())
    tracking.log_metrics(mlflow_client, run_id, metrics, steps_done)
    tracking.log_dict_artifact(mlflow_client, run_id, [dataclasses.asdict(s) for s in spikes],
                               "spikes.json")
    tracking.log_dict_artifact(mlflow_client, run_id,
                               {"step": monitor.steps, "loss": monitor.losses,
                                "grad_norm": monitor.grad_norms}, "loss_history.json")
    if trainer.is_global_zero and (config.train.analysis_windows or config.train.context_factors()):
        metrics.update(_analyze(module, data.store, config, mlflow_client, run_id, steps_done))
    return metrics


def throughput_summary(monitor, config: RunConfig) -> dict[str, float]:
    """The run's speed as torchtitan reports it: steady-state tokens/s (training steps only:
    no validation, checkpoint or compile time), MFU against the device's looked-up peak,
    peak memory, and the first step's time; with compilation, its cost over a steady step."""
    out: dict[str, float] = {}
    rate = monitor.steady_tokens_per_s()
    if rate:
        out["throughput/tokens_per_s_mean"] = rate
        if monitor.flops_per_token and monitor.peak_tflops:
            out["throughput/mfu"] = monitor.mfu(rate)
    if monitor.first_step_s is not None:
        out["time/first_step_s"] = monitor.first_step_s
        if rate and config.train.compile_on(torch.cuda.is_available()):
            steady_step_s = monitor.tokens_per_step / rate
            out["time/compile_s"] = max(0.0, monitor.first_step_s - steady_step_s)
    if torch.cuda.is_available():
        out["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def _analyze(module, store, config, mlflow_client, run_id, step) -> dict:
    """The paper's analyses on the final weights (lab/analysis/metrics.py), also for a diverged run
    whose weights are still finite; timed as `time/analysis_s`."""
    from lab.analysis.metrics import analysis_device, analyze
    from lab.analysis.outputs import log_analysis

    started = time.time()
    device = next(module.model.parameters()).device
    model = module.model.to(analysis_device())  # Lightning's teardown left it on the CPU
    try:
        result = analyze(model, store, config)
        log_analysis(mlflow_client, run_id, result, step)
    except Exception as err:  # a finished training run stays FINISHED; the tag says what broke
        import traceback

        traceback.print_exc()
        mlflow_client.set_tag(run_id, "analysis", f"failed: {type(err).__name__}: {err}"[:500])
        return {}
    finally:
        module.model.to(device)
    seconds = time.time() - started
    tracking.log_metrics(mlflow_client, run_id, {"time/analysis_s": seconds}, step)
    return {**result.metrics, "time/analysis_s": seconds}


def describe(result: RunResult) -> str:
    m = result.metrics
    if result.diverged_step is not None:
        return f"run {result.run_id}: diverged at step {result.diverged_step}"
    return (f"run {result.run_id}: val/ppl {m['val/ppl']:.3f}, test/ppl {m['test/ppl']:.3f}, "
            f"{int(m['tokens/seen']):,} tokens in {m['time/wall_s']:.0f} s")


def to_json(result: RunResult) -> str:
    return json.dumps(dataclasses.asdict(result), default=str)
