"""The grid end to end (`run_grid`): its options checked, its cells planned and laid out on
this machine's GPUs or CPU workers, its parent run opened, the cells the store does not
hold dispatched, the parent closed, and the summary `gatelab grid` prints.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import torch

from lab import check as lab_check
from lab import records
from lab.errors import LabError, check_positive
from lab.experiments.grid.ahead import start_for_grid
from lab.experiments.grid.cells import CellPool, Outcome, execute_cell, run_ddp_cell
from lab.experiments.grid.claims import GridContext, Plan, Task, reconcile
from lab.experiments.grid.estimate import (auto_runs_per_gpu, expected_cell_s,
                                           finished_hashes, finished_in_store, gpu_memory_gib,
                                           parse_runs_per_gpu, print_dry_run)
from lab.experiments.grid.plots import ParentPlots
from lab.experiments.grid.spec import Cell, parse_shard, plan, shard_cells
from lab.experiments.overrides import override_pairs
from lab.experiments.pool import cpu_threads, gpu_slots, parse_gpus, slot_name, threads_per_worker
from lab.experiments.schema import GridSpec
from lab.interrupts import interruption, note_killed, stop_on_signals
from lab.model.params import count_params
from lab.progress import GridProgress, duration
from lab.records import (HEARTBEAT_TAG, OWNER_TAG, STALE_AFTER_S, child_runs,
                         find_or_create_grid_parent, heartbeat, owner_identity, run_owner_alive)
from lab.training import phases as run_phases
from lab.training.step import compile_shape, kept_shape, use_compile_cache
from lab.training.preflight import preflight


@dataclass
class GridOptions:
    gpus: str | None = None
    # Cells trained at once on each GPU: a small model leaves most of a large GPU idle, so
    # two or more processes per GPU can raise a grid's throughput (memory permitting).
    # "auto": from the measured packing gains (auto_runs_per_gpu).
    runs_per_gpu: int | str = "auto"
    cpu_workers: int = 1
    cpu_threads: int | None = None   # torch threads per CPU worker; None: pool.threads_per_worker
    dry_run: bool = False
    tracking_uri: str | None = None
    shard: str | None = None
    quiet: bool = False
    stale_after_s: float = STALE_AFTER_S
    # `gatelab check` of the grid's variants before the first cell on a GPU (lab/check.py):
    # True, where it has not passed before on this code and device; "force", every variant;
    # False, none.
    check: bool | str = True
    # Seconds from the grid's start after which no cell starts that would not end in time,
    # judged by the longest cell this grid process has run (a time-limited machine or job
    # slot: the cells in progress finish instead of being killed at the limit). None: no limit.
    time_limit_s: float | None = None
    # Worker pools: a cell waits while the first cell of its compiled shape (compile_shape)
    # compiles, and other shapes go first (WorkerPool.run). Off by default: the slot it
    # holds idle is measured against the compile it saves by benchmarks/time_to_verdict.py.
    warm_first: bool = False
    compile_ahead: bool = True  # the later cells' shapes (lab/experiments/grid/ahead.py)


@dataclass
class GridSummary:
    name: str
    cells: int
    already_done: int
    outcomes: list[Outcome]
    busy: int = 0
    killed: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    left_for_time: int = 0  # cells not started because of time_limit_s
    startup_s: float = 0.0  # the grid process's start and imports, before run_grid
    check_s: float = 0.0    # this start's `gatelab check`
    wall_s: float = 0.0     # run_grid, start to end

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FAILED"]

    @property
    def skipped(self) -> list[Outcome]:
        """Cells another process claimed after this one planned them (claim_cell)."""
        return [o for o in self.outcomes if o.status == "SKIPPED"]


_now = time.monotonic  # the --time-limit clock (tests/integration/test_grid.py replaces it)


@dataclass(frozen=True)
class Layout:
    """Where the grid's cells run on this machine, from its options and the cells."""

    gpus: list[str]           # the GPUs given (empty: CPU workers)
    devices: int              # GPUs per cell (train.devices; > 1: DDP)
    runs_per_gpu: int         # cells trained at once on each GPU
    pinned: list              # the pool's GPU slots (gpu_slots)
    workers: int              # cells trained at once
    worker_threads: int       # torch threads per CPU worker
    packing_basis: str | None  # why --runs-per-gpu auto chose what it did

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"


