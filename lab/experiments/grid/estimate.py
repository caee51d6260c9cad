"""How many cells share a GPU (`--runs-per-gpu auto`, from measured packing gains), and how
long a grid will take (`--dry-run`): measured from the store's finished runs where it holds
some of the preset on this kind of device, else from model FLOPs at an assumed rate.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from lab import records
from lab.config import RunConfig, resolve, with_vocab
from lab.errors import LabError
from lab.experiments.grid.spec import Cell
from lab.experiments.schema import GridSpec
from lab.model.params import count_params, model_flops_per_token
from lab.progress import duration
from lab.records import DATA_TAG, DEVICE_TAG, PRESET_TAG, CellRecord
from lab.training.step import compile_shape

# Time estimate without measurements: 6 N FLOPs per token (Kaplan et al., 2020) at a rate
# we assume per worker, plus a fixed cost per run (process, store, validation and test).
ASSUMED_FLOPS = {"cpu": 1.5e10, "cuda": 1e14}
ASSUMED_RUN_OVERHEAD_S = 5.0


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


def packing_measurement(config: RunConfig) -> dict | None:
    """MEASURED_PACKING's entry for the preset of `config` (one of a grid's cells: they share
    the overrides), or None: not measured, or the overrides change what a cell's peak and its
    packing gain depend on, its compiled shape (the model, the micro-batch, the precision,
    the compile mode: lab/training/step.py compile_shape), from the preset's defaults the
    entry was measured at (a `small` grid at batch 64 would take 4x the measured peak)."""
    measured = MEASURED_PACKING.get(config.preset)
    if measured is None:
        return None
    defaults = with_vocab(resolve(config.variant, config.preset), config.model.vocab_size)
    return measured if compile_shape(defaults) == compile_shape(config) else None


def auto_runs_per_gpu(config: RunConfig, gpu_memory_gib: float | None) -> tuple[int, str]:
    """Cells per GPU for `--runs-per-gpu auto`, and the sentence saying why (`config`: one of
    the grid's cells, packing_measurement)."""
    preset = config.preset
    measured = packing_measurement(config)
    if measured is None:
        why = "preset" if preset not in MEASURED_PACKING else \
            "the preset's defaults, which the grid's overrides change (model, micro-batch, " \
            "precision or compile mode); preset"
        return 1, f"one cell per GPU (no packing measurement for {why} {preset!r})"
    speedup = measured["speedup"]
    n = 1
    while n + 1 in speedup and speedup[n + 1] - speedup[n] >= PACKING_MIN_GAIN:
        n += 1
    if gpu_memory_gib:
        n = max(1, min(n, int(GPU_MEMORY_HEADROOM * gpu_memory_gib // measured["peak_gib"])))
    return n, (f"{n} cells per GPU: measured {speedup[n]:.2f}x one cell's tokens/s at "
               f"{preset} (benchmarks/packing.py), {measured['peak_gib']:.1f} GiB each")


def room_for_one_more(config: RunConfig, runs_per_gpu: int, gpu_memory_gib: float | None) -> bool:
    """Whether one more model of a grid's cell `config` fits on a GPU beside `runs_per_gpu`
    cells, by the measured peaks (packing_measurement) and the same headroom as packing: the
    grid's compile-ahead process takes one training step of each later shape beside the cells
    (lab/experiments/grid/ahead.py). False where not measured: a cell's peak is not known,
    and the step must not take the memory a cell needs. True without a GPU."""
    if gpu_memory_gib is None:
        return True
    measured = packing_measurement(config)
    return measured is not None and \
        (runs_per_gpu + 1) * measured["peak_gib"] <= GPU_MEMORY_HEADROOM * gpu_memory_gib


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


def packed_slowdown(preset: str, runs_per_gpu: int) -> tuple[float, str]:
    """How many times longer each of `runs_per_gpu` cells sharing a GPU takes than one cell
    alone (runs_per_gpu / packing_speedup), and the phrase saying so ("" for one alone)."""
    if runs_per_gpu <= 1:
        return 1.0, ""
    speedup = packing_speedup(preset, runs_per_gpu)
    return runs_per_gpu / speedup, (f"{runs_per_gpu} cells per GPU at {speedup:.2f}x one "
                                    "cell's tokens/s")


def gpu_memory_gib() -> float | None:
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


def measured_tokens_per_s(uri: str, preset: str, data: str, device: str,
                          batch_size: int | None = None) -> tuple[float, int] | None:
    """Median end-to-end tokens/s (tokens seen / wall time, overheads included) of FINISHED
    runs of this preset and data that trained on this kind of device ("cuda" or "cpu"), each
    as one cell alone on its GPU would run: a run that shared its GPU with k - 1 others
    (CellRecord.runs_per_gpu) ran at packing_speedup(k) / k of that. With `batch_size`, only
    the runs at that batch where the store has any: a cell's tokens/s depends on its batch
    (the sink grid's `small` cells train at 16, the reproduction's at the preset's 32, and
    the stability ladder's deep-narrow at 64). None without any."""
    if _no_store_yet(uri):
        return None
    try:
        client = records.client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, f"attributes.status = 'FINISHED' and "
                                  f"tags.{PRESET_TAG} = '{preset}' and tags.{DATA_TAG} = '{data}'",
                                  max_results=500) if experiments else []
    except Exception:  # an unreadable store only means no measurement
        return None
    rates, at_batch = [], []
    for run in runs:
        wall, seen = run.data.metrics.get("time/wall_s"), run.data.metrics.get("tokens/seen")
        if not (wall and seen) or run_device_kind(run) != device:
            continue
        shared = CellRecord.from_run(run).runs_per_gpu
        rates.append(seen / wall * shared / packing_speedup(preset, shared))
        if batch_size is not None and run.data.params.get("train.batch_size") == str(batch_size):
            at_batch.append(rates[-1])
    rates = sorted(at_batch or rates)
    return (rates[len(rates) // 2], len(rates)) if rates else None


def finished_hashes(runs) -> set[str]:
    """The config hashes of the cells these runs hold FINISHED."""
    return {r.config_hash for r in map(CellRecord.from_run, runs) if r.finished}


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
    measured = measured_tokens_per_s(uri, spec.preset, spec.data.source, device,
                                     spec.train.batch_size)
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


def expected_cell_s(configs: list[RunConfig], uri: str, device: str, runs_per_gpu: int
                    ) -> tuple[float, str] | None:
    """Seconds the longest of these cells' configs is expected to take with `runs_per_gpu` of them
    sharing each GPU, from the store's measured rate (measured_tokens_per_s: overheads
    included), and the sentence saying so; None where the store measures none. What
    `--time-limit` admits a grid's first cells by, before any cell of this process has ended
    (on 2026-12-06 three packed `stability` cells were started on no estimate and were cut
    off at 83% by the call's limit, 8 device minutes lost)."""
    if not configs:
        return None
    spec = configs[0]
    measured = measured_tokens_per_s(uri, spec.preset, spec.data.source, device,
                                     spec.train.batch_size)
    if not measured:
        return None
    rate, n = measured
    slower, packed = packed_slowdown(spec.preset, runs_per_gpu)
    seconds = max(c.train.tokens for c in configs) / rate * slower
    return seconds, (f"about {duration(seconds)} a cell: {rate:,.0f} tokens/s end to end, the "
                     f"median of {n} finished {spec.preset} runs on {device}"
                     + (f", {packed}" if packed else ""))


def print_dry_run(spec: GridSpec, cells: list[Cell], uri: str, workers: int, device: str,
                  per_gpu: int = 1) -> None:
    """`per_gpu` cells sharing a GPU each run slower by per_gpu / (their measured aggregate
    gain, packing_speedup), which the estimate includes. Cells already FINISHED in the store
    are listed as done and left out of the time: the grid would skip them."""
    counts = [count_params(c.config) for c in cells]
    seconds, basis = estimate(cells, counts, uri, workers, device)
    slower, packed = packed_slowdown(spec.preset, per_gpu)
    if packed:
        seconds = [s * slower for s in seconds]
        basis += f"; {packed}"
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
