"""The training step without Lightning: the optimizer and its weight-decay rule, torch.compile
with the lab's Inductor cache, CUDA graphs, the training windows and the step's loss. The
Lightning module (lab/training/module.py) and the bench's bare loop (lab/bench.py) both
step through these, and a grid's own process (its check, its compile cache) needs them
without importing Lightning, which takes 9 of the 19 s a grid process spends importing on
the lent GPU machine (benchmarks/README.md): the cells' workers import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

import lab
from lab.config import RunConfig, TrainConfig
from lab.data.store import TokenStore, cache_root
from lab.data.windows import WindowSampler
from lab.model.decoder import Decoder


# Parameters kept out of weight decay, by name: norm gains and biases (nanoGPT's
# `configure_optimizers` rule, written by name so a 2-D tensor that is not a matrix, such as
# the input-independent gate's b, is not decayed for its rank alone).
_NO_DECAY = re.compile(r"(^|\.)\w*norm\.weight$|\.(\w+_)?bias$")  # `.bias`, `.gate_bias`
GATE_CONSTANT = re.compile(r"(^|\.)gate_constant$")  # Table 4 row 6's b (lab/model/decoder.py)


def decays(name: str, train: TrainConfig) -> bool:
    """Whether the parameter called `name` (as `named_parameters` spells it) is weight-decayed:
    matrices and embeddings are (gate logit weights too: they are rows of the fused input
    projection), norm gains and biases (the gate bias included) are not, and the
    input-independent gate's b is as `train.gate_constant_decay` says (default: not)."""
    if GATE_CONSTANT.search(name):
        return train.gate_constant_decay
    return not _NO_DECAY.search(name)