def _check_options(options: GridOptions) -> None:
    if options.time_limit_s is not None:
        check_positive("--time-limit", options.time_limit_s)
    if options.cpu_workers < 1:
        raise LabError(f"--cpu-workers: must be at least 1, got {options.cpu_workers}")
    check_positive("--stale-after", options.stale_after_s)


def _layout(spec: GridSpec, options: GridOptions, gpus: list[str], runs_per_gpu: int | str,
            all_cells: list[Cell], cells: list[Cell]) -> Layout:
    # Small models gain little from intra-op threads and lose much when threads outnumber
    # free cores, so CPU workers split the cores between them (one each for the CPU presets).
    worker_threads = cpu_threads(options.cpu_threads, options.cpu_workers,
                                 all_cells[0].config.model.d_model if all_cells else None)
    devices = cells[0].config.train.devices
    if gpus and devices > len(gpus):
        raise LabError(f"train.devices: {devices} GPUs per run but only {len(gpus)} given "
                       f"({','.join(gpus)})")
    for cell in cells:  # a device or kernel this machine lacks fails here, before any cell
        preflight(cell.config, "cuda" if gpus else "cpu")
    packing_basis = None
    if runs_per_gpu == "auto":
        runs_per_gpu, packing_basis = (1, None) if devices > 1 or not gpus else \
            auto_runs_per_gpu(cells[0].config, gpu_memory_gib())
    if devices > 1 and runs_per_gpu > 1:
        raise LabError("--runs-per-gpu: a DDP cell (train.devices > 1) takes its GPUs whole; "
                       "leave --runs-per-gpu at 1")
    pinned = gpu_slots(gpus, len(gpus) * runs_per_gpu)
    workers = (1 if devices > 1 else len(pinned)) if gpus else options.cpu_workers
    return Layout(gpus, devices, runs_per_gpu, pinned, workers, worker_threads, packing_basis)


def run_grid(spec: GridSpec, options: GridOptions) -> GridSummary:
    """Validate every cell, then run the ones the store does not already hold."""
    started_at = _now()
    startup_s = run_phases.startup_seconds()
    shard = parse_shard(options.shard)
    gpus = parse_gpus(options.gpus)
    _check_options(options)
    runs_per_gpu = parse_runs_per_gpu(options.runs_per_gpu)
    all_cells = plan(spec)
    cells = shard_cells(all_cells, shard)
    layout = _layout(spec, options, gpus, runs_per_gpu, all_cells, cells)
    uri = records.tracking_uri(options.tracking_uri)
    if layout.packing_basis and not options.quiet:
        print(f"grid {spec.name}: --runs-per-gpu auto: {layout.packing_basis}", flush=True)
    if options.dry_run:
        print_dry_run(spec, cells, uri, layout.workers, layout.device,
                      layout.runs_per_gpu if gpus else 1)
        return GridSummary(spec.name, len(cells), 0, [])

    records.check_writable(uri, max(count_params(cell.config)["total"] for cell in
                                    {cell.variant: cell for cell in cells}.values()))
    if trains_in_this_process(layout, options):
        # The training code and Lightning, which only a process that trains imports (9 of
        # the 19 s of a grid's imports on the lent GPU machine: benchmarks/README.md): here
        # part of this process's start-up, as in a worker, not of its first cell.
        importing = time.perf_counter()
        importlib.import_module("lab.training.run")
        startup_s += time.perf_counter() - importing
    # Before the check and the workers, which compile and inherit the environment.
    use_compile_cache()
    done = finished_in_store(uri, spec.name)  # (read only; reconciled after the check)
    to_train = [c for c in cells if c.config_hash not in done]
    todo = [c.config for c in to_train]
    # A pool's workers, and the process that compiles the later cells' shapes, start now, so
    # that their start-up overlaps the check.
    pool = _start_pool(layout, options, todo)
    ahead = None
    try:
        if options.compile_ahead and layout.devices == 1:
            ahead = start_for_grid(todo, layout.workers, layout.runs_per_gpu,
                                   layout.gpus, options.warm_first, f"grid {spec.name}",
                                   options.quiet)
        return _check_and_run(spec, options, cells, all_cells, layout, uri, pool, started_at,
                              startup_s, to_train)
    finally:
        if pool is not None and not pool.begun:  # never handed a cell
            pool.close()
        if ahead is not None:
            ahead.close()


