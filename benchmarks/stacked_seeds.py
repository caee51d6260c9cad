"""Several seeds of one variant trained as one model (issue 38, item 5): a timing loop.

PyTorch's own route to an ensemble (the model-ensembling recipe of torch.func):
`stack_module_state` stacks the seeds' weights along a new first dimension, `vmap` over
`functional_call` runs the one Decoder's code once for all of them, and `grad_and_value`
gives each seed its gradients. Each seed keeps its own initial weights, its own data order
(the sampler of its seed), its own gradient clipping and, through AdamW on the stacked
tensors (an elementwise update), its own optimizer state: the same training as S separate
runs, in one process and one set of kernels. The template the weights are called through is
a real copy of the model, not one on the `meta` device: the Decoder keeps a tensor outside
its parameters and buffers, and a `meta` template turned its logits uniform (2026-12-06,
benchmarks/README.md).

`StackedLoop` mirrors lab/bench.py's `BareLoop` (same data, precision, optimizer groups,
clipping; compiled where CUDA is), so `benchmarks/time_to_verdict.py` (section
`seed-batch-bound`) can set its tokens/s beside one seed's bare loop and the bound of one
model at S times the batch. This is a measurement, not a training path of the lab: it is
adopted only if it beats packed cells by the issue's 1.3x and a check against one-seed
training passes.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from lab.bench import time_steps
from lab.config import RunConfig
from lab.model.decoder import Decoder
from lab.model.params import model_flops_per_token
from lab.training.step import decays, train_sampler
from lab.training.corpus import open_data


def clip_each_seed(grads: dict[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each seed's gradient to `max_norm` in place, as clip_grad_norm_ clips one run's
    (over all its parameters); returns the seeds' norms before clipping."""
    squares = sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values())
    norms = squares.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


class StackedLoop:
    """S seeds of `config` as one stacked model; `time(steps)` as BareLoop.time."""

    def __init__(self, config: RunConfig, seeds: int, warmup: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        store, config = open_data(config)
        self.config, t = config, config.train
        models = []
        for seed in range(seeds):
            torch.manual_seed(t.seed + seed)
            models.append(Decoder(config.model).to(self.device))
        self.template = copy.deepcopy(models[0])
        params, self.buffers = stack_module_state(models)
        self.params = {name: p.detach().requires_grad_(False) for name, p in params.items()}
        del models
        # (lab.training.step.adamw's two groups, built here: adamw takes only parameters that
        # require grad, and these are plain tensors whose gradients torch.func returns)
        groups = [{"params": [p for n, p in self.params.items() if decays(n, t)],
                   "weight_decay": t.weight_decay},
                  {"params": [p for n, p in self.params.items() if not decays(n, t)],
                   "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                           fused=(self.device == "cuda") or None)
        self.samplers = [train_sampler(store, _with_seed(config, t.seed + s)) for s in range(seeds)]
        bf16 = t.precision_on(self.device == "cuda") == "bf16-mixed"
        template, device = self.template, self.device

        def seed_loss(p, b, inputs, targets):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                return functional_call(template, (p, b), (inputs,), {"targets": targets})

        eager = vmap(grad_and_value(seed_loss))
        self.eager, self.compiled, self.compile_error = eager, False, None
        self.grads_and_losses = eager
        if t.compile_on(self.device == "cuda"):
            # compile outside the transforms, the order torch.func's guide to torch.compile
            # supports ("torch.func interaction with torch.compile")
            self.grads_and_losses, self.compiled = torch.compile(eager), True
        self.seeds = seeds
        self.flops_per_token = model_flops_per_token(config)
        self.index = 0
        for _ in range(warmup):
            self.step()

    def _grads(self, *args):
        """The compiled transform; where it fails to compile, the eager one from then on,
        the error kept for the table (a slower number, said, beats no number)."""
        try:
            return self.grads_and_losses(*args)
        except Exception as err:  # noqa: BLE001
            if not self.compiled:
                raise
            self.compile_error = f"{type(err).__name__}: {err}"[:300]
            self.grads_and_losses, self.compiled = self.eager, False
            return self.grads_and_losses(*args)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [sampler.batch(self.index) for sampler in self.samplers]
        self.index += 1
        inputs = torch.stack([p[0] for p in pairs]).to(self.device, non_blocking=True)
        targets = torch.stack([p[1] for p in pairs]).to(self.device, non_blocking=True)
        return inputs, targets

    def step(self) -> torch.Tensor:
        inputs, targets = self._batch()
        grads, losses = self._grads(self.params, self.buffers, inputs, targets)
        clip_each_seed(grads, self.config.train.grad_clip)
        for name, p in self.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def time(self, steps: int) -> dict:
        # S seeds' windows a step: the rate of the whole stack, comparable to S cells' sum.
        stacked = _with_batch(self.config, self.config.train.batch_size * self.seeds)
        return {**time_steps(self.step, steps, stacked, self.flops_per_token),
                "compiled": self.compiled, "compile_error": self.compile_error}


def _with_seed(config: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def _with_batch(config: RunConfig, batch: int) -> RunConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch))
