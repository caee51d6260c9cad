"""lab/experiments/pool.py: the worker pool grids and sweeps share: which GPU each worker is
pinned to, how many threads it gets, the environment it starts with, and a worker that dies
reported with its task, what the task had told the pool, and its signal.

The sweep's use of it (its workers on different GPUs) is in tests/integration/test_sweep.py, the grid's
(--runs-per-gpu) in tests/integration/test_grid.py."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import pytest

from lab.experiments import pool
from lab.experiments.pool import WorkerPool, exit_text, gpu_slots, slot_name, threads_per_worker


@pytest.mark.parametrize("gpus, workers, pinned", [
    (["0", "1"], 2, ["0", "1"]),                       # one GPU each
    (["0", "1"], 1, ["0"]),
    (["0", "1"], 3, ["0", "0", "1"]),                  # more workers than GPUs: evenly
    (["0", "1"], 6, ["0", "0", "0", "1", "1", "1"]),   # a grid's --runs-per-gpu 3
    (["2", "5", "7"], 4, ["2", "2", "5", "7"]),        # --gpus 2,5,7
])
def test_each_worker_is_pinned_to_one_gpu_and_the_gpus_share_them_evenly(gpus, workers, pinned):
    slots = gpu_slots(gpus, workers)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in slots] == pinned
    assert all(len(slot) == 1 for slot in slots)
    assert slot_name(slots[0]) == f"GPU {pinned[0]}"


@pytest.mark.parametrize("inherited, asked, pinned", [
    (None, None, ["0", "1"]), (None, "1", ["1"]),
    ("2,3", None, ["2", "3"]), ("2,3", "1", ["3"]),          # this process sees GPUs 2 and 3
    ("GPU-a1,GPU-b2", "0", ["GPU-a1"])])
def test_gpus_are_named_to_the_workers_as_this_process_sees_them(monkeypatch, inherited, asked,
                                                                  pinned):
    """--gpus (and `all`) count the devices this process sees; a worker's
    CUDA_VISIBLE_DEVICES names the same device, not the host's GPU of that index."""
    from lab.experiments import pool

    monkeypatch.setattr(pool.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pool.torch.cuda, "device_count", lambda: 2)
    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    assert pool.parse_gpus(asked) == pinned


def test_without_gpus_every_slot_is_a_cpu_slot():
    assert gpu_slots([], 3) == [{}, {}, {}]
    assert slot_name({}) == "a CPU worker"


@pytest.mark.parametrize("cores, workers, threads", [(16, 1, 16), (16, 3, 5), (16, 6, 2),
                                                     (16, 16, 1), (16, 40, 1), (2, 2, 1),
                                                     (None, 4, 1)])
def test_threads_per_worker_split_the_cores_and_never_reach_zero(monkeypatch, cores, workers,
                                                                 threads):
    monkeypatch.setattr(pool.os, "cpu_count", lambda: cores)
    assert threads_per_worker(workers) == threads


def test_how_a_worker_ended_is_said_in_words():
    assert exit_text(-signal.SIGKILL) == "was killed by SIGKILL (exit code -9)"
    assert exit_text(-signal.SIGSEGV) == "was killed by SIGSEGV (exit code -11)"
    assert exit_text(1) == "exited with code 1"