def adamw(named_parameters, config: RunConfig, fused: bool) -> torch.optim.AdamW:
    """The lab's optimizer (also the bench's bare loop's), from `named_parameters()`: two
    groups, decayed and not (`decays`), frozen parameters left out."""
    t = config.train
    params = [(name, p) for name, p in named_parameters if p.requires_grad]
    groups = [{"params": [p for name, p in params if decays(name, t)], "weight_decay": t.weight_decay},
              {"params": [p for name, p in params if not decays(name, t)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=fused or None)


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache() -> str:
    """Inductor's on-disk caches (the FX graph cache, the AOTAutograd cache and the Triton
    kernels, all on by default in torch 2.11) in the lab's cache folder, `inductor/`, instead
    of the temporary folder: one place that every cell of a grid, the grid's check and the
    next grid on the machine share, and that can be carried to a lent machine's next call.
    Must be set before anything compiles (inductor reads it once, compile_model) and before
    a grid or sweep starts its workers, which inherit the environment (lab/experiments/pool.py)
    and so cannot tell torch's folder from one the user named.
    A TORCHINDUCTOR_CACHE_DIR the user set is kept; the one torch sets to its temporary
    default on importing torch._dynamo (Lightning imports it) is replaced: until 2026-12-06
    it was kept, and a grid that trained in its own process compiled into the temporary
    folder (lab/__init__.py INDUCTOR_CACHE_GIVEN)."""
    current = os.environ.get(COMPILE_CACHE_ENV)
    if current is not None and (lab.INDUCTOR_CACHE_GIVEN or current != _torch_default_cache()):
        return current
    os.environ[COMPILE_CACHE_ENV] = folder = str(cache_root() / "inductor")
    return folder


def _torch_default_cache() -> str | None:
    """The folder torch gives Inductor when none is named (None where this torch has no such
    function: every set value is then kept)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()


def compile_model(model: Decoder, mode: str) -> Decoder:
    """torch.compile in place, as every compiled path of the lab does it (training, the
    bench's bare loop, `gatelab check`): state-dict keys stay unprefixed, and `forward`
    called directly stays eager (lab/analysis/probes.py's `record` relies on that)."""
    use_compile_cache()
    model.compile(mode=mode)
    return model


def compile_shape(config: RunConfig) -> str:
    """What decides a run's compiled graph (the model, the micro-batch, the compile mode,
    the precision and the loss kernel; not the seed or the learning rate): runs with the
    same value load each other's graphs from Inductor's cache (a grid's --warm-first), and
    a process keeps Dynamo's for the next (compile_for_training)."""
    t = config.train
    return json.dumps([dataclasses.asdict(config.model), t.micro_batch, t.compile, t.compile_mode,
                       t.precision, t.fused_loss], sort_keys=True, default=str)


def kept_shape(config: RunConfig) -> str | None:
    """The compile_shape across whose runs a process keeps Dynamo's caches
    (compile_for_training), or None where it keeps none: under CUDA graphs (the grid's pool
    then has no model to give a worker first, lab/experiments/pool.py)."""
    return None if config.train.compile_mode in CUDAGRAPH_MODES else compile_shape(config)


# The kept_shape of the model this process last compiled for training.
_compiled_last: str | None = None


def compile_for_training(model: Decoder, config: RunConfig) -> bool:
    """compile_model for a training run of `config`, Dynamo's caches reset
    (torch.compiler.reset) unless this process's last one had the same compile_shape;
    returns whether they were kept.

    Reset: a grid or sweep worker trains many models in one process, all through the one
    code object `Decoder.forward`, and graphs of earlier models piled up behind guards until
    Dynamo's recompile limit (8) made it train the next models eagerly (one H200,
    2026-12-02: a worker's cells from the fifth on ran at 0.46M tokens/s instead of 1.1M).
    Kept: the worker's next cell of the same shape (another seed or LR; the grid's pool
    hands it one where it can) reuses the graphs already traced, whose guards it passes
    (they guard the configuration and take the weights as inputs: tests/unit/test_step.py),
    instead of tracing again and loading them from Inductor's disk cache (3.5 s of a
    `small` cell on one H100, 2026-12-06). Which graph runs is Dynamo's guards' choice
    either way; this only decides when to clear. Not under CUDA graphs: the earlier model's
    recorded graphs hold their memory pool, and whether a new model's re-recording frees it
    is not measured on a GPU yet."""
    global _compiled_last
    shape = kept_shape(config)
    kept = shape is not None and shape == _compiled_last
    if not kept:
        torch.compiler.reset()
    compile_model(model, config.train.compile_mode)
    _compiled_last = shape
    return kept


# torch.compile modes that capture CUDA graphs (torch._inductor.list_mode_options).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def uses_cudagraphs(train: TrainConfig, cuda: bool) -> bool:
    """Whether this run's compiled model replays CUDA graphs (only ever on a GPU)."""
    return cuda and train.compile_on(cuda) and train.compile_mode in CUDAGRAPH_MODES


def begin_cudagraph_step(enabled: bool) -> None:
    """Tell CUDA Graph Trees that a new step begins. They assume one only when a forward
    follows a finished backward; the lab's evaluation runs the training graph forward with no
    backward (lab/training/module.py LanguageModel._eval_step), which without this mark
    leaves a backward pending and makes the next call record a new graph instead of replaying
    one (docs.pytorch.org/docs/stable/torch.compiler_cudagraph_trees.html, "Limitations").
    The mark also means that the previous step's graph outputs may be overwritten: whatever
    is kept past a step is a copy (LanguageModel.training_step)."""
    if enabled:
        torch.compiler.cudagraph_mark_step_begin()


def train_sampler(store: TokenStore, config: RunConfig) -> WindowSampler:
    """The training windows of a run (the bench's bare loop draws the same ones)."""
    t = config.train
    return WindowSampler(store, config.model.context, t.micro_batch, t.seed,
                         config.data.bos_aligned, bos_prefix=config.data.bos_prefix)


def step_loss(model: Decoder, inputs: torch.Tensor, targets: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """What a training step minimises: the LM loss plus the model's auxiliary losses (the
    MoE router's). Returns that sum, the LM loss and the auxiliary losses by name."""
    lm_loss = model(inputs, targets=targets)
    aux_losses = model.aux_losses()
    return lm_loss + sum(aux_losses.values()), lm_loss, aux_losses
