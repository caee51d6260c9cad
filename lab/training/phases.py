"""Where a run's wall clock goes: its phases, each logged as the metric `time/<phase>_s`.

GPU time is lent by the minute, and a cell's steady step is only part of its wall clock
(issue "Time to a verdict": a deep-narrow cell spent 52 s of its 240 compiling). Every run
logs, at its end, the seconds of each phase of PHASES and `time/total_s`, their sum;
`time/other_s` is what no phase claims (Lightning's loop between hooks, its teardown), so
the phases add up to the total by construction and a large `other` says something is not
measured. `gatelab grid` sums them over its cells into one line (`breakdown`).

The clocks are wall-clock seconds (`time.perf_counter`); the ones inside training
(validation, checkpoints, periodic analysis) synchronise the GPU before they start, so the
steps queued before them count as training (lab/training/callbacks.py).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from lab.records.owners import process_start

# Phase -> what it holds. The order is the order of a run.
PHASES = {
    "startup": "process start and imports, up to the run's start, or a pool worker's to the end "
               "of its imports (first run of a process only)",
    "check_share": "the grid's `gatelab check`, divided over the cells it started",
    "data_open": "opening the token store and checking the batch fits",
    "store": "MLflow store writes outside training: the run, its params, its final metrics "
             "and artifacts (a grid cell's claim too)",
    "model_build": "the model, the Trainer and Lightning's setup up to the first step "
                   "(device placement, optimizer, a resumed checkpoint's restore)",
    "compile": "the first step beyond a steady step's time (torch.compile; 0 when eager)",
    "train_steps": "the training steps, the first at a steady step's cost",
    "validation": "the periodic validations inside training",
    "periodic_analysis": "the probe analyses every train.analysis_every steps",
    "checkpoint": "checkpoint writes (and the wait for the metrics queued before each)",
    "final_eval": "the final validation and the test evaluation",
    "analysis": "the end-of-run analysis (probes, long context) and its artifacts",
    "other": "what no phase claims: Lightning's loop between hooks, its teardown",
}


# The parts of model_build, logged as `time/model_build/<part>_s` (they sum to it): on one
# H100 (2026-12-06, benchmarks/README.md "The third round") a `small` cell's build took 3.3 s
# in a worker's first cell (`setup` 2.6 s: CUDA's start, device placement; `construct` 0.6)
# and 0.22-0.28 s in its later cells; 0.2 s on the CPU machine.
MODEL_BUILD_PARTS = {
    "construct": "the model on the CPU, the data module, the callbacks and the Trainer",
    "monitor": "MLflow's system-metrics sampler started (records.system_metrics)",
    "setup": "Lightning's fit up to on_fit_start: compile wrapping, device placement, optimizer"
             " (a resume: the checkpoint read, its weights restored)",
    "loop": "on_fit_start to the training loop's start: dataloaders, the loop's own setup"
            " (a resume: the optimizer's and the loop's state restored)",
}


def metric(phase: str) -> str:
    return f"time/{phase}_s"


def model_build_metric(part: str) -> str:
    return f"time/model_build/{part}_s"


TOTAL_METRIC = "time/total_s"

_startup_taken = False
_startup_s: float | None = None  # set by end_startup


def _process_started_at() -> float | None:
    """This process's start as a Unix time (Linux: its start in clock ticks since boot, as
    the owner tags read it, plus the boot time; 10 ms resolution), None elsewhere."""
    try:
        ticks = int(process_start(os.getpid()))
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def _seconds_since_start() -> float:
    started = _process_started_at()
    return max(0.0, time.time() - started) if started is not None else 0.0


def end_startup() -> None:
    """This process's start-up ends now: a pool worker that has imported what it trains with
    and may then wait for work (lab/experiments/pool.py), a wait that is not start-up."""
    global _startup_s
    if _startup_s is None:
        _startup_s = _seconds_since_start()


def startup_seconds() -> float:
    """Seconds from this process's start to now (or to end_startup, where it was called), the
    first time it is asked in a process; 0 afterwards (a grid worker pays its interpreter and
    imports once, with its first cell)."""
    global _startup_taken
    if _startup_taken:
        return 0.0
    _startup_taken = True
    return _startup_s if _startup_s is not None else _seconds_since_start()


class PhaseClock:
    """The phases of one run. `before` holds phases measured before the run's own clock
    started (a grid cell's claim, its share of the check, the process's startup)."""

    def __init__(self, before: dict[str, float] | None = None):
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.details: dict[str, float] = {}  # metric -> seconds: a phase's parts, logged as given
        self._before = 0.0
        for name, seconds in (before or {}).items():
            self.add(name, seconds)
            self._before += seconds

    def add(self, phase: str, seconds: float) -> None:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
        self.seconds[phase] += max(0.0, seconds)

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def metrics(self) -> dict[str, float]:
        """Every phase and the total up to now: `other` is the clock's time less the named
        phases, and the total their sum (so were phases to overlap, the total would exceed
        the wall clock, which tests/integration/test_phases.py compares it with)."""
        elapsed = time.perf_counter() - self.started + self._before
        named = {name: s for name, s in self.seconds.items() if name != "other"}
        out = {metric(name): s for name, s in named.items()}
        out[metric("other")] = max(0.0, elapsed - sum(named.values()))
        out[TOTAL_METRIC] = sum(named.values()) + out[metric("other")]
        return {**out, **self.details}


def phase_seconds(metrics: dict[str, float]) -> dict[str, float]:
    """The phases of a run's metrics (`time/<phase>_s`), by phase name."""
    return {name: metrics[metric(name)] for name in PHASES if metric(name) in metrics}


def breakdown(sums: dict[str, float], cells: int) -> str:
    """One line: the share of each phase in the cells' summed wall clock, largest first
    (phases under 0.5% left out), training steps always shown."""
    total = sum(sums.values())
    if not total:
        return f"time: no phases recorded for {cells} cell(s)"
    parts = [(name, seconds) for name, seconds in sorted(sums.items(), key=lambda kv: -kv[1])
             if seconds / total >= 0.005 or name == "train_steps"]
    text = ", ".join(f"{name.replace('_', ' ')} {100 * seconds / total:.0f}% ({seconds:,.0f} s)"
                     for name, seconds in parts)
    return f"time in {cells} cell(s), {total:,.0f} s summed: {text}"
