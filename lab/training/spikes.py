"""The loss-spike detector (the paper gives no threshold; docs/paper.md §8.5).

A step is spiky when its loss exceeds the median of the preceding `window` steps by more
than max(k x robust std, floor), the robust std being 1.4826 x the median absolute
deviation of that window. Spiky steps closer than `merge` steps form one event; an event's
excess is its largest. The defaults (window 50, k 6, floor 0.1 nats, merge 20) are our
choice, in the spirit of an analysis of the paper's released curves (a rolling median and
excursions above 0.1 nats; docs/paper.md §7.5); all four are TrainConfig fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
