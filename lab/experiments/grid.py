"""The ablation grid: a YAML file -> validated cells -> workers -> one MLflow run per cell.

A grid file (`ablations/*.yaml`) names the experiment, the preset, the data, the token
budget, the variants, the seeds, the learning rates and config overrides. Every cell
(variant x lr x seed) is resolved through `lab.config.resolve` and its data opened before
anything is written to MLflow, so a typo costs nothing.

MLflow layout: one experiment per grid name; one parent run per grid (found again on a
rerun); one child run per cell named `variant/lr=.../seed=...`, tagged variant, lr, seed,
preset and config_hash (the hash of the fully resolved config: the cell's identity).

Resume. A rerun skips cells that have a FINISHED child run with the same config_hash. A
child run still RUNNING is alive only if its owner is: each run carries the tag
`gatelab.owner` = `host:pid:start`, the process that executes it (its start time from
/proc guards against a reused pid). On the owner's host the run is dead when that process
is gone; from another host it is dead when its `gatelab.heartbeat` tag (refreshed every
HEARTBEAT_S by the worker, lab.records.heartbeat) is older than `stale_after_s`. Dead runs
are marked KILLED and their cell continues in the same run from its last checkpoint
(`train_run(run_id=...)`), so a cell ends with exactly one FINISHED run; a killed run
without a checkpoint stays KILLED and the cell starts a fresh run. Worker processes watch
the grid process's identity and end within a second of it, so a SIGKILLed grid leaves no
orphan writing to the store.

One claim per cell. Any number of grid processes (shards, a second invocation) may work on
one store, so before a cell trains it is claimed: the parameter
`gatelab.claim/<config_hash>/<attempt>` = `<owner>@<unix time>` logged on the grid's parent
run. MLflow refuses to change a logged parameter (in one database transaction), so of two
processes claiming the same attempt exactly one succeeds; the other reads the holder and
leaves the cell to it while the holder lives (owner_alive; for another host the newer of the
claim's time and its run's heartbeat counts), or claims the next attempt once the holder is
dead. The winner then reads the store again, so a cell FINISHED in the meantime is not
trained twice. The parent itself is one per grid name: created under a lock beside a SQLite
store, and settled by lab.records.find_or_create_run on other stores.

Failures are per cell: a run that fails (CUDA out of memory, a full disk, any error) is
marked FAILED with the tag `gatelab.failure` saying why, and the grid moves on. A diverged
run is FINISHED with the tag `diverged=true` (lab/training/run.py) and is not rerun.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException

from lab import check as lab_check
from lab import records
from lab.config import RunConfig, from_dict, resolve, with_vocab
from lab.errors import LabError, check_positive
from lab.experiments.overrides import override_pairs
from lab.experiments.pool import (WorkerPool, cpu_threads, die_with_parent, fail_run, gpu_slots,
                                  parse_gpus, slot_name, threads_per_worker)
from lab.experiments.schema import GridSpec, grid_from_dict, load_grid, with_cli  # noqa: F401
from lab.interrupts import interruption, note_killed, stop_on_signals
from lab.model.variants import VARIANTS
from lab.model.loss import require as require_loss_kernel
from lab.model.params import count_params, model_flops_per_token
from lab.progress import GridProgress, configure_output, duration
from lab.records import (DEVICE_TAG, GRID_TAG, HEARTBEAT_TAG, OWNER_TAG, STALE_AFTER_S,
                         checkpoint_dir, child_runs, describe_failure, end_run,
                         find_or_create_grid_parent, heartbeat, kill_dead_run, load_checkpoint,
                         owner_alive, owner_identity, run_owner_alive, start_run)
from lab.training import phases as run_phases
from lab.training.callbacks import FirstStepNotice, RunProgress
from lab.training.module import use_compile_cache
from lab.training.run import open_data, train_run
from lab.training.schedule import total_steps

CLAIM_PARAM = "gatelab.claim"  # on the parent: gatelab.claim/<config_hash>/<attempt> = owner@time
RUNS_PER_GPU_TAG = "gatelab.runs_per_gpu"  # on a GPU cell's run: cells sharing its GPU then
CLAIM_TAG = "gatelab.claim"    # on a cell's run: the <config_hash>/<attempt> it trains under

# Time estimate without measurements: 6 N FLOPs per token (Kaplan et al., 2020) at a rate
# we assume per worker, plus a fixed cost per run (process, store, validation and test).
ASSUMED_FLOPS = {"cpu": 1.5e10, "cuda": 1e14}
ASSUMED_RUN_OVERHEAD_S = 5.0


# --- cells ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    variant: str
    lr: float
    seed: int
    config: RunConfig          # resolved, with the data's vocabulary

    @property
    def name(self) -> str:
        return records.cell_name(self.variant, self.lr, self.seed)

    @property
    def config_hash(self) -> str:
        return self.config.hash()


def _variants(spec: GridSpec) -> list[str]:
    """`all`: every registered variant that resolves at the grid's preset (MoE-only variants
    drop out of a dense preset); an explicit list must resolve entirely."""
    if spec.variants != "all":
        return list(spec.variants)
    available = []
    for slug in VARIANTS:
        try:
            resolve(slug, spec.preset, spec.overrides, data=spec.data, tokens=spec.tokens)
            available.append(slug)
        except LabError:
            continue
    return available


def _learning_rates(spec: GridSpec, variants: list[str]) -> dict[str, tuple[float, ...] | None]:
    if spec.lr_sweep is None:
        return {v: spec.lrs for v in variants}
    # Imported here: the sweep brings Optuna (0.45 s to import, measured with -X importtime),
    # which only a grid that takes its learning rates from a sweep needs.
    from lab.experiments.sweep import best_lrs

    best = best_lrs(spec.lr_sweep)
    missing = [v for v in variants if v not in best]
    if missing:
        raise LabError(f"lrs.from_sweep: sweep {spec.lr_sweep!r} has no best LR for "
                       f"{', '.join(missing)}; run the sweep for them or list lrs")
    return {v: (float(best[v]),) for v in variants}


def plan(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, resolved and validated, with its data opened (a missing or
    corrupt corpus fails here, before any run). Seeds outermost, so a grid stopped half-way
    already holds whole comparisons at its first seeds."""
    variants = _variants(spec)
    if not variants:
        raise LabError(f"variants: none is available at preset {spec.preset!r}")
    lrs = _learning_rates(spec, variants)
    configs = []
    for seed in spec.seeds:
        for variant in variants:
            for lr in lrs[variant] or (None,):
                config = resolve(variant, spec.preset, spec.overrides, data=spec.data,
                                 tokens=spec.tokens, seed=seed, lr=lr)
                configs.append(config)
    opened: dict = {}
    cells = []
    for config in configs:
        key = dataclasses.astuple(config.data)
        if key not in opened:
            opened[key] = open_data(config)[0].vocab_size
        config = with_vocab(config, opened[key])
        cells.append(Cell(config.variant, config.train.lr, config.train.seed, config))
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise LabError(f"--shard: expected i/n with 0 <= i < n, e.g. 0/2, got {text!r}")
    return int(match[1]), int(match[2])


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Cell k belongs to shard k mod n: every machine gets a mix of variants and seeds."""
    if shard is None:
        return cells
    index, count = shard
    return [cell for k, cell in enumerate(cells) if k % count == index]


# --- packing cells onto a GPU -------------------------------------------------------------

# Aggregate tokens/s of N cells trained at once on one GPU, over one cell's, and each cell's
# peak memory: measured with benchmarks/packing.py on an H200 (torch 2.11, compiled, bf16,
# the preset's defaults; benchmarks/README.md, "Packing"). Presets not measured run alone.
# 2026-12-02, after the graph-break fix made one cell 1.9x faster: 2 cells 1.37x (3 and 4
# not reached within that call; the earlier 1.69x and 1.83x were of the slower cells).
# `base`, 2026-12-03, in real `reproduce-base` cells (each cell's logged
# throughput/tokens_per_s_mean, docs/store/reproduce-base.tar.xz): 2 at once 392k + 415k
# against 852-913k alone, so 0.90x: a 51M cell keeps the GPU busy and another one only costs.
MEASURED_PACKING = {"small": {"speedup": {1: 1.0, 2: 1.37}, "peak_gib": 3.9},
                    "base": {"speedup": {1: 1.0, 2: 0.90}, "peak_gib": 21.2}}
# Another cell per GPU must add at least this fraction of one cell's tokens/s to be worth it
# (each cell then takes N / speed-up times longer).
PACKING_MIN_GAIN = 0.1
GPU_MEMORY_HEADROOM = 0.8   # of the device's memory, for the packed cells' peaks together


def auto_runs_per_gpu(preset: str, gpu_memory_gib: float | None) -> tuple[int, str]:
    """Cells per GPU for `--runs-per-gpu auto`, and the sentence saying why."""
    measured = MEASURED_PACKING.get(preset)
    if measured is None:
        return 1, f"one cell per GPU (no packing measurement for preset {preset!r})"
    speedup = measured["speedup"]
    n = 1
    while n + 1 in speedup and speedup[n + 1] - speedup[n] >= PACKING_MIN_GAIN:
        n += 1
    if gpu_memory_gib:
        n = max(1, min(n, int(GPU_MEMORY_HEADROOM * gpu_memory_gib // measured["peak_gib"])))
    return n, (f"{n} cells per GPU: measured {speedup[n]:.2f}x one cell's tokens/s at "
               f"{preset} (benchmarks/packing.py), {measured['peak_gib']:.1f} GiB each")


def parse_runs_per_gpu(value) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise LabError(f"--runs-per-gpu: must be at least 1, or auto, got {value!r}")
    return number


def packing_speedup(preset: str, runs_per_gpu: int) -> float:
    """Measured aggregate speed-up of `runs_per_gpu` cells on a GPU (1 where not measured)."""
    return MEASURED_PACKING.get(preset, {}).get("speedup", {}).get(runs_per_gpu, 1.0) \
        if runs_per_gpu > 1 else 1.0


def compile_shape(config: RunConfig) -> str:
    """What decides a cell's compiled graph (the model, the micro-batch, the compile mode,
    the precision and the loss kernel; not the seed or the learning rate): cells with the
    same value load each other's graphs from Inductor's cache (--warm-first)."""
    t = config.train
    return json.dumps([dataclasses.asdict(config.model), t.micro_batch, t.compile, t.compile_mode,
                       t.precision, t.fused_loss], sort_keys=True, default=str)


def _gpu_memory_gib() -> float | None:
    # Device properties need no CUDA context on the device (GPU workers are spawned anyway).
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30 \
        if torch.cuda.is_available() else None


# --- time estimate ---------------------------------------------------------------------

def _no_store_yet(uri: str) -> bool:
    """A SQLite store not created yet: a dry run reads it as empty rather than create it."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def run_device_kind(run) -> str:
    """"cuda" or "cpu": what a run trained on, by its `device` tag (lab/training/run.py), or
    for runs recorded before that tag, by the peak GPU memory only CUDA runs log."""
    device = run.data.tags.get(DEVICE_TAG)
    if device is not None:
        return "cpu" if device == "cpu" else "cuda"
    return "cuda" if "memory/peak_gib" in run.data.metrics else "cpu"


