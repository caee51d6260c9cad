"""The stability measures read from a run's per-step history: the loss-spike detector (the
paper gives no threshold; docs/paper.md §8.5) and the largest gradient norm after warmup.

A step is spiky when its loss exceeds the median of the preceding `window` steps by more
than max(k x robust std, floor), the robust std being 1.4826 x the median absolute
deviation of that window. Spiky steps closer than `merge` steps form one event; an event's
excess is its largest. The defaults (window 50, k 6, floor 0.1 nats, merge 20) are our
choice, in the spirit of an analysis of the paper's released curves (a rolling median and
excursions above 0.1 nats; docs/paper.md §7.5); all four are TrainConfig fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRAD_NORM_MAX_AFTER_WARMUP = "train/grad_norm_max_after_warmup"


@dataclass(frozen=True)
class Spike:
    start_step: int
    peak_step: int
    end_step: int
    max_excess: float


def detect_spikes(losses, steps=None, window: int = 50, k: float = 6.0, floor: float = 0.1,
                  merge: int = 20) -> list[Spike]:
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(len(losses)) if steps is None else np.asarray(steps)
    if len(losses) <= window:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(losses[:-1], window)  # row i: losses[i:i+window]
    median = np.median(windows, axis=1)
    robust_std = 1.4826 * np.median(np.abs(windows - median[:, None]), axis=1)
    current = losses[window:]
    excess = current - median
    threshold = np.maximum(k * robust_std, floor)
    spiky = np.flatnonzero(~np.isfinite(current) | (excess > threshold))
    events: list[Spike] = []
    for i in spiky:
        step, value = int(steps[i + window]), float(excess[i]) if np.isfinite(excess[i]) else float("inf")
        if events and step - events[-1].end_step <= merge:
            last = events[-1]
            peak = (step, value) if value > last.max_excess else (last.peak_step, last.max_excess)
            events[-1] = Spike(last.start_step, peak[0], step, peak[1])
        else:
            events.append(Spike(step, step, step, value))
    return events


def grad_norm_max_after_warmup(steps, grad_norms, warmup_steps: int) -> float:
    """The largest finite gradient norm (before clipping) of the steps after the LR warmup:
    the gradient excursions of a run that trains too hot (the paper's Fig. 1 right; §7.5).
    The whole run's largest (`train/grad_norm_max`) is the warmup's: in 100 of the 101 runs
    of the committed stores (2026-12-06) it fell in the first 70 steps, in 86 at steps 1-5,
    the initialisation's norm (about 4.5-5.3 in a baseline at `small`, 2.6-3.8 with a G1
    gate): a difference of initialisations, the same at every LR, not of stability.
    `steps` count optimizer steps from 1, so step k's gradient is taken after k - 1
    updates; those after warmup are k > warmup_steps. NaN where none."""
    late = [n for step, n in zip(steps, grad_norms) if step > warmup_steps and math.isfinite(n)]
    return max(late, default=float("nan"))