def _check_and_run(spec: GridSpec, options: GridOptions, cells: list[Cell],
                   all_cells: list[Cell], layout: Layout, uri: str, pool: CellPool | None,
                   started_at: float, startup_s: float, to_train: list[Cell]) -> GridSummary:
    """run_grid from the check on: the parent run, the cells, the summary."""
    check_table, check_s = _check_variants(spec, to_train, layout, options)
    client = records.client(uri)
    experiment = records.experiment_id(client, spec.name, uri)
    me = {OWNER_TAG: owner_identity(), HEARTBEAT_TAG: str(int(time.time()))}
    parent = find_or_create_grid_parent(client, experiment, spec.name, extra_tags=me)
    try:  # a refused checkpoint ends the grid here (LabError), before anything trains
        work = reconcile(client, cells, child_runs(client, experiment, parent),
                         options.stale_after_s)
    except LabError as err:
        _release_refused_parent(client, parent, err, options.stale_after_s)
        raise
    ctx = GridContext(uri, spec.name, parent, spec.name, options.quiet, options.stale_after_s,
                      layout.runs_per_gpu if layout.gpus and layout.devices == 1 else 0,
                      check_s / max(1, len(work.tasks)))
    dispatch = Dispatch(_progress(spec.name, work, layout.workers, options.quiet), started_at,
                        options.time_limit_s)
    if options.time_limit_s is not None:
        dispatch.expect([t.config for t in work.tasks], uri, layout, spec.name, options.quiet)
    with stop_on_signals(), heartbeat(client, parent):  # SIGINT, SIGTERM: runs end KILLED
        try:
            _open_parent(client, parent, me, spec, check_table)
            left = _run_cells(work.tasks, layout, options, ctx, dispatch, pool)
        except KeyboardInterrupt as err:
            stop = interruption(err)
            note_killed()
            client.set_terminated(parent, "KILLED")
            client.set_tag(parent, records.KILLED_REASON_TAG, f"stopped by {stop.name}")
            raise stop from None
    summary = GridSummary(spec.name, len(cells), len(work.done), dispatch.outcomes,
                          len(work.busy), work.killed, parent, len(left), startup_s, check_s,
                          _now() - started_at)
    _close_parent(client, experiment, parent, {c.config_hash for c in all_cells}, summary)
    return summary


def _check_variants(spec: GridSpec, cells: list[Cell], layout: Layout,
                    options: GridOptions) -> tuple[dict | None, float]:
    """`gatelab check` on a GPU (lab/check.py) of the variants of `cells`, the ones the store
    did not hold finished (a variant whose cells have all run trains nothing to check), and
    its seconds."""
    checking = time.perf_counter()
    check_table = None
    if layout.gpus and options.check and cells:
        check_table = lab_check.check_before_training(
            spec.preset, list(dict.fromkeys(c.variant for c in cells)),
            override_pairs(spec.overrides), options.quiet,
            log=lambda line: print(f"grid {spec.name}: {line}", flush=True),
            force=options.check == "force")
    return check_table, time.perf_counter() - checking


def _open_parent(client, parent: str, me: dict, spec: GridSpec, check_table) -> None:
    """The parent RUNNING under this process, with the grid file and this start's check."""
    client.update_run(parent, status="RUNNING")
    for key, value in me.items():  # this process's now (_release_refused_parent)
        client.set_tag(parent, key, value)
    records.log_yaml(client, parent, spec.to_dict(), "grid.yaml")
    if check_table is not None:  # this start's check (a resumed grid adds its own)
        records.log_check_table(client, parent, check_table)


