"""The worker processes of grids and sweeps: one per slot, a slot being one GPU (the worker
sees only that device, through CUDA_VISIBLE_DEVICES) or a share of the CPU cores.

Each worker takes one task at a time from its own queue, so the pool always knows which
task a worker holds; a worker that dies holding one (the kernel's out-of-memory killer, a
segfault, a signal) is reported with that task, what the task had told the pool so far (its
run, its trial) and how the process ended (its exit code, or the signal by name), and a
fresh worker takes its slot. What "reported" means is the pool's kind's: a grid marks the
cell's run FAILED, a sweep also fails the trial (lab/experiments/grid/cells.py `CellPool`,
lab/experiments/sweep/trials.py `TrialPool`).

GPU pinning: a grid gives every GPU `--runs-per-gpu` workers; a sweep's `--workers N` are
spread over the visible GPUs, one GPU per worker, in contiguous blocks when there are more
workers than GPUs (gpu_slots). Workers watch the process that started them and end within
a second of it, so a SIGKILLed grid or sweep leaves no worker writing to the stores.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Hashable

import torch

from lab import records
from lab.errors import LabError
from lab.interrupts import stop_on_signals
from lab.progress import configure_output
from lab.records import owner_alive, owner_identity
from lab.training import phases as run_phases

GPU_ENV = "CUDA_VISIBLE_DEVICES"


def parse_gpus(text: str | None) -> list[str]:
    """`all` (or nothing) or a comma list of CUDA indices, as this process sees them -> the
    device ids workers are pinned to (their CUDA_VISIBLE_DEVICES); none without CUDA."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text is None or text == "all":
        return visible_ids([str(i) for i in range(available)])
    if available == 0:
        raise LabError("--gpus: no CUDA device is visible; leave --gpus out to run on CPU")
    ids = [g.strip() for g in text.split(",") if g.strip()]
    for gpu in ids:
        if not gpu.isdigit() or int(gpu) >= available:
            raise LabError(f"--gpus: {gpu!r} is not one of all, "
                           f"{', '.join(str(i) for i in range(available))}")
    return visible_ids(list(dict.fromkeys(ids)))


def visible_ids(indices: list[str]) -> list[str]:
    """CUDA indices of this process -> the same devices as a child's CUDA_VISIBLE_DEVICES
    names them: where this process was started with CUDA_VISIBLE_DEVICES (e.g. `2,3`, or
    GPU UUIDs), its index i is that list's i-th entry, not the host's GPU i."""
    inherited = [g.strip() for g in os.environ.get(GPU_ENV, "").split(",") if g.strip()]
    return [inherited[int(i)] if int(i) < len(inherited) else i for i in indices]


