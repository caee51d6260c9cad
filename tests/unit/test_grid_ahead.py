"""lab/experiments/grid/ahead.py: which compiled shapes a grid compiles ahead, and that what
the compile-ahead process leaves in Inductor's cache is what a cell of that shape (another
seed and learning rate) loads instead of compiling. (Which cells a grid hands it:
tests/integration/test_grid.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.config import resolve
from lab.errors import LabError
from lab.experiments.grid import ahead
from lab.training.step import compile_shape

REPO = Path(__file__).resolve().parents[2]
TINY = {"data": "synthetic", "tokens": 4 * 16 * 128}


def _config(variant: str, seed: int = 0, *overrides: str, lr: float | None = None):
    return resolve(variant, "tiny", ["train.compile=true", *overrides], seed=seed, lr=lr, **TINY)


def test_each_later_shape_once_in_the_order_the_cells_reach_it():
    cells = [_config("baseline"), _config("sdpa_headwise_sigmoid_mul"),
             _config("baseline", 1), _config("sdpa_elementwise_sigmoid_mul"),
             _config("sdpa_headwise_sigmoid_mul", 1), _config("baseline", 0, lr=1e-2),
             _config("value_elementwise_sigmoid_mul")]
    started = {compile_shape(cells[0])}
    chosen = ahead.shapes_ahead(cells, started, cuda=False)
    assert [c.variant for c in chosen] == ["sdpa_headwise_sigmoid_mul",
                                           "sdpa_elementwise_sigmoid_mul",
                                           "value_elementwise_sigmoid_mul"]
    assert ahead.shapes_ahead(cells, {compile_shape(c) for c in cells}, cuda=False) == []


def test_nothing_is_compiled_ahead_where_the_cells_do_not_compile():
    """`train.compile: auto` compiles on a GPU only."""
    cells = [resolve(v, "tiny", **TINY) for v in ("baseline", "sdpa_headwise_sigmoid_mul")]
    assert ahead.shapes_ahead(cells, set(), cuda=False) == []
    assert [c.variant for c in ahead.shapes_ahead(cells, set(), cuda=True)] == \
        ["baseline", "sdpa_headwise_sigmoid_mul"]


@pytest.mark.parametrize("preset, runs_per_gpu, starts", [
    ("small", 2, True),    # 3 x 3.9 GiB within 0.8 of 80 GiB
    ("base", 2, True),     # 3 x 21.2 = 63.6 GiB: just within 64
    ("base", 3, False),    # 4 x 21.2 = 84.8 GiB: no room beside the cells
    ("medium", 1, False),  # no measured peak: a cell's memory is not known
])
def test_it_starts_on_a_gpu_only_where_the_measured_peaks_leave_room(monkeypatch, preset,
                                                                     runs_per_gpu, starts):
    """estimate.room_for_one_more on an 80-GiB GPU: the process's training step is one more
    model beside the packed cells."""
    assert _starts_ahead(monkeypatch, preset, runs_per_gpu) == starts


def test_runs_per_gpu_auto_packs_from_the_measured_gain():
    """auto (the default): as many cells per GPU as each still adds a tenth of one cell's
    tokens/s in the committed measurement, within the GPU's memory; unmeasured presets alone."""
    from lab.experiments.grid import estimate as grid

    speedup = grid.MEASURED_PACKING["small"]["speedup"]
    n, basis = grid.auto_runs_per_gpu(_config_at("small"), gpu_memory_gib=139.8)
    assert n == max(k for k in speedup if all(speedup[j + 1] - speedup[j] >= grid.PACKING_MIN_GAIN
                                                for j in range(1, k)))
    assert n >= 2 and "measured" in basis
    peak = grid.MEASURED_PACKING["small"]["peak_gib"]
    one_fits = 1.5 * peak
    assert grid.auto_runs_per_gpu(_config_at("small"), gpu_memory_gib=one_fits)[0] == 1
    assert grid.auto_runs_per_gpu(_config_at("medium"), gpu_memory_gib=139.8)[0] == 1
    n, basis = grid.auto_runs_per_gpu(_config_at("base"), gpu_memory_gib=139.8)  # packing loses
    assert n == 1 and "measured 1.00x" in basis
    assert grid.parse_runs_per_gpu("3") == 3 and grid.parse_runs_per_gpu("auto") == "auto"
    for bad in ("0", "x", "1.5", -2):
        with pytest.raises(LabError, match="--runs-per-gpu"):
            grid.parse_runs_per_gpu(bad)
    # The time estimate slows each packed cell by N / gain.
    assert grid.packing_speedup("small", n) == speedup[n] and grid.packing_speedup("tiny", 3) == 1.0