@dataclass
class Dispatch:
    """The cells this process starts: each one's start and outcome on the progress lines,
    and, under --time-limit, whether the next one may start at all."""

    progress: GridProgress
    started_at: float
    time_limit_s: float | None
    outcomes: list[Outcome] = field(default_factory=list)
    dispatched_at: dict[int, float] = field(default_factory=dict)
    longest_s: float = 0.0  # the longest cell so far, dispatch to outcome, packing included
    expected_s: float = 0.0  # a cell's time from the store's measurements, until one ends here

    def expect(self, configs: list, uri: str, layout: Layout, grid: str, quiet: bool) -> None:
        """Under a time limit, the first cells are admitted by what the store measured for
        the preset on this device, packing included (estimate.expected_cell_s): no GPU holds
        more cells than there are to run (the last cells of a grid may each run alone). Not
        for a DDP cell: the store's rate is one GPU's, and how a cell over several scales is
        not measured, so the first one starts as before."""
        if layout.gpus and layout.devices > 1:
            return
        per_gpu = min(layout.runs_per_gpu, len(configs)) if layout.gpus else 1
        expected = expected_cell_s(configs, uri, layout.device, per_gpu)
        if expected is not None:
            self.expected_s = expected[0]
            if not quiet:
                print(f"grid {grid}: --time-limit: {expected[1]}", flush=True)

    def admit(self) -> bool:
        """A cell may start: no limit, or the longest cell so far (before any has ended
        here, the measured expectation) still fits before it."""
        if self.time_limit_s is None:
            return True
        return _now() + (self.longest_s or self.expected_s) < self.started_at + self.time_limit_s

    def dispatched(self, task: Task, where) -> None:
        self.dispatched_at[task.index] = _now()
        resumed = " (resuming from its checkpoint)" if task.resumed else ""
        self.progress.started_cell(f"{task.name}{resumed}" + (f" on {where}" if where else ""))

    def finished(self, outcome: Outcome) -> None:
        if outcome.index in self.dispatched_at:
            self.longest_s = max(self.longest_s, _now() - self.dispatched_at[outcome.index])
        self.outcomes.append(outcome)
        self.progress.cell_done(outcome.name, outcome.text(), outcome.status == "FAILED")

    def in_turn(self, tasks: list[Task], where, run_one) -> list[Task]:
        """The cells one after another in this process; those a time limit left unstarted."""
        for n, task in enumerate(tasks):
            if not self.admit():
                return tasks[n:]
            self.dispatched(task, where)
            self.finished(run_one(task))
        return []


def _uses_pool(layout: Layout, options: GridOptions) -> bool:
    """Whether a pool of worker processes trains the grid's cells (_run_cells)."""
    return not (layout.devices > 1 and layout.gpus) and not trains_in_this_process(layout, options)


def _start_pool(layout: Layout, options: GridOptions, todo: list) -> CellPool | None:
    """The grid's pool, its workers started before its check and its parent run (each then
    imports the training code: 13-21 s a spawned worker on the lent H100 machine, which
    followed a 30-60 s check before; benchmarks/README.md), or None: no pool trains here,
    or no cell is `todo` (the store holds every one FINISHED)."""
    if not _uses_pool(layout, options) or not todo:
        return None
    return _new_pool(layout, options)


def _new_pool(layout: Layout, options: GridOptions) -> CellPool:
    """A worker started for each slot (the GPU slots, or `--cpu-workers` on the CPU); each
    waits for the context its cells run in (WorkerPool.begin)."""
    slots = layout.pinned or gpu_slots([], options.cpu_workers)
    threads = threads_per_worker(len(layout.pinned)) if layout.gpus else layout.worker_threads
    return CellPool(slots, threads)


def _run_cells(tasks: list[Task], layout: Layout, options: GridOptions, ctx: GridContext,
               dispatch: Dispatch, pool: CellPool | None = None) -> list[Task]:
    """Every task, as a DDP job over the GPUs, in this process, or by a pool of workers
    (`pool`, started before the check, or started here); returns those a time limit left
    unstarted."""
    gpus = layout.gpus
    if not tasks:
        return []
    if layout.devices > 1 and gpus:
        return dispatch.in_turn(tasks, f"GPUs {','.join(gpus)} (DDP)",
                                lambda task: run_ddp_cell(task, ctx, gpus))
    if trains_in_this_process(layout, options):
        if not gpus:
            _set_threads(layout.worker_threads)
        return dispatch.in_turn(tasks, None, lambda task: execute_cell(task, ctx))
    if pool is None:
        pool = _new_pool(layout, options)
    pool.begin(ctx)
    plots = ParentPlots(ctx.uri)

    def finished(outcome: Outcome) -> None:
        if outcome.unplotted is not None:
            plots.draw(outcome.run_id, outcome.unplotted)
            outcome.unplotted = None
        dispatch.finished(outcome)

    try:
        warm_first = {"shape_of": lambda task: compile_shape(task.config)} \
            if options.warm_first else {}
        left = pool.run(tasks, finished,
                        lambda task, slot: dispatch.dispatched(task, slot_name(slot)),
                        dispatch.admit, model_of=lambda task: kept_shape(task.config),
                        **warm_first)
    except BaseException as err:
        stop = interruption(err)
        pool.close(stop.signum if stop is not None else None)
        plots.close()
        raise
    pool.close()
    plots.close()
    return left


