"""The step arithmetic of a run: how many optimizer steps its token budget buys, how many
micro-batches make one step, and the learning-rate schedule (docs/paper.md §7.2: warmup,
then cosine decay). Kept apart from the Lightning module so that planning a grid or a
sweep (which needs the step count) does not import Lightning.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.config import RunConfig


def lr_lambda(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine decay to min_ratio x peak at total_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(total: int, warmup_fraction: float) -> int:
    """The steps of the linear warmup: the first `warmup_fraction` of the run's `total`."""
    return int(warmup_fraction * total)


def total_steps(config: RunConfig) -> int:
    return steps_for_tokens(config.train.tokens, config.train.batch_size, config.model.context)


def steps_for_tokens(tokens: float, batch_size: int, context: int) -> int:
    """The optimizer steps a budget of `tokens` buys at `batch_size` windows of `context`
    tokens a step (also from a finished run's params: lab/reports/grid_report.py)."""
    return max(1, int(tokens // (batch_size * context)))


def accumulation(config: RunConfig) -> int:
    return config.train.batch_size // (config.train.micro_batch * config.train.devices)
