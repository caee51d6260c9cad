"""benchmarks/stacked_seeds.py: S seeds trained as one stacked model train what S separate
runs of the bench's bare loop train (issue 38, item 5: "the check against one-seed
training"), on the CPU at the tiny preset."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lab.bench import BareLoop, bench_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("stacked_seeds", REPO / "benchmarks" / "stacked_seeds.py")
stacked_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stacked_seeds)


def _config(seed: int = 0):
    config = bench_config("baseline", "tiny", 3, 0, "synthetic",
                          ["train.batch_size=4", "train.grad_clip=0.05"])
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def test_stacked_seeds_train_what_separate_runs_train():
    """Three steps: each seed's weights in the stack against its own bare loop's (its own
    initial weights, data order, clipping, AdamW state). A clip of 0.05 makes every step clip,
    so a joint clip over the seeds would fail this. The tolerance: the batched matmuls round
    differently (4e-6 seen, steady over the steps), where a wrong clip, a shared optimizer
    state or another seed's data moves a weight by about the LR (3e-3) a step."""
    torch.manual_seed(123)
    stack = stacked_seeds.StackedLoop(_config(), seeds=2, warmup=0)
    separate = [BareLoop(_config(seed), warmup=0) for seed in (0, 1)]
    for _ in range(3):
        losses = stack.step()
        for loop in separate:
            loop.step()
    for seed, loop in enumerate(separate):
        for name, p in loop.model.named_parameters():
            assert torch.allclose(stack.params[name][seed], p.detach(), rtol=0, atol=2e-5), \
                (seed, name)
    assert losses.shape == (2,) and losses[0] != losses[1]


def test_each_seed_is_clipped_by_its_own_norm():
    grads = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.zeros(2, 1)}
    norms = stacked_seeds.clip_each_seed(grads, max_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert grads["a"][0].tolist() == pytest.approx([0.6, 0.8], rel=1e-5)  # clipped to 1
    assert grads["a"][1].tolist() == pytest.approx([0.3, 0.4])           # under: unchanged


def test_a_stack_that_fails_to_compile_is_timed_eager_and_says_why():
    stack = stacked_seeds.StackedLoop(_config(), seeds=2, warmup=0)

    def refused(*args):
        raise RuntimeError("dynamo cannot trace this")

    stack.grads_and_losses, stack.compiled = refused, True  # as a GPU's compile would fail
    assert stack.step().shape == (2,)
    timed = stack.time(1)
    assert timed["compiled"] is False and timed["tokens_per_s"] > 0
    assert timed["compile_error"] == "RuntimeError: dynamo cannot trace this"
