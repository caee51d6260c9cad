"""Time to a verdict (issue 38): where a GPU call's minutes go, in one call of <= 9 minutes.

    python3 benchmarks/time_to_verdict.py OUT_DIR [--work-dir DIR] [--budget-s 540]
                                          [--sections a,b,...] [--dry]
    python3 benchmarks/time_to_verdict.py OUT_DIR --tables-only  # the tables from its JSON

On one H100 or H200 (torch 2.11, Lightning, the MLflow and Optuna wheels: `source
benchmarks/gpu_env.sh` first), from the repository root, it measures in priority order
whatever fits in the time budget, and records what it skipped and why:

- grid-small: real `gatelab grid` cells with the `small` reproduction's settings
  (ablations/reproduce.yaml, 7.5e7 tokens a cell, packed as `--runs-per-gpu auto` packs
  them) on the synthetic corpus, 4 of its variants at seed 0, then `gatelab report`: each
  cell's phases (lab/training/phases.py `time/*_s`) and kind (a worker's first, or a later
  cell whose graphs came from Inductor's cache, filled by the grid's compile-ahead process),
  the fraction of its wall clock in training steps, the grid's wall clock start to report,
  what the compile-ahead process compiled, and a projection to the 48-cell grid;
- deep-narrow: the deep-narrow preset at batch 16 in its own compile mode, `reduce-overhead`
  (CUDA graphs, since 2026-12-06), bare loop vs lab path: the issue's launch-bound row;
- deep-narrow-modes: the same at batch 16 in the default mode, and at batch 64 (the
  stability ladder's cells) in both modes;
- mfu: tokens/s and MFU at `medium` and `base`, bare loop and lab path;
- grid-base: one real `reproduce-base` cell (6e7 tokens);
- liger: the bare loop at `small` and `medium` with `train.fused_loss=liger` and without
  (needs liger_kernel; skipped, with the reason, where it is not importable);
- grid-small-again: a second `gatelab grid` start on the same machine and code (another
  seed), to show the check skipped and the compile served from Inductor's cache;
- grid-small-warm: grid-small's two packed cells for a variant not compiled yet, with
  `--warm-first` (one compiles, then the other loads its graphs), against grid-small's first
  two cells compiling side by side;
- seed-batch-bound: the bare `small` loop at batch 32, 64 and 96 in one process: one model
  at S x 32 runs the FLOPs, kernels and memory traffic of S seeds stacked into one batched
  model at 32 each (the issue's "several seeds in one process"), less the per-seed weights'
  batched matmuls, so its tokens/s over batch 32's is an upper bound on what stacking S
  seeds could gain over one cell; then 2 and 3 seeds stacked for real through torch.func
  (benchmarks/stacked_seeds.py, whose test checks it trains what separate runs train).
  Below 1.3x the packing gain, stacking does not meet the issue's bar.

Synthetic tokens everywhere: speed does not depend on what the tokens say. Writes
OUT_DIR/time_to_verdict.json after every section and OUT_DIR/time_to_verdict.md (the
tables) at the end; each grid's output is in OUT_DIR/grid-<name>.log. `--dry` is the same
pass at the `tiny` preset with a few steps, for a CPU (tests/integration/test_time_to_verdict.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Seconds each section takes on one H100/H200, from the measurements it repeats (rough, for
# the budget; benchmarks/README.md and issue 38): compiles of 15-50 s each dominate.
# Measured on one H100 on 2026-12-06 (benchmarks/results/2026-12-06-h100-*.json): grid-small's
# 4 cells of one variant and report 233 s with the check of a fresh machine (round 3: 30 s for
# its one variant), deep-narrow's 4 rows 400 s (about 100 s a row, so 110 for the one row of
# `deep-narrow` and 300 for the others), mfu 156 s. grid-small now trains 4 variants, so its
# check covers 4: 252 s in the fourth round (one H100, 2026-12-06: check 38 s, grid 237 s,
# report 10 s), where deep-narrow took 83 s and mfu 121 s. The default order's first three,
# the acceptance's table, fit one 540-s budget.
ESTIMATED_S = {"grid-small": 270, "deep-narrow": 110, "mfu": 160, "liger": 110,
               "grid-base": 130, "grid-small-again": 70, "grid-small-warm": 150,
               "deep-narrow-modes": 300,
               "seed-batch-bound": 220}  # (the stacked models' compile: a guess, not timed yet)
SECTIONS = list(ESTIMATED_S)
DRY_ESTIMATED_S = 5.0      # per section in --dry (the tests' budget arithmetic)
SMALL_GRID_CELLS = 48      # the `small` reproduction: 16 variants x 3 seeds
SMALL_GRID_VARIANTS = 16
SMALL_GRID_BEFORE_MIN = 26  # its time on one H200 before this issue (docs/results.md)
# grid-small's variants at seed 0: the first two are its 2 workers' first cells (2 a GPU at
# `small`), compiling cold; the other two are each a worker's later cell, whose compiled shape
# the grid's compile-ahead process (lab/experiments/grid/ahead.py) compiled meanwhile.
SMALL_GRID_SECTION_VARIANTS = ("baseline", "sdpa_elementwise_sigmoid_mul",
                               "sdpa_headwise_sigmoid_mul", "value_elementwise_sigmoid_mul")
# A later cell whose worker kept its variant's graphs still logs a compile phase of its first
# step's jitter over a steady step (round 3, one H100: 0.000 and 0.002 s); one that loaded its
# graphs from Inductor's cache, about 3.5 s in the second round and 0.9-1.5 s in the fourth
# (one H100): a cell under this compiled nothing.
KEPT_COMPILE_S = 0.5
# A later cell that compiled cold (the compile-ahead process had not reached its shape, or
# did not start) compiles as long as a first cell: 14.2-15.3 s at `small` in the fourth round
# (one H100), against at most 3.5 s for one that loaded: `cold`, not `loaded`, so that it does
# not stand in the 48-cell projection for the cells the cache serves.
COLD_COMPILE_S = 8.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the JSON, the tables and logs")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for the rest: the grids' stores, grid files and reports, "
                        "the lab path's bench.db (default: OUT_DIR; a device call brings back "
                        "only a few files, so put them outside $OUT there)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no section that would not end within this many seconds "
                        "of the script's start (default 540: one 10-minute call, with margin)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, in the order to run (default: {','.join(SECTIONS)})")
    parser.add_argument("--dry", action="store_true",
                        help="every section at the tiny preset with a few steps (a CPU check)")
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: rewrite OUT_DIR/time_to_verdict.md from the JSON a "
                        "device call left there (after a change to the tables or projection)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in ESTIMATED_S]
    if unknown or not args.sections:
        parser.error(f"--sections: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(SECTIONS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s: must be positive, got {args.budget_s:g}")
    return args


# --- grid cells ------------------------------------------------------------------------------

def grid_file(source: str, name: str, seeds: list[int], dry: bool, out_dir: Path,
              variants: tuple[str, ...] = ("baseline",)) -> Path:
    """A real grid's settings (its overrides and token budget), on synthetic tokens,
    `variants` at `seeds`; in --dry the first variant at one seed at `tiny`, 4 steps, a small
    analysis (on the CPU nothing compiles: the other variants would add no kind of cell)."""
    spec = yaml.safe_load((REPO / "ablations" / source).read_text())
    spec.update(name=name, data="synthetic", variants=list(variants), seeds=seeds)
    if dry:
        spec.update(preset="tiny", tokens=4 * 16 * 128, seeds=seeds[:1],
                    variants=list(variants[:1]))
        spec["overrides"].update({"train.val_every": 2, "train.val_batches": 2,
                                  "train.analysis_windows": 2,
                                  "train.long_context_factors": "1,2"})
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _gatelab(args: list[str], env: dict, log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ gatelab {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "lab", *args], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - started


def cell_rows(uri: str, grid: str) -> list[dict]:
    """Each FINISHED cell of `grid` in the store: its phases and what they come to."""
    from mlflow.tracking import MlflowClient

    from lab.records import CONFIG_HASH_TAG, RUNS_PER_GPU_TAG
    from lab.training.phases import (MODEL_BUILD_PARTS, PHASES, TOTAL_METRIC, metric,
                                     model_build_metric)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid)
    if experiment is None:
        return []
    rows = []
    finished_cells = f"attributes.status = 'FINISHED' and tags.{CONFIG_HASH_TAG} != ''"
    for run in client.search_runs([experiment.experiment_id], finished_cells):
        m = run.data.metrics
        if TOTAL_METRIC not in m:
            continue
        row = {"cell": run.info.run_name, "total_s": m[TOTAL_METRIC],
               "runs_per_gpu": int(run.data.tags.get(RUNS_PER_GPU_TAG, "1")),
               "tokens_per_s": m.get("throughput/tokens_per_s_mean"),
               "mfu": m.get("throughput/mfu")}
        row.update({name: m.get(metric(name), 0.0) for name in PHASES})
        # model_build's parts (logged since 2026-12-06, later)
        row["model_build_parts"] = {part: m[model_build_metric(part)] for part in MODEL_BUILD_PARTS
                                    if model_build_metric(part) in m}
        row["train_fraction"] = row["train_steps"] / row["total_s"] if row["total_s"] else None
        row["kind"] = cell_kind(row)
        rows.append(row)
    return sorted(rows, key=lambda r: r["cell"])


def cell_kind(cell: dict) -> str:
    """`first`: a worker's first cell (it paid the worker's start-up); of the later cells,
    `loaded`: it compiled briefly, so its graphs came from Inductor's cache (the
    compile-ahead process's, or an earlier cell's), `cold`: it compiled as long as a first
    cell does (COLD_COMPILE_S), or `kept`: it compiled nothing, its worker kept its variant's
    graphs from a cell before. From the phases, so older JSON's cells have one too;
    a cell trained in the grid's own process (no worker pool: a CPU's grid) reads as a later
    one, for the grid counts that process's start-up as its own."""
    if cell.get("startup"):
        return "first"
    compile_s = cell.get("compile", 0.0)
    return "cold" if compile_s >= COLD_COMPILE_S else \
        "loaded" if compile_s >= KEPT_COMPILE_S else "kept"