def gpu_slots(gpus: list[str], workers: int) -> list[dict[str, str]]:
    """`workers` slots over `gpus`, each pinned to one GPU, as evenly as they divide: in
    contiguous blocks (GPU 0's slots first), so with more workers than GPUs each GPU holds
    workers // len(gpus) of them or one more. Without GPUs, `workers` CPU slots."""
    if not gpus:
        return [{} for _ in range(workers)]
    return [{GPU_ENV: gpus[i * len(gpus) // workers]} for i in range(workers)]


def slot_name(slot: dict[str, str]) -> str:
    return f"GPU {slot[GPU_ENV]}" if GPU_ENV in slot else "a CPU worker"


# A model this narrow (the CPU presets, tiny and moe-tiny: d_model 64) gains nothing from a
# second intra-op thread and loses much when that thread waits for a core other jobs hold:
# 20 tiny steps took 1 s on one thread and 15 s on two with the cores busy (tests/conftest.py),
# the README's `gatelab train --preset tiny` example 4 s against 25 s (2026-12-05, 2 cores).
ONE_THREAD_D_MODEL = 128


def threads_per_worker(workers: int, d_model: int | None = None) -> int:
    """Torch threads for each of `workers` processes on this host: the cores split evenly,
    or one for a model no wider than ONE_THREAD_D_MODEL."""
    if d_model is not None and d_model <= ONE_THREAD_D_MODEL:
        return 1
    return max(1, (os.cpu_count() or 1) // workers)


def cpu_threads(requested: int | None, workers: int, d_model: int | None = None) -> int:
    """`--cpu-threads` of `gatelab grid` and `gatelab train`: the count asked for, else
    threads_per_worker's."""
    if requested is not None and requested < 1:
        raise LabError(f"--cpu-threads: must be at least 1, got {requested}")
    return requested or threads_per_worker(workers, d_model)


def exit_text(exitcode: int | None) -> str:
    """How a process ended, for a person: multiprocessing reports a signal as -N."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def fail_run(uri: str, run_id: str | None, kind: str, reason: str) -> None:
    """End a run FAILED with why (tags gatelab.failure_kind and gatelab.failure, the reason
    cut to fit an MLflow tag)."""
    if run_id is None:
        return
    client = records.client(uri)
    client.set_tag(run_id, records.FAILURE_KIND_TAG, kind)
    client.set_tag(run_id, records.FAILURE_TAG, reason[:4000])
    client.set_terminated(run_id, "FAILED")


def die_with_parent(parent_owner: str, every_s: float = 0.5) -> None:
    """A worker must not outlive the grid or sweep that started it (a SIGKILLed one would
    leave it writing to the stores): a watchdog thread ends this process once the parent's
    identity (lab/records/owners.py) is gone. Forkserver workers are not the parent's
    children, so the kernel's parent-death signal would not reach them."""

    def watch():
        while owner_alive(parent_owner, None):
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def environment_with(changes: dict[str, str]):
    """This process's environment with `changes`, for the child processes started inside."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def enter_child(env: dict, threads: int, parent_owner: str) -> None:
    """A child process's first steps, the pool's workers' and the grid's compile-ahead
    process's (lab/experiments/grid/ahead.py): the parent's environment, the lab's output
    level, an end with the parent, its torch threads."""
    os.environ.update(env)
    configure_output()  # the forkserver imported Lightning, which set its loggers to INFO
    die_with_parent(parent_owner)
    torch.set_num_threads(threads)


def _worker_main(env: dict, threads: int, parent_owner: str, job: Callable,
                 preload: tuple[str, ...], tasks, results) -> None:
    enter_child(env, threads, parent_owner)
    try:
        # SIGINT (Ctrl-C reaches the whole process group) and SIGTERM (forwarded by
        # WorkerPool.close) end the task's run KILLED, as in the parent process.
        with stop_on_signals():
            for module in preload:
                importlib.import_module(module)
            # The worker's start-up ends here, not at its first task, which may wait for
            # the pool's context (WorkerPool.begin: a grid's check comes first).
            run_phases.end_startup()
            context = tasks.get()
            while True:
                task = tasks.get()
                if task is None:
                    return

                def notify(info: dict, index=task.index) -> None:
                    results.put(("started", index, info))

                results.put(("outcome", task.index, job(task, context, notify)))
    except (KeyboardInterrupt, SystemExit):
        return


LATER = object()  # WorkerPool's context: handed to `begin` later


class WorkerPool:
    """One process per slot, each taking tasks (anything with an `index`) from its own queue.

    A kind of pool names its `job`, a module-level function `job(task, context, notify) ->
    outcome` that runs in the workers (`notify(dict)` tells the pool what the task has
    started, e.g. its run id), and `crashed(task, started, reason) -> outcome`, what its
    parent does when a worker dies holding a task.

    GPU workers start fresh interpreters (spawn): each must see only its own device, and a
    process that has asked CUDA anything cannot hand a working CUDA to a fork. CPU workers
    fork from a server that has imported torch, Lightning and MLflow once (forkserver), so
    four workers do not pay four interpreter start-ups; as that server keeps the
    environment of the moment it started, each worker is handed this process's (the store,
    the data cache, the output level), as a spawned one inherits it.

    A worker imports `preload` as it starts, then waits for the context its tasks run in:
    given to the constructor, or later to `begin` (a grid starts its workers before its
    `gatelab check`, so that their imports, 13-21 s a spawned worker on the lent H100
    machine, overlap the check instead of following it)."""

    job: Callable[[Any, Any, Callable[[dict], None]], Any]
    preload: tuple[str, ...] = ()

    def __init__(self, slots: list[dict[str, str]], threads: int, context=LATER):
        if any(GPU_ENV in slot for slot in slots):
            self.mp = multiprocessing.get_context("spawn")
        else:
            self.mp = multiprocessing.get_context("forkserver")
            self.mp.set_forkserver_preload(["torch", "lightning", "mlflow", "mlflow.tracking"])
        self.slots, self.threads, self.context, self.begun = slots, threads, None, False
        self.environment = dict(os.environ)
        self.results = self.mp.Queue()
        self.workers = [self._start(slot) for slot in slots]
        if context is not LATER:
            self.begin(context)

    def begin(self, context) -> None:
        """The context every worker's tasks run in (one started later gets it too)."""
        self.context, self.begun = context, True
        for _, tasks in self.workers:
            tasks.put(context)

    def _start(self, slot: dict[str, str]):
        tasks = self.mp.Queue()
        process = self.mp.Process(target=_worker_main, daemon=True,
                                  args=({**self.environment, **slot}, self.threads,
                                        owner_identity(), type(self).job, self.preload, tasks,
                                        self.results))
        # A spawned worker starts with the slot's CUDA_VISIBLE_DEVICES already set, so that
        # no import before _worker_main can initialise CUDA on another device.
        with environment_with(slot if self.mp.get_start_method() == "spawn" else {}):
            process.start()
        if self.begun:
            tasks.put(self.context)
        return process, tasks

    def crashed(self, task, started: dict, reason: str):
        raise NotImplementedError

    def run(self, tasks: list, on_outcome: Callable[[Any], None],
            on_dispatch: Callable[[Any, dict[str, str]], None],
            admit: Callable[[], bool] = lambda: True,
            shape_of: Callable[[Any], Hashable] | None = None,
            model_of: Callable[[Any], Hashable] | None = None) -> list:
        """Run the tasks, a free worker taking the next one while `admit()` says a task may
        still start (the grid's --time-limit); the tasks never started, in order.

        `model_of`: a free worker takes the first pending task of the same model as its last
        one, where there is one, before the next in order: the worker keeps Dynamo's graphs
        for it (lab/training/step.py compile_for_training) instead of tracing them again.
        None: a task of no model to keep (CUDA graphs), after which the next in order.

        `shape_of` (the grid's --warm-first): tasks of one shape (one compiled graph) wait
        while the first of their shape has not told the pool it is warm (`notify({"warm":
        True})`, after its compile) or ended, and a free worker takes the next task of
        another shape meanwhile, or waits: the first compile fills Inductor's on-disk cache,
        from which the others then load instead of compiling the same graph side by side."""
        pending = deque(tasks)
        holding: dict[int, Any] = {}      # worker slot -> task
        started: dict[int, dict] = {}     # task index -> what the task has notified
        warming: dict[Hashable, int] = {}  # shape -> the index of its first task, compiling
        warm: set[Hashable] = set()
        last_model: dict[int, Hashable] = {}  # worker slot -> model_of its last task

        def take(slot: int):
            last = last_model.get(slot)
            # (stable: the last model's tasks first, each group in order)
            preferred = sorted(pending, key=lambda t: last is None or model_of(t) != last)
            for task in preferred:
                shape = shape_of(task) if shape_of else None
                if shape is None or shape in warm or shape not in warming:
                    if shape is not None and shape not in warm:
                        warming[shape] = task.index
                    pending.remove(task)
                    return task
            return None  # every task left waits for its shape's first task

        def warmed(index: int) -> None:
            for shape, first in list(warming.items()):
                if first == index:
                    del warming[shape]
                    warm.add(shape)

        while holding or (pending and admit()):
            for slot in range(len(self.workers)):
                if slot not in holding and pending and admit():
                    task = take(slot)
                    if task is None:
                        break
                    if model_of is not None:
                        last_model[slot] = model_of(task)
                    holding[slot] = task
                    self.workers[slot][1].put(task)
                    on_dispatch(task, self.slots[slot])
            try:
                kind, index, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                kind = None
            if kind == "started":
                started.setdefault(index, {}).update(payload)
                if payload.get("warm"):
                    warmed(index)
            elif kind == "outcome":
                slot = next(s for s, t in holding.items() if t.index == index)
                del holding[slot]
                warmed(index)  # ended, warm or not: its shape waits no longer
                on_outcome(payload)
            for slot, task in list(holding.items()):
                process = self.workers[slot][0]
                if process.is_alive() or not self.results.empty():
                    continue
                # The worker died holding a task (killed by the OS, a segfault): say so.
                reason = (f"worker process {exit_text(process.exitcode)} while training "
                          "(killed by the operating system, e.g. out of host memory?)")
                del holding[slot]
                warmed(task.index)
                self.workers[slot] = self._start(self.slots[slot])
                last_model.pop(slot, None)  # a fresh process: no graphs kept
                on_outcome(self.crashed(task, started.get(task.index, {}), reason))
        return list(pending)

    def close(self, signum: int | None = None) -> None:
        """Stop the workers: each ends after its task; with `signum` (the parent was stopped
        by that signal) each gets the signal now, so its run ends KILLED with that reason.
        Before `begin` no worker holds anything: each is ended at once, mid-import or not."""
        if not self.begun:
            for process, _ in self.workers:
                process.terminate()
            for process, _ in self.workers:
                process.join(timeout=10)
            return
        for process, tasks in self.workers:
            if process.is_alive():
                tasks.put(None)
                if signum is not None:
                    try:
                        os.kill(process.pid, signum)
                    except ProcessLookupError:
                        pass
        for process, _ in self.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