@pytest.mark.parametrize("override", ["train.batch_size=64", "model.d_model=1024",
                                      "train.precision=32-true"])
def test_overrides_that_change_a_cells_peak_leave_the_measurement_behind(monkeypatch, override):
    """The peaks were measured at the preset's defaults: a `small` grid at batch 64 (4x the
    measured activations), wider, or in fp32 is not measured, so nothing starts beside it and
    `--runs-per-gpu auto` runs its cells alone; an override of what the peak does not depend
    on (the weight decay) keeps the measurement."""
    from lab.experiments.grid import estimate

    assert not _starts_ahead(monkeypatch, "small", 2, override)
    n, basis = estimate.auto_runs_per_gpu(_config_at("small", override), 139.8)
    assert n == 1 and "overrides change" in basis
    assert _starts_ahead(monkeypatch, "small", 2, "train.weight_decay=0.5")
    assert estimate.auto_runs_per_gpu(_config_at("small", "train.weight_decay=0.5"), 139.8)[0] == 2


def _config_at(preset: str, *overrides: str, variant: str = "baseline"):
    return resolve(variant, preset, list(overrides), data="synthetic")


def _starts_ahead(monkeypatch, preset: str, runs_per_gpu: int, *overrides: str) -> bool:
    handed = []
    monkeypatch.setattr(ahead, "gpu_memory_gib", lambda: 80.0)
    monkeypatch.setattr(ahead, "start_compile_ahead",
                        lambda configs, started, gpus, label, quiet: handed.append(gpus))
    cells = [_config_at(preset, *overrides),
             _config_at(preset, *overrides, variant="sdpa_headwise_sigmoid_mul")]
    ahead.start_for_grid(cells, 1, runs_per_gpu, ["0"], False, "grid test", True)
    return handed == [["0"]]


def _ignore_sigterm_then_wait(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


def test_close_ends_a_process_that_sigterm_does_not_end(monkeypatch):
    """Inside a training step Lightning's SIGTERM handler only notes the signal and the step
    (its compile) goes on: a process that does not end on SIGTERM is killed, not left
    compiling and holding GPU memory after the grid."""
    monkeypatch.setattr(ahead, "CLOSE_WAIT_S", 1.0, raising=False)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    process = context.Process(target=_ignore_sigterm_then_wait, args=(ready,), daemon=True)
    process.start()
    try:
        assert ready.wait(timeout=30)
        compile_ahead = object.__new__(ahead.CompileAhead)
        compile_ahead.process = process
        compile_ahead.close()
        assert not process.is_alive()
    finally:
        if process.is_alive():
            process.kill()
            process.join()


# A cell of the shape compiled ahead, as a grid's worker trains it: in a fresh interpreter, so
# that nothing an earlier test compiled in this process is what it finds.
CELL = """
import json, sys
from torch._dynamo.utils import counters
from lab.config import resolve
from lab.training.run import train_run
config = resolve("sdpa_headwise_sigmoid_mul", "tiny", ["train.compile=true"], seed=1, lr=1e-2,
                 data="synthetic", tokens=4 * 16 * 128)
result = train_run(config, quiet=True)
print(json.dumps({"status": result.status, **counters["inductor"]}))
"""


@pytest.mark.slow
def test_a_cell_loads_what_the_process_compiled_ahead(store, tmp_path, monkeypatch, capfd):
    """The process compiles one shape into an empty Inductor cache; a training run of that
    shape at another seed and learning rate then finds every graph it compiles there (its
    training step's and its evaluation's): no cache miss. Before 2026-12-06 the CPU's
    training batches were strided views, and the run's first validation traced and compiled
    a graph of its own (lab/data/windows.py)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    process = ahead.CompileAhead([_config("sdpa_headwise_sigmoid_mul")], {}, "grid test",
                                 quiet=False)
    process.process.join(timeout=240)
    process.close()  # (ends it, should the join have timed out)
    assert process.process.exitcode == 0
    assert "grid test: compiled sdpa_headwise_sigmoid_mul ahead" in capfd.readouterr().out

    cell = subprocess.run([sys.executable, "-c", CELL], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": str(REPO)})
    assert cell.returncode == 0, cell.stderr[-2000:]
    found = json.loads(cell.stdout.strip().splitlines()[-1])
    assert found["status"] == "FINISHED"
    assert found.get("fxgraph_cache_hit", 0) >= 2  # forward and backward
    assert found.get("fxgraph_cache_miss", 0) == 0