def cells_of_kind(section: dict, kind: str) -> list[dict]:
    return [c for c in section.get("cells") or [] if cell_kind(c) == kind]


def run_grid_section(source: str, name: str, seeds: list[int], ctx: dict,
                     variants: tuple[str, ...] = ("baseline",),
                     flags: tuple[str, ...] = ()) -> dict:
    out_dir, work_dir, dry = ctx["out_dir"], ctx["work_dir"], ctx["dry"]
    path = grid_file(source, name, seeds, dry, work_dir, variants)
    store = work_dir / "store"
    env = dict(os.environ, GATELAB_STORE=str(store),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = out_dir / f"grid-{name}.log"
    code, grid_s = _gatelab(["grid", str(path), *flags], env, log)
    if code != 0:
        raise RuntimeError(f"gatelab grid exited with {code}; see {log.name}")
    code, report_s = _gatelab(["report", name, "--out", str(work_dir / f"report-{name}")], env,
                              log)
    cells = cell_rows(f"sqlite:///{store / 'mlflow.db'}", name)
    lines = log.read_text().splitlines()
    result = {"grid": name, "settings": source, "flags": list(flags), "grid_s": grid_s,
              "report_s": report_s,
              "report_exit": code, "cells": cells,
              "time_line": next((l.strip() for l in reversed(lines) if "s summed:" in l), None),
              # what the grid said of its check: passed in N s, or passed before
              "check_lines": [l.strip() for l in lines if l.startswith(f"grid {name}: check")],
              # what its compile-ahead process compiled, and in how long (or what failed)
              "ahead_lines": [l.strip() for l in lines
                              if l.startswith((f"grid {name}: compiled ",
                                               f"grid {name}: compiling "))
                              and " ahead" in l]}
    return result


def packing_line(sections: dict) -> str | None:
    """Packing on this GPU, where one call measured both sides: grid-small's packed cells'
    tokens/s together against seed-batch-bound's one bare `small` loop alone at batch 32
    (the lab path runs a few percent under its bare loop, so this flatters packing a little
    less than a lab-path comparison would). `--runs-per-gpu auto` packs by MEASURED_PACKING,
    an H200's measurement (lab/experiments/grid/estimate.py)."""
    grid, bound = sections.get("grid-small", {}), sections.get("seed-batch-bound", {})
    if grid.get("status") != "done" or bound.get("status") != "done" or not grid.get("cells"):
        return None
    cells = grid["cells"]
    per_gpu = max(c["runs_per_gpu"] for c in cells)
    together = per_gpu * statistics.mean(c["tokens_per_s"] or 0.0 for c in cells)
    alone = bound["rows"][0]["bare"]["tokens_per_s"]
    return (f"Packing on this GPU: {per_gpu} `small` cells {together:,.0f} tokens/s together, "
            f"the bare loop alone {alone:,.0f}: {together / alone:.2f}x.")


def later_cells(section: dict) -> list[dict]:
    """The cells a worker ran after its first (no process start-up of their own): what the
    rest of a long grid's cells pay."""
    return [c for c in section.get("cells") or [] if cell_kind(c) != "first"]


def loaded_cell_model(section: dict) -> dict | None:
    """What the 48-cell grid's cells beyond the section's cost, from its `loaded` cells (a
    worker's later cell of a variant whose graphs the compile-ahead process left in Inductor's
    cache): another variant's first cell at their mean wall clock, their check share aside
    (`cell_s`); another seed's cell at that less their mean compile (`kept_s`), for its worker
    keeps the graphs and compiles nothing (round 3, one H100: 0.0 s); both train their mean
    training steps (`train_steps`). None where the section has no `loaded` cell."""
    loaded = cells_of_kind(section, "loaded")
    if not loaded:
        return None
    cell_s = statistics.mean(c["total_s"] - c["check_share"] for c in loaded)
    compile_s = statistics.mean(c["compile"] for c in loaded)
    return {"cells": len(loaded), "cell_s": cell_s, "compile_s": compile_s,
            "kept_s": cell_s - compile_s,
            "train_steps": statistics.mean(c["train_steps"] for c in loaded)}


def projected_small_grid_min(section: dict) -> tuple[float, str] | None:
    """The 48-cell `small` grid on one GPU, start to report, projected from a `grid-small`
    section, and how: its measured grid, then the other cells, runs_per_gpu at a time, then
    the report. Where the section has `loaded` cells (since its 4 cells are 4 variants): the
    other variants' first cells at their wall clock, and the other seeds' cells at that less
    their compile (loaded_cell_model). Before, where it has later cells (4 seeds of one
    variant: each worker's second `kept` its graphs): each other cell at their mean wall
    clock, check share aside, and each of the grid's other variants' compile once, at the
    section's first cells' mean. Before that (2 cells, each a worker's first): at its cells'
    wall clock less the check's share and the start-up, their compile counted cold: an upper
    bound. A projection, not a measurement (the whole grid is longer than one device
    session)."""
    cells = section.get("cells") or []
    if section.get("settings") != "reproduce.yaml" or not cells:
        return None
    per_gpu = max(c["runs_per_gpu"] for c in cells)
    rest = max(0, SMALL_GRID_CELLS - len(cells))
    later = later_cells(section)
    loaded = loaded_cell_model(section)
    if loaded:
        variants = {c["cell"].split("/")[0] for c in cells}
        other_firsts = min(rest, max(0, SMALL_GRID_VARIANTS - len(variants)))
        other_seeds = rest - other_firsts
        rest_s = other_firsts * loaded["cell_s"] + other_seeds * loaded["kept_s"]
        basis = (f"from the {loaded['cells']} `loaded` cell(s): the other {other_firsts} "
                 f"variants' first cells at their {loaded['cell_s']:.1f} s (check share "
                 f"aside), the {other_seeds} other seeds' cells at that less their "
                 f"{loaded['compile_s']:.1f}-s compile (a worker keeps a variant's graphs)")
    elif later:
        rest_s = rest * statistics.mean(c["total_s"] - c["check_share"] for c in later)
        basis = f"from the {len(later)} cell(s) a worker ran after its first"
        # The section trains one variant; in the grid each worker's first cell is another
        # variant's, and the variants left each compile once more (a worker keeps a
        # variant's graphs for its other seeds and takes them first: WorkerPool.run's
        # model_of), at the section's first cells' compile.
        first = [c for c in cells if c.get("startup")]
        if first and "compile" in first[0]:
            compile_s = statistics.mean(c["compile"] for c in first)
            others = max(0, SMALL_GRID_VARIANTS - len(first))
            rest_s += others * compile_s
            basis += (f", and each of the other {others} variants' compile once "
                      f"({compile_s:.0f} s; their check not counted)")
    else:
        rest_s = rest * statistics.mean(c["total_s"] - c["check_share"] - c["startup"]
                                        for c in cells)
        basis = "an upper bound"
    return (section["grid_s"] + rest_s / per_gpu + section["report_s"]) / 60, basis


def small_grid_train_share(section: dict) -> tuple[float, str] | None:
    """The 48-cell grid's summed cell time in training steps, its check aside, estimated from
    a `grid-small` section as projected_small_grid_min projects the grid: the workers' first
    cells as measured, the other variants' first cells `loaded`, the other seeds' cells
    `kept` (loaded_cell_model); and what it counted. None without `loaded` cells."""
    loaded = loaded_cell_model(section)
    first = cells_of_kind(section, "first")
    if not loaded or section.get("settings") != "reproduce.yaml":
        return None
    loaded_cells = max(0, SMALL_GRID_VARIANTS - len(first))
    kept_cells = max(0, SMALL_GRID_CELLS - len(first) - loaded_cells)
    steps = (sum(c["train_steps"] for c in first)
             + (loaded_cells + kept_cells) * loaded["train_steps"])
    wall = (sum(c["total_s"] - c["check_share"] for c in first)
            + loaded_cells * loaded["cell_s"] + kept_cells * loaded["kept_s"])
    return steps / wall, (f"{len(first)} first cells as measured, {loaded_cells} `loaded` "
                          f"and {kept_cells} `kept`")


# --- loops timed in this process ---------------------------------------------------------------

def _bench_pair(preset: str, overrides: list[str], ctx: dict, lab: bool = True,
                profile: bool = False) -> dict:
    """The bare loop (and the lab path) of `preset` with `overrides`, timed as lab/bench.py
    times them; the lab path's run goes to the work folder's bench.db. With `profile`, the bare loop's
    kernel table after the timing (lab/bench.py, a few profiled steps) is kept in the row,
    so the JSON a call brings back holds it."""
    import torch

    from lab.bench import bench_config, lab_loop, time_bare_loops

    steps, warmup = ctx["steps"], ctx["warmup"]
    config = bench_config("baseline", ctx["preset"](preset), steps, warmup, "synthetic", overrides)
    row = {"preset": preset, "overrides": overrides}
    profile_path = ctx["work_dir"] / f"profile-{preset}.txt" if profile else None
    row["bare"] = time_bare_loops([config], steps, warmup, 1, [profile_path])[0]
    if profile_path is not None and profile_path.exists():
        row["profile"] = profile_path.read_text()
        profile_path.unlink()  # in the JSON; a call brings back a few files only
    if lab:
        torch._dynamo.reset()
        row["lab"] = lab_loop(config, steps, warmup, f"sqlite:///{ctx['work_dir'] / 'bench.db'}")
        row["lab_over_bare"] = row["lab"]["tokens_per_s"] / row["bare"]["tokens_per_s"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _deep_narrow_rows(ctx: dict, settings: list[tuple[int, str]]) -> dict:
    return {"rows": [dict(_bench_pair("deep-narrow", [f"train.batch_size={batch}",
                                                       f"train.compile_mode={mode}"], ctx),
                          mode=mode, batch_size=batch) for batch, mode in settings]}


def deep_narrow(ctx: dict) -> dict:
    # batch 16, launch-bound (the case), in the preset's own mode since 2026-12-06
    return _deep_narrow_rows(ctx, [(16, "reduce-overhead")])


def deep_narrow_modes(ctx: dict) -> dict:
    # the default mode at batch 16 (what CUDA graphs gain), and batch 64 (the stability
    # ladder's cells, ablations/stability.yaml: 853k tokens/s alone on an H200 on 2026-12-06,
    # MFU 23%, no faster packed) in both modes: do CUDA graphs pay at the ladder's batch too?
    return _deep_narrow_rows(ctx, [(16, "default"), (64, "default"), (64, "reduce-overhead")])


def mfu(ctx: dict) -> dict:
    # With the bare loop's kernel profile: where a missed MFU target's time goes.
    return {"rows": [_bench_pair(preset, [], ctx, profile=True) for preset in ("medium", "base")]}


def liger(ctx: dict) -> dict:
    from lab.model.loss import require

    import torch

    require("liger", torch.cuda.is_available())  # LabError: skipped, with the reason
    return {"rows": [dict(_bench_pair(preset, [f"train.fused_loss={loss}"], ctx, lab=False),
                          loss=loss)
                     for preset in ("small", "medium") for loss in ("none", "liger")]}


def seed_batch_bound(ctx: dict) -> dict:
    """The bare `small` loop at 1, 2 and 3 times its batch of 32, in one process (timed in
    turn, as the bench times loops): the upper bound on stacking 2 or 3 seeds; then 2 and 3
    seeds really stacked, one model through torch.func (benchmarks/stacked_seeds.py), at 32
    each. A stack that fails to build or compile is a row with its error, not a failed
    section: what broke is the finding."""
    import torch

    from benchmarks.stacked_seeds import StackedLoop
    from lab.bench import bench_config, time_bare_loops

    steps, warmup, preset = ctx["steps"], ctx["warmup"], ctx["preset"]("small")
    batch = 4 if ctx["dry"] else 32
    seeds = (1, 2, 3)
    configs = [bench_config("baseline", preset, steps, warmup, "synthetic",
                            [f"train.batch_size={batch * n}"]) for n in seeds]
    bare = time_bare_loops(configs, steps, warmup, 1, [None] * len(configs))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    one = bare[0]["tokens_per_s"]
    rows = [{"preset": preset, "mode": f"{n} seed(s) as one batch", "batch_size": c.train.batch_size,
             "bare": r, "over_one_seed": r["tokens_per_s"] / one}
            for n, c, r in zip(seeds, configs, bare)]
    for n in seeds[1:]:
        row = {"preset": preset, "mode": f"{n} seeds stacked (torch.func)", "batch_size": batch}
        try:
            loop = StackedLoop(configs[0], n, warmup)
            row["bare"] = loop.time(steps)
            row["over_one_seed"] = row["bare"]["tokens_per_s"] / one
            if row["bare"].get("compile_error"):  # timed eager: not the compiled bound's peer
                row["mode"] += " (eager: its compile failed, see the JSON)"
            del loop
        except Exception as err:  # noqa: BLE001 - the row says what broke
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(row)
    return {"rows": rows}


SECTION_RUNS = {
    # 4 variants at seed 0, 2 cells a GPU (SMALL_GRID_SECTION_VARIANTS): each worker's second
    # cell is a later variant's first, its graphs compiled ahead
    "grid-small": lambda ctx: run_grid_section("reproduce.yaml", "ttv-small", [0], ctx,
                                               SMALL_GRID_SECTION_VARIANTS),
    "deep-narrow": deep_narrow,
    "deep-narrow-modes": deep_narrow_modes,
    "mfu": mfu,
    "grid-base": lambda ctx: run_grid_section("reproduce-base.yaml", "ttv-base", [0], ctx),
    "liger": liger,
    "grid-small-again": lambda ctx: run_grid_section("reproduce.yaml", "ttv-small-again", [2], ctx),
    # a variant grid-small neither trains nor compiles ahead: not in Inductor's cache yet
    "grid-small-warm": lambda ctx: run_grid_section(
        "reproduce.yaml", "ttv-small-warm", [0, 1], ctx, ("key_elementwise_sigmoid_mul",),
        ("--warm-first",)),
    "seed-batch-bound": seed_batch_bound,
}


# --- the run and its tables --------------------------------------------------------------------

def run(args: argparse.Namespace, clock=time.perf_counter) -> dict:
    """Every selected section that fits in the budget; the report, written after each."""
    from lab.errors import LabError

    started = clock()
    out_dir, work_dir = args.out_dir, args.work_dir or args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry": args.dry,
              "budget_s": args.budget_s, "environment": environment(), "sections": {}}
    ctx = {"out_dir": out_dir, "work_dir": work_dir, "dry": args.dry, "steps": 4 if args.dry else 100,
           "warmup": 2 if args.dry else 15,
           "preset": (lambda preset: "tiny") if args.dry else (lambda preset: preset)}
    for name in args.sections:
        estimate = DRY_ESTIMATED_S if args.dry else ESTIMATED_S[name]
        left = args.budget_s - (clock() - started)
        if estimate > left:
            report["sections"][name] = {"status": "skipped", "reason": (
                f"estimated {estimate:.0f} s, {max(0.0, left):.0f} s of the budget left")}
            continue
        began = clock()
        print(f"[time-to-verdict] {name} (estimated {estimate:.0f} s)", flush=True)
        try:
            entry = {"status": "done", **SECTION_RUNS[name](ctx)}
        except LabError as err:  # the machine cannot run it (no kernel, no CUDA)
            entry = {"status": "skipped", "reason": str(err)}
        except Exception as err:  # report it and go on to the next section
            traceback.print_exc()
            entry = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]}
        entry["seconds"] = clock() - began
        report["sections"][name] = entry
        write_json(report, out_dir)
    report["seconds"] = clock() - started
    from lab.training.step import use_compile_cache

    report["compile_cache_mib"] = folder_mib(Path(use_compile_cache()))
    write_json(report, out_dir)
    (out_dir / "time_to_verdict.md").write_text(tables(report))
    return report


