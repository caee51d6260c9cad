"""lab/training/schedule.py: the steps a token budget buys, the micro-batches of a step, and
the learning-rate schedule (docs/paper.md §7.2: linear warmup, then cosine decay to
min_lr_ratio of the peak), against the formulas written out here."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lab.config import resolve
from lab.training.schedule import accumulation, lr_lambda, total_steps


def by_hand(step: int, total: int, warmup: int, floor: float) -> float:
    """The schedule as the docstring states it: warmup reaches the peak on its last step
    ((step + 1) / warmup), then 0.5 (1 + cos(pi t)) takes it from the peak to `floor`, with t
    the fraction of the decay steps done, held at 1 past the end."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(step - warmup, total - warmup) / (total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))


# 100 steps, 10 of them warmup, decay to a tenth of the peak.
@pytest.mark.parametrize("step, expected", [
    (0, 0.1),      # the first step already trains, at a tenth of the peak
    (4, 0.5),
    (9, 1.0),      # warmup's last step: the peak
    (10, 1.0),     # decay's first step: cos(0)
    (55, 0.55),    # halfway through the decay: floor + (1 - floor) / 2
    (100, 0.1),    # the budget's end: the floor
    (250, 0.1),    # past the end (a resumed run's extra steps): held at the floor
])
def test_the_schedule_at_named_steps(step, expected):
    assert lr_lambda(step, 100, 10, 0.1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("total, warmup, floor", [(100, 10, 0.1), (37, 1, 0.0), (5, 0, 0.25),
                                                  (1000, 50, 1.0)])
def test_every_step_matches_the_formula_and_the_decay_never_rises(total, warmup, floor):
    values = [lr_lambda(step, total, warmup, floor) for step in range(total + 3)]
    assert values == pytest.approx([by_hand(s, total, warmup, floor) for s in range(total + 3)])
    decay = values[warmup:]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))
    assert min(values[warmup:]) == pytest.approx(floor) and max(values) == pytest.approx(1.0)


def test_without_warmup_the_first_step_is_the_peak():
    assert lr_lambda(0, 50, 0, 0.1) == 1.0
    assert lr_lambda(25, 50, 0, 0.1) == pytest.approx(0.55)


def test_a_one_step_run_decays_over_that_step_without_dividing_by_zero():
    assert lr_lambda(0, 1, 0, 0.1) == 1.0
    assert lr_lambda(1, 1, 0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("tokens, batch, context, steps", [
    (4096, 8, 32, 16),         # tests/gridkit.py's tiny grid: 16 steps of 8 x 32 tokens
    (5000, 8, 32, 19),         # a part step is not trained: 5000 // 256
    (2e5, 16, 128, 97),        # the tiny preset's own budget
])
def test_total_steps_is_the_budget_over_the_tokens_of_one_step(tokens, batch, context, steps):
    config = resolve("baseline", "tiny", {"train.batch_size": batch, "model.context": context},
                     tokens=tokens)
    assert total_steps(config) == steps


def test_a_budget_under_one_step_still_counts_one():
    """A validated config has at least one step's tokens (lab/config.py check_token_budget);
    a config read back unvalidated (a checkpoint's, lab/export.py) still gets one step, not a
    zero that the schedule would divide by."""
    config = resolve("baseline", "tiny", {"train.batch_size": 8, "model.context": 32})
    assert total_steps(dataclasses.replace(
        config, train=dataclasses.replace(config.train, tokens=100))) == 1


@pytest.mark.parametrize("overrides, micro_batches", [
    ({}, 1),                                                        # micro_batch 0: the batch
    ({"train.micro_batch_size": 4}, 4),
    ({"train.micro_batch_size": 4, "train.devices": 2}, 2),         # 16 = 2 x 4 x 2 devices
    ({"train.devices": 4}, 1),                                      # each device its quarter
    ({"train.batch_size": 12, "train.micro_batch_size": 3}, 4),
])
def test_accumulation_is_the_micro_batches_of_one_optimizer_step(overrides, micro_batches):
    config = resolve("baseline", "tiny", overrides)
    assert accumulation(config) == micro_batches
    t = config.train
    assert micro_batches * t.micro_batch * t.devices == t.batch_size


def test_the_optimizer_of_a_run_follows_the_schedule_from_its_warmup_fraction():
    """What lab/training/module.py builds from these: warmup is the floor of
    warmup_fraction x the run's steps, and each scheduler step sets peak x the formula."""
    from lab.training.module import LanguageModel

    config = resolve("baseline", "tiny", {"train.warmup_fraction": 0.1,
                                          "train.min_lr_ratio": 0.2}, tokens=2e5, lr=1e-3)
    steps = total_steps(config)
    warmup = int(0.1 * steps)
    assert (steps, warmup) == (97, 9)
    optimizers = LanguageModel(config).configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps + 2):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-3 * by_hand(s, steps, warmup, 0.2)
                                  for s in range(steps + 2)])