def measured_tokens_per_s(uri: str, preset: str, data: str, device: str
                          ) -> tuple[float, int] | None:
    """Median end-to-end tokens/s (tokens seen / wall time, overheads included) of FINISHED
    runs of this preset and data that trained on this kind of device ("cuda" or "cpu"), each
    as one cell alone on its GPU would run: a run that shared its GPU with k - 1 others
    (its RUNS_PER_GPU_TAG) ran at packing_speedup(k) / k of that. None without any."""
    if _no_store_yet(uri):
        return None
    try:
        client = records.client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, f"attributes.status = 'FINISHED' and "
                                  f"tags.preset = '{preset}' and tags.data = '{data}'",
                                  max_results=500) if experiments else []
    except Exception:  # an unreadable store only means no measurement
        return None
    rates = []
    for run in runs:
        wall, seen = run.data.metrics.get("time/wall_s"), run.data.metrics.get("tokens/seen")
        if not (wall and seen) or run_device_kind(run) != device:
            continue
        shared = int(run.data.tags.get(RUNS_PER_GPU_TAG, "1"))
        rates.append(seen / wall * shared / packing_speedup(preset, shared))
    rates.sort()
    return (rates[len(rates) // 2], len(rates)) if rates else None


def finished_hashes(runs) -> set[str]:
    """The config hashes of the cells these runs hold FINISHED."""
    return {r.data.tags.get("config_hash") for r in runs if r.info.status == "FINISHED"}


def finished_in_store(uri: str, grid: str) -> set[str]:
    """finished_hashes of the grid's cells in the store (read only: a dry run creates
    nothing)."""
    found = None if _no_store_yet(uri) else records.grid_cell_runs(records.client(uri), grid)
    return set() if found is None else finished_hashes(found[1])


def estimate(cells: list[Cell], counts: list[dict], uri: str, workers: int,
             device: str) -> tuple[list[float], str]:
    """Seconds per cell (one cell alone on its worker) and a sentence saying what the
    estimate rests on."""
    spec = cells[0].config
    measured = measured_tokens_per_s(uri, spec.preset, spec.data.source, device)
    if measured:
        rate, n = measured
        seconds = [c.config.train.tokens / rate for c in cells]
        basis = (f"median of {n} finished {spec.preset} runs on {device} in the store: "
                 f"{rate:,.0f} tokens/s end to end, one cell alone")
    else:
        flops = ASSUMED_FLOPS[device]
        seconds = [model_flops_per_token(c.config, n) * c.config.train.tokens / flops
                   + ASSUMED_RUN_OVERHEAD_S for c, n in zip(cells, counts)]
        basis = (f"model FLOPs x tokens at an assumed {flops:.1e} FLOP/s per {device} "
                 f"worker + {ASSUMED_RUN_OVERHEAD_S:.0f} s per run (no finished runs of this "
                 f"preset on {device} in the store to measure)")
    return seconds, basis


def print_dry_run(spec: GridSpec, cells: list[Cell], uri: str, workers: int, device: str,
                  per_gpu: int = 1) -> None:
    """`per_gpu` cells sharing a GPU each run slower by per_gpu / (their measured aggregate
    gain, packing_speedup), which the estimate includes. Cells already FINISHED in the store
    are listed as done and left out of the time: the grid would skip them."""
    counts = [count_params(c.config) for c in cells]
    seconds, basis = estimate(cells, counts, uri, workers, device)
    packed_speedup = packing_speedup(spec.preset, per_gpu)
    if per_gpu > 1:
        seconds = [s * per_gpu / packed_speedup for s in seconds]
        basis += f"; {per_gpu:.0f} cells per GPU at {packed_speedup:.2f}x one cell's tokens/s"
    done = finished_in_store(uri, spec.name)
    width = max(len(c.name) for c in cells)
    print(f"grid {spec.name}: {len(cells)} cells, preset {spec.preset}, data {spec.data}, "
          f"{cells[0].config.train.tokens:,.0f} tokens per run")
    print(f"{'cell':{width}}  {'params':>12}  {'added':>10}  {'est.':>8}  config_hash")
    left = []
    for cell, count, secs in zip(cells, counts, seconds):
        finished = cell.config_hash in done
        if not finished:
            left.append(secs)
        print(f"{cell.name:{width}}  {count['total']:>12,}  {count['added']:>10,}  "
              f"{'done' if finished else duration(secs):>8}  {cell.config_hash}")
    total = sum(left) / max(1, min(workers, len(left)))
    already = f" ({len(cells) - len(left)} already FINISHED in the store)" if len(left) < len(cells) \
        else ""
    print(f"estimated time: {duration(total)} for {len(left)} cell(s) to run{already} on "
          f"{workers} {device} worker(s)")
    # (the basis on lines of its own: the dry run fits a 120-column terminal)
    print(textwrap.fill(f"basis: {basis}", 120, subsequent_indent="  "))


# --- the store ------------------------------------------------------------------------

@dataclass
class Task:
    index: int
    name: str
    config: RunConfig
    run_id: str | None = None      # an existing run to continue (resume, or pre-created)
    resumed: bool = False
    claim: str | None = None       # <config_hash>/<attempt> this process holds (claim_cell)


@dataclass
class Outcome:
    index: int
    name: str
    status: str                    # FINISHED, FAILED, or SKIPPED (left to another process)
    run_id: str | None = None
    val_ppl: float | None = None
    diverged_step: int | None = None
    wall_s: float = 0.0
    failure: str | None = None
    # Seconds per phase of the cell's run (lab/training/phases.py), for the grid's time line.
    phases: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        if self.status == "SKIPPED":
            return f"left to another process ({self.failure})"
        if self.status != "FINISHED":
            return f"FAILED: {self.failure}"
        if self.diverged_step is not None:
            return f"diverged at step {self.diverged_step} (FINISHED, tagged diverged)"
        return f"val/ppl {self.val_ppl:.3f} in {self.wall_s:.0f} s"


@dataclass
class Plan:
    tasks: list[Task]
    done: list[Cell]
    busy: list[Cell]
    killed: list[str]


def reconcile(client, cells: list[Cell], runs: list, stale_after_s: float = STALE_AFTER_S) -> Plan:
    """What each cell needs: nothing (a FINISHED run), nothing now (a live RUNNING run), a
    resume (a dead run with a checkpoint), or a fresh run. Dead RUNNING runs become KILLED.
    A checkpoint to resume from is read here (its plain data only, lab.records.load_checkpoint):
    one that is refused stops the grid with one line before anything trains."""
    by_hash: dict[str, list] = {}
    for run in runs:
        by_hash.setdefault(run.data.tags.get("config_hash"), []).append(run)
    tasks, done, busy, killed = [], [], [], []
    for index, cell in enumerate(cells):
        mine = sorted(by_hash.get(cell.config_hash, []), key=lambda r: r.info.start_time)
        if any(r.info.status == "FINISHED" for r in mine):
            done.append(cell)
            continue
        live = False
        for run in mine:
            if run.info.status != "RUNNING":
                continue
            if run_owner_alive(run, stale_after_s):
                live = True
                continue
            kill_dead_run(client, run, "the grid resumed")
            killed.append(run.info.run_id)
        if live:
            busy.append(cell)
            continue
        resumable = [r for r in mine if (r.info.status == "KILLED" or r.info.run_id in killed)
                     and (checkpoint_dir(r.info.run_id) / "last.ckpt").exists()]
        if resumable:
            run_id = resumable[-1].info.run_id
            path = checkpoint_dir(run_id) / "last.ckpt"
            try:
                load_checkpoint(path, "grid", mmap=True)
            except LabError as err:
                raise LabError(f"{err}; remove it (rm {path}) to run {cell.name} from the "
                               "start") from None
            tasks.append(Task(index, cell.name, cell.config, run_id, True))
        else:
            tasks.append(Task(index, cell.name, cell.config))
    return Plan(tasks, done, busy, killed)


# --- running one cell -------------------------------------------------------------------

@dataclass(frozen=True)
class GridContext:
    uri: str
    experiment: str
    parent_run_id: str
    grid: str
    quiet: bool
    stale_after_s: float = STALE_AFTER_S
    runs_per_gpu: int = 0  # cells sharing each GPU (0: CPU workers, or a DDP cell's GPUs)
    check_share_s: float = 0.0  # this start's `gatelab check` over the cells it starts


def create_cell_run(task: Task, ctx: GridContext, owner: str) -> str:
    tags = {GRID_TAG: ctx.grid, OWNER_TAG: owner, HEARTBEAT_TAG: str(int(time.time()))}
    if ctx.runs_per_gpu:
        tags[RUNS_PER_GPU_TAG] = str(ctx.runs_per_gpu)
    if task.claim:
        tags[CLAIM_TAG] = task.claim
    return start_run(task.config, ctx.uri, ctx.experiment, task.name, ctx.parent_run_id, tags)


def cell_runs(client, ctx: GridContext, config_hash: str) -> list:
    experiment_id = client.get_run(ctx.parent_run_id).info.experiment_id
    return records.search_all(client, experiment_id,
                               f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and "
                               f"tags.config_hash = '{config_hash}'")


def _claim_alive(holder: str, runs: list, stale_after_s: float) -> bool:
    """Whether the process that holds a claim (`owner@time`) may still be training the cell:
    on this host, whether it exists; from another host, whether the claim or the cell's
    running run has been refreshed within stale_after_s (lab.records.owners.owner_alive)."""
    owner, _, claimed_at = holder.rpartition("@")
    beats = [claimed_at] + [r.data.tags.get(HEARTBEAT_TAG) for r in runs
                            if r.info.status == "RUNNING"]
    times = []
    for beat in beats:
        try:
            times.append(float(beat))
        except (TypeError, ValueError):
            continue
    return owner_alive(owner, str(max(times)) if times else None, stale_after_s)


def claim_cell(task: Task, ctx: GridContext, owner: str) -> tuple[Task | None, str]:
    """Claim the task's cell for `owner` (see the module's docstring) -> (the task to run, as
    the store now says: fresh, or resuming a dead run, with its claim; "") or (None, why the
    cell is left to another process)."""
    client = records.client(ctx.uri)
    config_hash = task.config.hash()
    prefix = f"{CLAIM_PARAM}/{config_hash}/"
    while True:
        params = client.get_run(ctx.parent_run_id).data.params
        attempts = sorted(int(key[len(prefix):]) for key in params
                          if key.startswith(prefix) and key[len(prefix):].isdigit())
        runs = cell_runs(client, ctx, config_hash)
        if any(r.info.status == "FINISHED" for r in runs):
            return None, "FINISHED by another process"
        if attempts:
            holder = params[f"{prefix}{attempts[-1]}"]
            if holder.rpartition("@")[0] == owner:  # an earlier call of this same process
                claim = f"{config_hash}/{attempts[-1]}"
                break
            if _claim_alive(holder, runs, ctx.stale_after_s):
                return None, f"claimed by {holder.rpartition('@')[0]}, which is alive"
        attempt = (attempts[-1] if attempts else 0) + 1
        key = f"{prefix}{attempt}"
        try:
            client.log_param(ctx.parent_run_id, key, f"{owner}@{int(time.time())}")
        except MlflowException:
            if key not in client.get_run(ctx.parent_run_id).data.params:
                raise  # not a lost race: the store refused the write
            continue  # another process claimed this attempt first: look again
        claim = f"{config_hash}/{attempt}"
        break
    # Held: what the cell needs is read again, after the claim (a run may have FINISHED or
    # died since this grid planned).
    cell = Cell(task.config.variant, task.config.train.lr, task.config.train.seed, task.config)
    now = reconcile(client, [cell], cell_runs(client, ctx, config_hash), ctx.stale_after_s)
    if now.done:
        return None, "FINISHED by another process"
    if now.busy:
        return None, "running in another live process"
    fresh = now.tasks[0]
    return dataclasses.replace(task, run_id=fresh.run_id, resumed=fresh.resumed,
                               claim=claim), ""


def execute_cell(task: Task, ctx: GridContext, on_start=None, lead_rank: bool = True,
                 on_first_step=None) -> Outcome:
    """Run one cell in this process: create (or take over) its run and train it. Any failure
    is recorded on the run and returned; an interrupt propagates (the run ends KILLED).
    `on_first_step()` is called once the run's first step (its compile) is done."""
    client = records.client(ctx.uri)
    run_id, holding = task.run_id, False   # holding: the run is this process's to close
    started = time.time()
    claiming = time.perf_counter()
    try:
        if lead_rank and task.claim is None:
            claimed, why = claim_cell(task, ctx, owner_identity())
            if claimed is None:
                return Outcome(task.index, task.name, "SKIPPED", failure=why)
            task, run_id = claimed, claimed.run_id
        holding = lead_rank
        if run_id is None:
            run_id = create_cell_run(task, ctx, owner_identity())
        elif lead_rank:
            client.set_tag(run_id, OWNER_TAG, owner_identity())
            client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            if task.claim:
                client.set_tag(run_id, CLAIM_TAG, task.claim)
            if task.resumed:
                client.set_tag(run_id, "gatelab.resumed", "true")
        if on_start:
            on_start(run_id)
        config = task.config
        callbacks = [] if ctx.quiet else [RunProgress(
            task.name, total_steps(config), config.train.batch_size * config.model.context)]
        if on_first_step is not None:
            callbacks.append(FirstStepNotice(on_first_step))
        # The claim and the run's creation are the cell's store writes before its run starts.
        before = {"store": time.perf_counter() - claiming, "check_share": ctx.check_share_s}
        with heartbeat(client, run_id) if lead_rank else nullcontext():
            result = train_run(config, ctx.uri, ctx.experiment, run_id=run_id, quiet=True,
                               callbacks=callbacks, phases=before)
        return Outcome(task.index, task.name, "FINISHED", run_id, result.metrics.get("val/ppl"),
                       result.diverged_step, time.time() - started,
                       phases=run_phases.phase_seconds(result.metrics))
    except KeyboardInterrupt as err:  # a stop signal before train_run took the run over
        if holding and run_id is not None:
            end_run(client, run_id, task.config, err)
        raise
    except Exception as err:
        kind, message = describe_failure(err, task.config)
        if lead_rank:
            try:  # best effort: on a full disk the store may refuse this too
                fail_run(ctx.uri, run_id, kind, message)
            except Exception:
                pass
        _release_memory()
        return Outcome(task.index, task.name, "FAILED", run_id, wall_s=time.time() - started,
                       failure=message)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- worker processes -------------------------------------------------------------------

def run_cell_in_worker(task: Task, ctx: GridContext, notify) -> Outcome:
    """A cell in a pool worker: the pool hears of its run as soon as it exists, and when its
    first step is done (WorkerPool.run's warm-up of a shape)."""
    return execute_cell(task, ctx, on_start=lambda run_id: notify({"run_id": run_id}),
                        on_first_step=lambda: notify({"warm": True}))


class CellPool(WorkerPool):
    """The grid's workers (lab/experiments/pool.py): a cell whose worker died ends FAILED,
    `gatelab.failure_kind=worker_died`, and the grid goes on."""

    job = staticmethod(run_cell_in_worker)

    def crashed(self, task: Task, started: dict, reason: str) -> Outcome:
        fail_run(self.context.uri, started.get("run_id"), "worker_died", reason)
        return Outcome(task.index, task.name, "FAILED", started.get("run_id"), failure=reason)


def run_ddp_cell(task: Task, ctx: GridContext, gpus: list[str]) -> Outcome:
    """A cell with train.devices > 1: one Lightning DDP job over the grid's GPUs, in its own
    process (Lightning starts the other ranks by re-running that process's command line, so
    it must be a command that runs just this cell). The run is created here so every rank
    logs to the same one."""
    claimed, why = claim_cell(task, ctx, owner_identity())
    if claimed is None:
        return Outcome(task.index, task.name, "SKIPPED", failure=why)
    task = claimed
    if task.run_id is None:
        task = dataclasses.replace(task, run_id=create_cell_run(task, ctx, owner_identity()))
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, outcome_file = Path(tmp) / "cell.json", Path(tmp) / "outcome.json"
        spec_file.write_text(json.dumps({"task": {**dataclasses.asdict(task),
                                                  "config": task.config.to_dict()},
                                         "ctx": dataclasses.asdict(ctx)}, default=str))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus),
                   GATELAB_GRID_OWNER=owner_identity())
        job = subprocess.Popen([sys.executable, "-m", "lab.experiments.grid", "--run-cell",
                                str(spec_file), "--outcome", str(outcome_file)], env=env)
        try:
            code = job.wait()
        except KeyboardInterrupt as err:
            # The job's lead rank ends the run KILLED for the same signal (its stop_on_signals).
            job.send_signal(interruption(err).signum)
            job.wait()
            raise
        if outcome_file.exists():
            return Outcome(**json.loads(outcome_file.read_text()))
    reason = f"DDP job exited with code {code} before recording an outcome"
    fail_run(ctx.uri, task.run_id, "worker_died", reason)
    return Outcome(task.index, task.name, "FAILED", task.run_id, failure=reason)