def folder_mib(path: Path) -> float | None:
    """The size of a folder's files (the compile cache: can it travel to the next call?)."""
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def environment() -> dict:
    import torch

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": sys.version.split()[0]}


def write_json(report: dict, out_dir: Path) -> None:
    tmp = out_dir / "time_to_verdict.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out_dir / "time_to_verdict.json")


def _rate(r: dict | None) -> str:
    if not r:
        return "-"
    mfu_text = f" ({100 * r['mfu']:.1f}%)" if r.get("mfu") else ""
    return f"{r['tokens_per_s']:,.0f}{mfu_text}"


def tables(report: dict) -> str:
    """The report as Markdown: grid cells and their phases, the timed loops, what was skipped."""
    env = report["environment"]
    lines = [f"# Time to a verdict: {env['device']}, torch {env['torch']}, {report['date']}"
             + (" (dry pass, tiny preset)" if report["dry"] else ""), ""]
    sections = report["sections"]
    grids = [(n, s) for n, s in sections.items() if s["status"] == "done" and "cells" in s]
    if grids:
        lines += ["## Grid cells: where the wall clock goes (seconds; lab/training/phases.py)", "",
                  "A cell's kind: `first`, a worker's first (its start-up paid); `loaded`, a "
                  "later cell that compiled briefly (its graphs from Inductor's cache); `cold`, "
                  "a later cell that compiled as long as a first cell; `kept`, a later cell "
                  "that compiled nothing (its worker kept the graphs).", "",
                  "| grid | cell | kind | per GPU | wall | train steps | in steps | compile | "
                  "check | startup | validation | analysis | checkpoint | store | "
                  "build, other | tokens/s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  "---:|"]
        for _, s in grids:
            for c in s["cells"]:
                fraction = f"{c['train_fraction']:.3f}" if c["train_fraction"] is not None else "-"
                lines.append(
                    f"| {s['grid']} | {c['cell']} | {cell_kind(c)} | {c['runs_per_gpu']} | "
                    f"{c['total_s']:.1f} | "
                    f"{c['train_steps']:.1f} | **{fraction}** | {c['compile']:.1f} | "
                    f"{c['check_share']:.1f} | {c['startup']:.1f} | "
                    f"{c['validation'] + c['final_eval']:.1f} | "
                    f"{c['analysis'] + c['periodic_analysis']:.1f} | {c['checkpoint']:.1f} | "
                    f"{c['store']:.1f} | {c['other'] + c['data_open'] + c['model_build']:.1f} | "
                    f"{c['tokens_per_s'] or 0:,.0f} |")
        lines.append("")
        for name, s in grids:
            # (grid-small's alone: the later starts skip the check or load their compile, so
            # a projection from their cells would be no upper bound)
            projected = projected_small_grid_min(s) if name == "grid-small" else None
            flags = " ".join(s.get("flags", []))
            lines.append(f"- {s['grid']}: `gatelab grid{' ' + flags if flags else ''}` "
                         f"{s['grid_s']:.0f} s, `gatelab report` "
                         f"{s['report_s']:.0f} s" + (
                             f"; projected 48-cell `small` grid on this GPU, start to report: "
                             f"{projected[0]:.1f} min, {projected[1]} (before: "
                             f"{SMALL_GRID_BEFORE_MIN} min on one H200)"
                             if projected else "") + ".")
            share = small_grid_train_share(s) if name == "grid-small" else None
            if share:
                lines.append(f"  - the 48-cell grid's summed cell time in training steps, "
                             f"without the check: {share[0]:.3f} ({share[1]}; estimated from "
                             f"this call's cells)")
            parts = [c["model_build_parts"] for c in s["cells"] if c.get("model_build_parts")]
            if parts:
                lines.append("  - model build, mean of its parts over the cells: " + ", ".join(
                    f"{part} {statistics.mean(p.get(part, 0.0) for p in parts):.2f} s"
                    for part in parts[0]))
            later = later_cells(s)
            if later:
                # the check's share is this grid's check over its few cells: a 48-cell
                # grid spreads its (larger) check over 48
                unchecked = statistics.mean(c["train_steps"] / (c["total_s"] - c["check_share"])
                                            for c in later)
                lines.append(f"  - the cells a worker ran after its first: "
                             f"{statistics.mean(c['train_fraction'] for c in later):.3f} of "
                             f"their wall clock in training steps (mean of {len(later)}); "
                             f"{unchecked:.3f} without their share of this grid's check")
            for line in [*s.get("check_lines", []), *s.get("ahead_lines", []),
                         s.get("time_line")]:
                if line:
                    lines.append(f"  - `{line}`")
        lines.append("")
    loops = [(n, s) for n, s in sections.items() if s["status"] == "done" and "rows" in s]
    if loops:
        lines += ["## Loops timed in one process (lab/bench.py; tokens/s and MFU)", "",
                  "| section | preset | setting | bare loop | lab path | lab / bare |",
                  "|---|---|---|---:|---:|---:|"]
        for name, s in loops:
            for r in s["rows"]:
                setting = r.get("mode") or r.get("loss") or "defaults"
                if "batch_size" in r:
                    setting += f", batch {r['batch_size']}"
                ratio = (f"{r['lab_over_bare']:.3f}" if "lab_over_bare" in r else
                         f"{r['over_one_seed']:.3f} over one seed" if "over_one_seed" in r
                         else f"failed: {r['error']}" if "error" in r else "-")
                lines.append(f"| {name} | {r['preset']} | {setting} | {_rate(r.get('bare'))} | "
                             f"{_rate(r.get('lab'))} | {ratio} |")
        lines.append("")
    packing = packing_line(sections)
    if packing:
        lines += [packing, ""]
    other = [(n, s) for n, s in sections.items() if s["status"] != "done"]
    if other:
        lines += ["## Not measured", ""]
        lines += [f"- {name}: {s['status']}: {s['reason']}" for name, s in other]
        lines.append("")
    cache = report.get("compile_cache_mib")
    lines.append(f"Whole call: {report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f}-s "
                 "budget" + (f"; Inductor's cache folder holds {cache:.0f} MiB" if cache is not None
                             else "") + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.tables_only:
        source = args.out_dir / "time_to_verdict.json"
        if not source.is_file():
            print(f"error: --tables-only: no {source} to read", file=sys.stderr)
            return 2
        md = tables(json.loads(source.read_text()))
        (args.out_dir / "time_to_verdict.md").write_text(md)
        print(md)
        return 0
    report = run(args)
    print(tables(report))
    return 0 if all(s["status"] != "failed" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