def trains_in_this_process(layout: Layout, options: GridOptions) -> bool:
    """Whether the grid's cells train in its own process, one after another: one worker, on
    the CPU or on all (here: the one) GPU; with more, or with GPUs named, a pool of workers
    trains them (and a DDP cell, a job of its own)."""
    return not (layout.devices > 1 and layout.gpus) and layout.workers == 1 and \
        not (layout.gpus and options.gpus not in (None, "all"))


def _release_refused_parent(client, parent: str, err: LabError, stale_after_s: float) -> None:
    """A grid that refuses to resume leaves no parent RUNNING for good: the parent it has
    just created, or one a SIGKILLed grid left RUNNING (its owner gone, or without an owner:
    made before parents had one), ends FAILED saying why; one a live grid process holds is
    left to it."""
    run = client.get_run(parent)
    if run.info.status != "RUNNING":
        return
    owner = run.data.tags.get(OWNER_TAG)
    if owner and owner != owner_identity() and run_owner_alive(run, stale_after_s):
        return
    client.set_tag(parent, records.FAILURE_KIND_TAG, "config")
    client.set_tag(parent, records.FAILURE_TAG, f"resume refused: {err}"[:4000])
    client.set_terminated(parent, "FAILED")


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _progress(name: str, work: Plan, workers: int, quiet: bool):
    progress = GridProgress(name, len(work.tasks), len(work.done), workers, quiet)
    if work.killed:
        progress.say(f"marked {len(work.killed)} run(s) of a dead grid process KILLED")
    if work.done:
        progress.say(f"{len(work.done)} cell(s) already FINISHED in the store: skipped")
    if work.busy:
        progress.say(f"{len(work.busy)} cell(s) are running in another live process: left to it")
    progress.say(f"{len(work.tasks)} cell(s) to run")
    return progress


def _close_parent(client, experiment: str, parent: str, wanted: set[str],
                  summary: GridSummary) -> None:
    """FINISHED once every cell of the whole grid has a FINISHED run; FAILED when cells
    failed; left RUNNING while other shards or processes still work on it."""
    if wanted <= finished_hashes(child_runs(client, experiment, parent)):
        client.set_terminated(parent, "FINISHED")
    elif summary.failed:
        client.set_terminated(parent, "FAILED")


def describe_summary(summary: GridSummary) -> str:
    ran = len(summary.outcomes) - len(summary.skipped)
    finished = summary.already_done + ran - len(summary.failed)
    elsewhere = summary.busy + len(summary.skipped)
    lines = [f"grid {summary.name}: {finished}/{summary.cells} cells FINISHED "
             f"({ran} run now, {summary.already_done} already finished"
             + (f", {elsewhere} left to other processes" if elsewhere else "") + ")"]
    if summary.left_for_time:
        lines.append(f"  {summary.left_for_time} cell(s) not started: the next would not have "
                     "ended within --time-limit; rerun the same command to go on")
    for outcome in summary.failed:
        lines.append(f"  FAILED {outcome.name}: {outcome.failure}")
    if summary.failed:
        lines.append("  rerun the same command to retry failed cells; finished cells are kept")
    timed = [o for o in summary.outcomes if o.phases]
    if timed:
        sums: dict[str, float] = {}
        for outcome in timed:
            for name, seconds in outcome.phases.items():
                sums[name] = sums.get(name, 0.0) + seconds
        lines.append(f"  {run_phases.breakdown(sums, len(timed))}; the grid: "
                     f"{duration(summary.wall_s)} wall, {summary.startup_s:.0f} s start, "
                     f"{summary.check_s:.0f} s check")
    return "\n".join(lines)

