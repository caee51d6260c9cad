"""Validation perplexity with one thing changed from training, and the eager scorer both
use (`mean_loss`, also benchmarks/eval_check.py's):

- Long-context extrapolation (the paper's section 4.4, Table 5, at our scale;
  docs/paper.md §7.6 and §9.5): perplexity at multiples of the trained context, with RoPE
  as trained and with YaRN. Windows of factor x context tokens from the validation split,
  the same number of tokens at every factor; perplexity over all positions of the window.
  YaRN's factor is the multiple (128k/32k = 4 in the paper; its setting is not stated).
- BOS reliance (a lab addition): for models trained with BOS at position 0, the same text
  after BOS and without it.

Metric names: lab/analysis/names.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lab.analysis.names import long_context_metric
from lab.data.store import TokenStore
from lab.data.windows import eval_windows
from lab.errors import LabError

LONG_CONTEXT_TOKENS_PER_FORWARD = 8  # x context: tokens per long-context forward
IGNORED_TARGET = -100               # cross-entropy's ignore_index: predictions left out


@torch.no_grad()
def long_context_perplexity(model, store: TokenStore, context: int, factors: Sequence[int],
                            windows: int, bos_aligned: bool = False, bos_prefix: bool = False,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Validation perplexity on windows of factor x context tokens (section 4.4 at our scale).

    RoPE as trained (`long/ppl_2x`) and YaRN with factor = the multiple (`long/ppl_2x_yarn`;
    at 1x YaRN is plain RoPE, so only `long/ppl_1x`). Every factor reads the same tokens:
    ceil(windows / largest factor) validation spans of largest-factor x context tokens, each
    cut into windows of factor x context, so the factors differ only in how much context
    each prediction has (paired, not independent, samples). Perplexity is over all positions
    of each window. A factor the split is too short for, or that runs out of GPU memory,
    is left out with a message.
    """
    if not factors:
        return {}
    device = next(model.parameters()).device
    longest = max(factors) * context
    try:
        spans = eval_windows(store, "valid", longest, math.ceil(windows / max(factors)),
                             bos_aligned=bos_aligned, bos_prefix=bos_prefix)
    except LabError as err:
        print(f"analysis: long-context perplexity skipped: {err}", flush=True)
        return {}
    original_rope = model.rope
    results: dict[str, float] = {}
    try:
        for factor in factors:
            length = factor * context
            data = torch.cat([spans[:, start:start + length + 1]
                              for start in range(0, longest - length + 1, length)])
            if bos_prefix and not bos_aligned:
                data[:, 0] = store.eos_id
            batch = max(1, LONG_CONTEXT_TOKENS_PER_FORWARD * context // length)
            for yarn in ((False, True) if factor > 1 else (False,)):
                model.set_yarn(float(factor) if yarn else 1.0)
                try:
                    loss = mean_loss(model, data, batch, device, autocast_dtype)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"analysis: {long_context_metric(factor, yarn)} skipped: out of GPU "
                          "memory", flush=True)
                    continue
                results[long_context_metric(factor, yarn)] = math.exp(min(loss, 80.0))
    finally:
        model.rope = original_rope
    return results


def mean_loss(model, data: torch.Tensor, batch: int, device, autocast_dtype,
               skip_first: int = 0) -> float:
    """Mean next-token loss over `data` windows (n, T + 1), leaving out the first
    `skip_first` predictions of each window."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(data), batch):
        windows = data[start:start + batch].to(device)
        targets = windows[:, 1:].clone()
        targets[:, :skip_first] = IGNORED_TARGET
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            # forward, not __call__, as record() does: through an in-place torch.compile each
            # long-context length and batch is a new graph, about 90 s of recompiles per run
            # at `small`, which also spent Dynamo's recompile limit so that the next cells
            # of a grid worker trained eagerly at 0.4x (docs/results.md, 2026-12-02 calls).
            total += model.forward(windows[:, :-1], targets=targets, reduction="sum").double()
        count += targets[:, skip_first:].numel()
    return float(total) / count


@torch.no_grad()
def bos_reliance(model, store: TokenStore, context: int, windows: int,
                 autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """How much a model trained with BOS at position 0 needs it there (a lab addition; the
    paper does not measure it). The same validation text twice: after BOS, and with position
    0 holding the text token before it. Perplexity over the same targets, every prediction
    but the first (whose context differs): `sink/ppl_with_bos`, `sink/ppl_without_bos` and
    their ratio `sink/bos_reliance`. A model that parks attention on BOS, as on a sink, loses
    more than one that does not; 1.0 means it does not care."""
    device = next(model.parameters()).device
    without_bos = eval_windows(store, "valid", context, windows)  # (n, context + 1), plain text
    with_bos = without_bos.clone()
    with_bos[:, 0] = store.eos_id
    batch = LONG_CONTEXT_TOKENS_PER_FORWARD
    loss_with = mean_loss(model, with_bos, batch, device, autocast_dtype, skip_first=1)
    loss_without = mean_loss(model, without_bos, batch, device, autocast_dtype, skip_first=1)
    return {"sink/ppl_with_bos": math.exp(min(loss_with, 80.0)),
            "sink/ppl_without_bos": math.exp(min(loss_without, 80.0)),
            "sink/bos_reliance": math.exp(min(loss_without - loss_with, 80.0))}
