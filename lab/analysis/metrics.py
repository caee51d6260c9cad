"""The paper's analyses as metrics every run records (docs/paper.md §8 and §7.6; claims 6-9
and 12 of docs/paper.md §10), and `analyze`, which runs them all on a model.

- Attention sink, F-Attn (Fig. 2, Table 4; docs/paper.md §8.1): the attention probability
  queries put on key position 0, averaged over heads and query positions, per layer and
  over layers.
- Massive activations, M-Act (Fig. 6, Table 4; docs/paper.md §8.2): per layer the max |x| of
  the residual stream after the layer, and of the attention and FFN outputs, with the token
  position of the max.
- Gate statistics (Fig. 3, Fig. 7, Table 4; docs/paper.md §8.3) and the sparsity of the SDPA
  output before and after the G1 gate, with the "average gate" control (App. A.3,
  Figs. 4-5; docs/paper.md §8.4).
- Long-context extrapolation and BOS reliance: lab/analysis/perplexity.py.

The first three come from one exact-attention forward over held-out validation windows;
its probe (lab/analysis/probes.py, which also states what each average leaves out) keeps
per-layer sums, which this module turns into metrics and per-layer lists. Metric names:
lab/analysis/names.py.

Choices where the paper is silent (docs/paper.md §8, docs/paper.md §11):
- Windows: the paper's models read documents that start with BOS, so F-Attn is measured on
  validation windows that start at a document boundary (position 0 is the end-of-text token,
  which doubles as BOS here). The same metrics on evenly spread unaligned windows carry the
  suffix `_random`: a sink on "whatever comes first" and a sink on the BOS token differ there.
- Sink head share (Gu et al., ICLR 2025, "When attention sink emerges in language models"):
  the share of all heads whose mean attention on position 0 (over windows and queries >= 1)
  exceeds `train.sink_head_threshold` (0.3, their threshold), on the BOS windows (suffix
  none), the random ones (`_random`), the BOS windows cut to their first
  `train.sink_short_window` tokens (64; `_short`: Gu et al.'s window, on which they measure
  Sink^0.3) and random windows of that length, without BOS (`_short_random`: a sink on the
  first token whatever it is, Gu et al.'s default setting). Gu et al. find the sink emerges
  with training steps (between about 1k and 2k steps for their 60M model) and grows with
  weight decay and learning rate, and that with 50M-100M unique training tokens it stays
  under 2% of heads through 5k steps: a share near 0 is a measurement of the training
  budget, not of the gate (ablations/sink.yaml is set where a sink forms).
- Largest attention logit per layer (`attn/logit_max`), on the BOS windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lab.analysis.names import layer_metric, threshold_name
from lab.analysis.perplexity import bos_reliance, long_context_perplexity
from lab.analysis.probes import ACTIVATION_CURVES, SPARSITY_THRESHOLDS, ProbeRecorder, record
from lab.config import RunConfig
from lab.data.store import TokenStore
from lab.data.windows import eval_windows

ATTENTION_MAP_LAYERS = 4            # layers drawn in attention_maps.png


@dataclass
class Analysis:
    metrics: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, list] = field(default_factory=dict)
    gate_samples: np.ndarray | None = None
    attention_maps: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was measured (non-finite weights)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "per_layer": self.per_layer, "skipped": self.skipped}


def _nanmean(values: Sequence[float] | None) -> float:
    finite = [v for v in values or [] if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _attention_layers(n_layers: int) -> list[int]:
    count = min(ATTENTION_MAP_LAYERS, n_layers)
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, count)})


def probe_metrics(model, store: TokenStore, windows: int, map_layers: Sequence[int] = (),
                  sink_head_threshold: float = 0.3, sink_short_window: int = 64) -> Analysis:
    """F-Attn and the most-attended key on windows that open with BOS and on random windows;
    M-Act, gate statistics and SDPA sparsity on the BOS ones. The BOS windows are spread over
    the whole split with BOS at position 0 (bos_prefix), so there are as many distinct ones
    as asked for even when the split holds a few long documents. The sink's head share
    (`_sink_metrics`) also on the first `sink_short_window` tokens of the BOS windows and of
    random windows (with and without BOS at position 0), as Gu et al. (ICLR 2025) measure it."""
    cfg = model.cfg
    gate = cfg.gate if any(b.attn.gate_active for b in model.blocks) else None
    result = Analysis()
    short = min(sink_short_window, cfg.context)
    for suffix, aligned, length in (("", True, cfg.context), ("_random", False, cfg.context),
                                    ("_short", True, short), ("_short_random", False, short)):
        data = eval_windows(store, "valid", cfg.context, windows, bos_prefix=aligned)
        recorder = ProbeRecorder(cfg.n_layers, gate, store.eos_id,
                                 map_layers if suffix == "" else (),
                                 sink_only=suffix != "")  # other windows: only their sink
        record(model, data, recorder, length=length)
        _sink_metrics(recorder, suffix, result, sink_head_threshold)
        if suffix == "":
            result.attention_maps = recorder.attention_maps
            _logit_metrics(recorder, result)
            _activation_metrics(recorder, result)
            _sparsity_metrics(recorder, result)
            _gate_metrics(recorder, result)
    return result


def _sink_metrics(recorder: ProbeRecorder, suffix: str, result: Analysis,
                  head_threshold: float = 0.3) -> None:
    L, m = recorder.n_layers, result.metrics
    first = recorder.mean("first_token_attn")
    heads = recorder.head_first_token_attn()
    result.per_layer[f"head_first_token_attn{suffix}"] = heads
    over = [sum(value > head_threshold for value in layer) for layer in heads]
    m[f"sink/head_share{suffix}"] = sum(over) / sum(len(layer) for layer in heads)
    positions, values = recorder.top_key()
    eos = recorder.mean("eos_attn")
    result.per_layer.update({f"first_token_attn{suffix}": first,
                             f"top_key_position{suffix}": positions,
                             f"top_key_attn{suffix}": values, f"eos_attn{suffix}": eos})
    m[f"sink/first_token_attn{suffix}"] = _nanmean(first)
    m[f"sink/eos_attn{suffix}"] = _nanmean(eos)
    for layer in range(L):
        m[layer_metric(f"sink/first_token_attn{suffix}", layer, L)] = first[layer]
        m[layer_metric(f"sink/top_key_position{suffix}", layer, L)] = positions[layer]


def _logit_metrics(recorder: ProbeRecorder, result: Analysis) -> None:
    L, maxima = recorder.n_layers, recorder.logit_maxima()
    result.per_layer["attn_logit_max"] = maxima
    result.metrics["attn/logit_max"] = max(maxima)
    for layer in range(L):
        result.metrics[layer_metric("attn/logit_max", layer, L)] = maxima[layer]


def _activation_metrics(recorder: ProbeRecorder, result: Analysis) -> None:
    L, m, per_layer = recorder.n_layers, result.metrics, result.per_layer
    for curve in ACTIVATION_CURVES:
        per_layer[f"max_{curve}"], per_layer[f"max_{curve}_position"] = \
            recorder.activation_maxima(curve)
    # M-Act (Table 4): the mean over layers of the residual stream's max after each layer.
    m["act/max_mean"] = _nanmean(per_layer["max_ffn_residual"])
    for curve in ACTIVATION_CURVES[:3]:
        m[f"act/{curve}_max_mean"] = _nanmean(per_layer[f"max_{curve}"])
    for layer in range(L):
        m[layer_metric("act/max", layer, L)] = per_layer["max_ffn_residual"][layer]


def _sparsity_metrics(recorder: ProbeRecorder, result: Analysis) -> None:
    # (probe prefix, metric suffix): the SDPA output, after the G1 gate, and the control.
    for kind, suffix in (("sdpa", ""), ("sdpa_gated", "_gated"),
                         ("sdpa_average_gate", "_average_gate")):
        abs_mean = recorder.mean(f"{kind}_abs_mean")
        if abs_mean is None:
            continue
        result.per_layer[f"{kind}_abs_mean"] = abs_mean
        if kind != "sdpa_average_gate":  # Fig. 4
            result.metrics[f"sdpa/abs_mean{suffix}"] = _nanmean(abs_mean)
        for threshold in SPARSITY_THRESHOLDS:  # Fig. 5
            label = threshold_name(threshold)
            fractions = recorder.mean(f"{kind}_below_{label}")
            result.per_layer[f"{kind}_below_{label}"] = fractions
            result.metrics[f"sdpa/sparsity_{label}{suffix}"] = _nanmean(fractions)


def _gate_metrics(recorder: ProbeRecorder, result: Analysis) -> None:
    stats = recorder.gate_layers()
    if stats is None:
        return
    L, m = recorder.n_layers, result.metrics
    result.per_layer.update(stats)
    result.gate_samples = np.concatenate([np.concatenate(recorder.gate_samples[layer])
                                          for layer in range(L)])
    # Pooled over layers, tokens and elements (Table 4's gate score; Fig. 7 per layer).
    m["gate/mean"] = _nanmean(stats["gate_mean"])
    m["gate/std"] = math.sqrt(max(_nanmean(recorder.mean("gate_square")) - m["gate/mean"] ** 2, 0))
    m["gate/min"], m["gate/max"] = min(stats["gate_min"]), max(stats["gate_max"])
    for layer in range(L):
        m[layer_metric("gate/mean", layer, L)] = stats["gate_mean"][layer]


def analysis_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def analyze(model, store: TokenStore, config: RunConfig, windows: int | None = None,
            factors: Sequence[int] | None = None, maps: bool = True) -> Analysis:
    """Every analysis of the module docstring on `model` (left in the mode it came in)."""
    windows = config.train.analysis_windows if windows is None else windows
    factors = config.train.context_factors() if factors is None else factors
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return Analysis(skipped="non-finite weights")
    was_training = model.training
    model.eval()
    try:
        layers = _attention_layers(config.model.n_layers) if maps else ()
        result = probe_metrics(model, store, windows, layers, config.train.sink_head_threshold,
                               config.train.sink_short_window) if windows else Analysis()
        device = next(model.parameters()).device
        # Evaluate in the precision the run trained in (bf16 autocast), else in float32.
        bf16 = config.train.precision_on(device.type == "cuda") == "bf16-mixed"
        autocast_dtype = torch.bfloat16 if bf16 else None
        if factors:
            result.metrics.update(long_context_perplexity(
                model, store, config.model.context, factors, max(windows, 1),
                config.data.bos_aligned, config.data.bos_prefix, autocast_dtype))
        if windows and (config.data.bos_prefix or config.data.bos_aligned):
            result.metrics.update(bos_reliance(model, store, config.model.context, windows,
                                               autocast_dtype))
    finally:
        model.train(was_training)
    return result