def _run_cell_main(argv: list[str]) -> int:
    """`python -m lab.experiments.grid --run-cell SPEC --outcome FILE`: one cell, for DDP jobs."""
    spec = json.loads(Path(argv[argv.index("--run-cell") + 1]).read_text())
    outcome_file = Path(argv[argv.index("--outcome") + 1])
    lead = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    configure_output()
    if os.environ.get("GATELAB_GRID_OWNER"):
        die_with_parent(os.environ["GATELAB_GRID_OWNER"])
    raw = spec["task"]
    task = Task(raw["index"], raw["name"], from_dict(raw["config"]), raw["run_id"], raw["resumed"],
                raw["claim"])
    with stop_on_signals():
        outcome = execute_cell(task, GridContext(**spec["ctx"]), lead_rank=lead)
    if lead:
        tmp = outcome_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(outcome)))
        os.replace(tmp, outcome_file)
    return 0


# --- the grid ----------------------------------------------------------------------------

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


_now = time.monotonic  # the --time-limit clock (tests/test_grid.py replaces it)


def run_grid(spec: GridSpec, options: GridOptions) -> GridSummary:
    """Validate every cell, then run the ones the store does not already hold."""

    started_at = _now()
    startup_s = run_phases.startup_seconds()
    shard = parse_shard(options.shard)
    gpus = parse_gpus(options.gpus)
    if options.time_limit_s is not None:
        check_positive("--time-limit", options.time_limit_s)
    if options.cpu_workers < 1:
        raise LabError(f"--cpu-workers: must be at least 1, got {options.cpu_workers}")
    runs_per_gpu = parse_runs_per_gpu(options.runs_per_gpu)
    check_positive("--stale-after", options.stale_after_s)
    all_cells = plan(spec)
    # Small models gain little from intra-op threads and lose much when threads outnumber
    # free cores, so CPU workers split the cores between them (one each for the CPU presets).
    worker_threads = cpu_threads(options.cpu_threads, options.cpu_workers,
                                 all_cells[0].config.model.d_model if all_cells else None)
    cells = shard_cells(all_cells, shard)
    devices = cells[0].config.train.devices
    if gpus and devices > len(gpus):
        raise LabError(f"train.devices: {devices} GPUs per run but only {len(gpus)} given "
                       f"({','.join(gpus)})")
    for cell in cells:  # a kernel this machine cannot run fails here, before any cell
        require_loss_kernel(cell.config.train.fused_loss, bool(gpus))
    packing_basis = None
    if runs_per_gpu == "auto":
        runs_per_gpu, packing_basis = (1, None) if devices > 1 or not gpus else \
            auto_runs_per_gpu(spec.preset, _gpu_memory_gib())
    if devices > 1 and runs_per_gpu > 1:
        raise LabError("--runs-per-gpu: a DDP cell (train.devices > 1) takes its GPUs whole; "
                       "leave --runs-per-gpu at 1")
    uri = records.tracking_uri(options.tracking_uri)
    device = "cuda" if gpus else "cpu"
    pinned = gpu_slots(gpus, len(gpus) * runs_per_gpu)
    workers = (1 if devices > 1 else len(pinned)) if gpus else options.cpu_workers
    if packing_basis and not options.quiet:
        print(f"grid {spec.name}: --runs-per-gpu auto: {packing_basis}", flush=True)
    if options.dry_run:
        print_dry_run(spec, cells, uri, workers, device, runs_per_gpu if gpus else 1)
        return GridSummary(spec.name, len(cells), 0, [])

    records.check_writable(uri, max(count_params(cell.config)["total"] for cell in
                                    {cell.variant: cell for cell in cells}.values()))
    # Before the check and the workers, which compile and inherit the environment.
    use_compile_cache()
    check_table = None
    checking = time.perf_counter()
    if gpus and options.check:
        check_table = lab_check.check_before_training(
            spec.preset, list(dict.fromkeys(c.variant for c in cells)),
            override_pairs(spec.overrides), options.quiet,
            log=lambda line: print(f"grid {spec.name}: {line}", flush=True),
            force=options.check == "force")
    check_s = time.perf_counter() - checking
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
                      runs_per_gpu if gpus and devices == 1 else 0,
                      check_s / max(1, len(work.tasks)))
    progress = _progress(spec.name, work, workers, options.quiet)
    outcomes: list[Outcome] = []

    dispatched_at: dict[int, float] = {}
    longest_s = 0.0  # the longest cell so far, dispatch to outcome, packing included

    def finished(outcome: Outcome) -> None:
        nonlocal longest_s
        if outcome.index in dispatched_at:
            longest_s = max(longest_s, _now() - dispatched_at[outcome.index])
        outcomes.append(outcome)
        progress.cell_done(outcome.name, outcome.text(), outcome.status == "FAILED")

    def admit() -> bool:
        """A cell may start: no limit, or the longest cell so far still fits before it."""
        if options.time_limit_s is None:
            return True
        return _now() + longest_s < started_at + options.time_limit_s

    def dispatched(task: Task, where) -> None:
        dispatched_at[task.index] = _now()
        resumed = " (resuming from its checkpoint)" if task.resumed else ""
        progress.started_cell(f"{task.name}{resumed}" + (f" on {where}" if where else ""))

    def in_turn(where, run_one) -> list[Task]:
        """The cells one after another in this process; those a time limit left unstarted."""
        for n, task in enumerate(work.tasks):
            if not admit():
                return work.tasks[n:]
            dispatched(task, where)
            finished(run_one(task))
        return []

    with stop_on_signals(), heartbeat(client, parent):  # SIGINT, SIGTERM: runs end KILLED
        try:
            client.update_run(parent, status="RUNNING")
            for key, value in me.items():  # this process's now (_release_refused_parent)
                client.set_tag(parent, key, value)
            records.log_yaml(client, parent, spec.to_dict(), "grid.yaml")
            if check_table is not None:  # this start's check (a resumed grid adds its own)
                records.log_check_table(client, parent, check_table)
            left: list[Task] = []
            if not work.tasks:
                pass
            elif devices > 1 and gpus:
                left = in_turn(f"GPUs {','.join(gpus)} (DDP)",
                               lambda task: run_ddp_cell(task, ctx, gpus))
            elif workers == 1 and not (gpus and options.gpus not in (None, "all")):
                if not gpus:
                    _set_threads(worker_threads)
                left = in_turn(None, lambda task: execute_cell(task, ctx))
            else:
                slots = pinned or gpu_slots([], options.cpu_workers)
                threads = threads_per_worker(len(pinned)) if gpus else worker_threads
                pool = CellPool(slots, threads, ctx)
                try:
                    warm_first = {"shape_of": lambda task: compile_shape(task.config)} \
                        if options.warm_first else {}
                    left = pool.run(work.tasks, finished,
                                    lambda task, slot: dispatched(task, slot_name(slot)), admit,
                                    **warm_first)
                except BaseException as err:
                    stop = interruption(err)
                    pool.close(stop.signum if stop is not None else None)
                    raise
                pool.close()
        except KeyboardInterrupt as err:
            stop = interruption(err)
            note_killed()
            client.set_terminated(parent, "KILLED")
            client.set_tag(parent, records.KILLED_REASON_TAG, f"stopped by {stop.name}")
            raise stop from None
    summary = GridSummary(spec.name, len(cells), len(work.done), outcomes, len(work.busy),
                          work.killed, parent, len(left), startup_s, check_s,
                          _now() - started_at)
    _close_parent(client, experiment, parent, {c.config_hash for c in all_cells}, summary)
    return summary


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


if __name__ == "__main__":
    sys.exit(_run_cell_main(sys.argv[1:]))
