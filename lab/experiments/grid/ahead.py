"""Compiling ahead: the compiled shapes a grid's cells reach later, compiled by a process of
their own while the first cells train, so that each later variant's first cell loads its
graphs from Inductor's on-disk cache (lab/training/step.py use_compile_cache) instead of
compiling them.

Why: on a fresh machine each variant's first cell compiled for 15.0-15.6 s at `small`, beside
a later cell's 87.5-s wall clock (one H100, 2026-12-06, benchmarks/README.md "The third
round"), 14 times in the 16-variant reproduction grid beyond its workers' first cells: the
largest fixed cost left of a grid's cells once a worker keeps a variant's graphs for its
other seeds. A cell whose shape this process compiled spent 0.9-1.5 s loading it (the fourth
round). The workers compile every shape themselves as before where this process has not
reached it yet, or fails: it only ever fills the cache.

The compile is one training step through the lab's own path (LanguageModel's setup and
training step, train_run's graph options for the Trainer: lab/training/module.py
graph_trainer_options, the run's data loader), so the graphs it leaves are the ones a cell
traces; nothing is recorded. Shapes, not cells: runs of one compile_shape (another seed or
learning rate) share their graphs."""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import tempfile
import time

import torch

from lab.config import RunConfig
from lab.experiments.grid.estimate import gpu_memory_gib, room_for_one_more
from lab.experiments.pool import GPU_ENV, enter_child, environment_with
from lab.records import owner_identity
from lab.training.step import compile_shape


def shapes_ahead(configs: list[RunConfig], started: set[str], cuda: bool) -> list[RunConfig]:
    """One config per compile shape of `configs`, in the order the cells first reach it,
    less the shapes `started` (compile_shape: those of the cells that start at once, each
    compiling its own); none where the configs do not compile on this machine."""
    if not configs or not configs[0].train.compile_on(cuda):
        return []
    seen = set(started)
    ahead = []
    for config in configs:
        shape = compile_shape(config)
        if shape not in seen:
            seen.add(shape)
            ahead.append(config)
    return ahead


def compile_one(config: RunConfig) -> float:
    """One training step of `config` as a cell takes it, nothing recorded: its compiled
    graphs land in Inductor's cache. Returns its seconds."""
    import lightning as L

    from lab.training.corpus import open_data
    from lab.training.module import LanguageModel, TokenDataModule, graph_trainer_options

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    store, config = open_data(config)
    module = LanguageModel(config)  # its setup compiles (compile_for_training), as a cell's
    with tempfile.TemporaryDirectory(prefix="gatelab-ahead-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, max_steps=1, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
            **graph_trainer_options(config, cuda))  # as train_run's Trainer
        trainer.fit(module, datamodule=TokenDataModule(store, config))
    del trainer, module
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def _ahead_main(env: dict, parent_owner: str, configs: list[RunConfig], label: str,
                quiet: bool) -> None:
    # The step is one batch: the process's time is the compiler's, which runs in Inductor's
    # own worker processes; one torch thread leaves the cores to the training workers.
    enter_child(env, 1, parent_owner)
    try:
        for config in configs:
            try:
                seconds = compile_one(config)
            except Exception as err:  # the cell compiles it itself, as without this process
                print(f"{label}: compiling {config.variant} ahead failed, its first cell "
                      f"compiles it: {type(err).__name__}: {err}"[:500], file=sys.stderr,
                      flush=True)
                continue
            if not quiet:
                print(f"{label}: compiled {config.variant} ahead ({seconds:.1f} s)", flush=True)
    except KeyboardInterrupt:  # the grid was stopped: nothing of this process is kept
        return


# Seconds CompileAhead.close waits for the process to end after each signal.
CLOSE_WAIT_S = 10.0


class CompileAhead:
    """The process that compiles `configs` one after another (lab/experiments/pool.py's
    spawned workers say why a GPU process starts fresh), on one GPU of the grid's (its
    environment `slot`), or on the CPU. It watches the grid's process and ends with it;
    `close` ends it where it has not finished when the grid does."""

    def __init__(self, configs: list[RunConfig], slot: dict[str, str], label: str,
                 quiet: bool):
        self.configs = configs
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=_ahead_main, daemon=True, name="gatelab-compile-ahead",
            args=({**os.environ, **slot}, owner_identity(), configs, label, quiet))
        with environment_with(slot):  # seen by the fresh interpreter before CUDA starts
            self.process.start()

    def close(self) -> None:
        """End the process: SIGTERM, then SIGKILL where it has not ended within
        CLOSE_WAIT_S. Inside a training step Lightning's own SIGTERM handler only notes the
        signal and lets the step finish first (its compile: 12-21 s a shape at `small` on one
        H100, benchmarks/README.md "The fourth round")."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=CLOSE_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=CLOSE_WAIT_S)


def start_for_grid(configs: list[RunConfig], workers: int, runs_per_gpu: int,
                   gpus: list[str], warm_first: bool, label: str,
                   quiet: bool) -> CompileAhead | None:
    """A grid's CompileAhead for the shapes of the cells to run (`configs`, in order) beyond
    those its first cells compile themselves, on the first of `gpus` (none: the CPU), or
    None: no such shape, or no room for one more model of the cells' preset beside the
    `runs_per_gpu` cells on the GPU (estimate.room_for_one_more). The first cells are the
    first `workers` in order, or with --warm-first the first of `workers` shapes
    (lab/experiments/pool.py WorkerPool.run)."""
    if not configs or not room_for_one_more(configs[0], runs_per_gpu if gpus else 1,
                                            gpu_memory_gib() if gpus else None):
        return None
    shapes = list(dict.fromkeys(compile_shape(config) for config in configs))
    first = shapes[:workers] if warm_first else \
        [compile_shape(config) for config in configs[:workers]]
    return start_compile_ahead(configs, set(first), gpus, label, quiet)


def start_compile_ahead(configs: list[RunConfig], started: set[str], gpus: list[str],
                        label: str, quiet: bool) -> CompileAhead | None:
    """A CompileAhead for the shapes of `configs` (the cells to run, in order) but those
    `started`, on the first of `gpus`; None where there is none to compile, or where the
    process did not start (the cells then compile their shapes themselves, as without it)."""
    ahead = shapes_ahead(configs, started, bool(gpus))
    if not ahead:
        return None
    try:
        return CompileAhead(ahead, {GPU_ENV: gpus[0]} if gpus else {}, label, quiet)
    except Exception as err:  # (OSError: no process to be had) it only ever fills the cache
        print(f"{label}: compiling ahead did not start, each cell compiles its shape "
              f"itself: {type(err).__name__}: {err}"[:500], file=sys.stderr, flush=True)
        return None