def test_a_gpu_workers_device_is_set_while_it_starts_and_this_process_keeps_its_own(monkeypatch):
    """A spawned worker inherits the environment of the moment it starts: the slot's GPU is
    set for that moment only (lab.experiments.pool.environment_with)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("SLOT_MARK", raising=False)
    with pool.environment_with({"CUDA_VISIBLE_DEVICES": "1", "SLOT_MARK": "x"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ["SLOT_MARK"] == "x"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and "SLOT_MARK" not in os.environ


# --- real worker processes ------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    index: int
    die: bool = False


def report_or_die(task: Job, context: str, notify) -> tuple:
    """A task that says where it ran, or kills its own worker once it has said it started."""
    notify({"started_by": os.getpid()})
    if task.die:
        time.sleep(0.5)  # the queue's feeder thread sends the notice before the kill
        os.kill(os.getpid(), signal.SIGKILL)
    return task.index, os.environ.get("SLOT_MARK"), os.environ.get("FROM_PARENT"), context


class RecordingPool(WorkerPool):
    job = staticmethod(report_or_die)

    def crashed(self, task: Job, started: dict, reason: str) -> tuple:
        return "crashed", task.index, sorted(started), reason


@pytest.mark.slow
def test_workers_start_with_their_slots_environment_and_a_dead_one_is_reported(monkeypatch):
    """Two CPU slots marked apart: each task runs with its worker's slot and the parent's
    environment; the worker killed in task 1 is reported with that task, what it had
    notified and its signal, and a fresh worker in its slot runs the tasks after it."""
    monkeypatch.setenv("FROM_PARENT", "yes")
    workers = RecordingPool([{"SLOT_MARK": "a"}, {"SLOT_MARK": "b"}], 1, "the context")
    outcomes, dispatched = [], []
    try:
        workers.run([Job(0), Job(1, die=True), Job(2), Job(3)], outcomes.append,
                    lambda task, slot: dispatched.append((task.index, slot["SLOT_MARK"])))
    finally:
        workers.close()
    crashed = [o for o in outcomes if o[0] == "crashed"]
    assert len(crashed) == 1 and crashed[0][:3] == ("crashed", 1, ["started_by"])
    assert "was killed by SIGKILL (exit code -9) while training" in crashed[0][3]
    ran = sorted(o for o in outcomes if o[0] != "crashed")
    assert [o[0] for o in ran] == [0, 2, 3]
    slot_of = dict(dispatched)
    assert all(mark == slot_of[index] and parent == "yes" and context == "the context"
               for index, mark, parent, context in ran)
    assert sorted(dispatched) == [(0, "a"), (1, "b"), (2, slot_of[2]), (3, slot_of[3])]


def startup_then_context(task: Job, context, notify) -> tuple:
    import sys

    from lab.training import phases
    return task.index, phases.startup_seconds(), context, "colorsys" in sys.modules


class LaterPool(WorkerPool):
    job = staticmethod(startup_then_context)
    preload = ("colorsys",)  # a module nothing else here imports


@pytest.mark.slow
def test_workers_start_before_their_context_and_their_startup_ends_before_the_wait():
    """A pool started before its context is known (the grid starts its workers before its
    check): each worker imports `preload` and waits; `begin` hands the context, which a task
    then runs with. The worker's start-up (a run's `time/startup_s`) ends before that wait,
    so a 5-s wait for the context is not counted as start-up. A pool never begun is ended
    at once by close."""
    workers = LaterPool([{}], 1)
    try:
        time.sleep(5.0)
        workers.begin("given later")
        outcomes = []
        workers.run([Job(0), Job(1)], outcomes.append, lambda task, slot: None)
    finally:
        workers.close()
    (index0, startup0, context0, preloaded0), (index1, startup1, _, _) = sorted(outcomes)
    assert (index0, context0, preloaded0, index1) == (0, "given later", True, 1)
    assert startup0 < 3.0 and startup1 == 0.0  # counted once, without the wait
    never = LaterPool([{}, {}], 1)
    never.close()
    assert not any(process.is_alive() for process, _ in never.workers)


@pytest.mark.slow
def test_no_task_starts_once_admit_says_no_and_those_in_progress_finish():
    """The grid's --time-limit: after two outcomes no more tasks are admitted; the tasks in
    progress then are waited for, and the ones never started come back in order."""
    workers = RecordingPool([{"SLOT_MARK": "a"}, {"SLOT_MARK": "b"}], 1, "the context")
    outcomes = []
    try:
        left = workers.run([Job(i) for i in range(6)], outcomes.append, lambda task, slot: None,
                           admit=lambda: len(outcomes) < 2)
    finally:
        workers.close()
    ran = sorted(o[0] for o in outcomes)
    assert len(ran) in (2, 3, 4) and ran == list(range(len(ran)))  # at most one wave past it
    assert [job.index for job in left] == list(range(len(ran), 6))


@dataclass(frozen=True)
class ShapedJob:
    index: int
    shape: str


def compile_then_train(task: ShapedJob, context, notify) -> tuple:
    """A cell that 'compiles' for 1 s, says it is warm, and 'trains' for 1 s."""
    time.sleep(1.0)
    notify({"warm": True})
    warm_at = time.time()
    time.sleep(1.0)
    return task.index, warm_at


class ShapedPool(WorkerPool):
    job = staticmethod(compile_then_train)


@pytest.mark.slow
@pytest.mark.parametrize("warm_first", [False, True])
def test_warm_first_starts_one_task_of_a_shape_and_the_others_once_it_is_warm(warm_first):
    """--warm-first: the second task of shape a waits for the first's warm notice, and the
    free worker takes shape b meanwhile; without it, tasks go in order."""
    workers = ShapedPool([{}, {}], 1, None)
    tasks = [ShapedJob(0, "a"), ShapedJob(1, "a"), ShapedJob(2, "b"), ShapedJob(3, "a")]
    outcomes, dispatched = [], []
    try:
        workers.run(tasks, outcomes.append,
                    lambda task, slot: dispatched.append((task.index, time.time())),
                    shape_of=(lambda task: task.shape) if warm_first else None)
    finally:
        workers.close()
    order = [index for index, _ in dispatched]
    assert sorted(order) == [0, 1, 2, 3] and len(outcomes) == 4
    if not warm_first:
        assert order == [0, 1, 2, 3]
        return
    assert order[:2] == [0, 2]
    warm_at = dict(outcomes)[0]
    assert all(at >= warm_at for index, at in dispatched if index in (1, 3))


def report_index(task: ShapedJob, context, notify) -> int:
    return task.index


class IndexPool(WorkerPool):
    job = staticmethod(report_index)


@pytest.mark.slow
@pytest.mark.parametrize("by_model", [False, True])
def test_a_free_worker_takes_the_next_task_of_its_last_model_first(by_model):
    """`model_of`: a worker that trained model a takes the next pending a before the next
    task in order (it keeps Dynamo's graphs for it); without it, tasks go in order."""
    workers = IndexPool([{}], 1, None)
    tasks = [ShapedJob(0, "a"), ShapedJob(1, "b"), ShapedJob(2, "a"), ShapedJob(3, "b")]
    dispatched = []
    try:
        workers.run(tasks, lambda outcome: None,
                    lambda task, slot: dispatched.append(task.index),
                    model_of=(lambda task: task.shape) if by_model else None)
    finally:
        workers.close()
    assert dispatched == ([0, 2, 1, 3] if by_model else [0, 1, 2, 3])


@pytest.mark.slow
def test_a_task_of_no_model_to_keep_leaves_the_order_alone():
    """`model_of` None (a run that keeps no compiled graphs: CUDA graphs) gives a worker no
    preference: after one, it takes the next task in order."""
    workers = IndexPool([{}], 1, None)
    tasks = [ShapedJob(0, None), ShapedJob(1, "b"), ShapedJob(2, None), ShapedJob(3, "b")]
    dispatched = []
    try:
        workers.run(tasks, lambda outcome: None,
                    lambda task, slot: dispatched.append(task.index),
                    model_of=lambda task: task.shape)
    finally:
        workers.close()
    assert dispatched == [0, 1, 3, 2]


@pytest.mark.slow
def test_a_fresh_worker_in_a_dead_ones_slot_has_no_model_to_keep():
    """The worker that died holding a task of model a took its graphs with it: the one that
    replaces it takes the next task in order, not the next of a."""
    workers = RecordingPool([{}], 1, None)
    dispatched = []
    try:
        workers.run([Job(0, die=True), Job(1), Job(2)], lambda outcome: None,
                    lambda task, slot: dispatched.append(task.index),
                    model_of=lambda task: "a" if task.index in (0, 2) else "b")
    finally:
        workers.close()
    assert dispatched == [0, 1, 2]
