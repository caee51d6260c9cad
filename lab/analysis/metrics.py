"""The paper's analyses as metrics every run records (docs/paper.md §8 and §7.6; claims 6-9
and 12 of docs/paper.md §10).

- Attention sink, F-Attn (Fig. 2, Table 4; docs/paper.md §8.1): the attention probability
  queries put on key position 0, averaged over heads and query positions, per layer and
  over layers.
- Massive activations, M-Act (Fig. 6, Table 4; docs/paper.md §8.2): per layer the max |x| of
  the residual stream after the layer, and of the attention and FFN outputs, with the token
  position of the max.
- Gate statistics (Fig. 3, Fig. 7, Table 4; docs/paper.md §8.3) and the sparsity of the SDPA
  output before and after the G1 gate, with the "average gate" control (App. A.3,
  Figs. 4-5; docs/paper.md §8.4).
- Long-context extrapolation (the paper's section 4.4, Table 5, at our scale;
  docs/paper.md §7.6 and §9.5): validation perplexity at multiples of the trained context,
  with RoPE as trained and with YaRN.

The first three run one exact-attention forward (`Decoder.forward(tokens, probe=...)`; SDPA
returns no probabilities) over held-out validation windows; `ProbeRecorder` reduces every
probed tensor to per-layer sums as it arrives, so memory holds one layer's attention at a time.

Choices where the paper is silent (docs/paper.md §8, docs/paper.md §11):
- Windows: the paper's models read documents that start with BOS, so F-Attn is measured on
  validation windows that start at a document boundary (position 0 is the end-of-text token,
  which doubles as BOS here). The same metrics on evenly spread unaligned windows carry the
  suffix `_random`: a sink on "whatever comes first" and a sink on the BOS token differ there.
- Query position 0 is excluded from every attention average: it can attend only to itself,
  so it would add 1/T of trivial first-token mass.
- The most-attended key position per layer is the argmax of the attention each key position
  receives, averaged over all (head, query >= 1) rows; a sink that forms elsewhere than
  position 0 shows there. `sink/eos_attn*` is the mass on end-of-text tokens inside the window
  (positions >= 1), averaged over the queries that can see one: a delimiter sink.
- M-Act takes max |x| (absolute value) over every token and channel of the windows.
- Gate statistics pool every layer, token and element of the probed scores; the histogram
  keeps an evenly strided sample of each batch's scores.
- The average-gate control applies the layer's mean gate score over the same batch.
- Long context: windows of factor x context tokens from the validation split, the same
  number of tokens at every factor; perplexity over all positions of the window. YaRN's
  factor is the multiple (128k/32k = 4 in the paper; its setting is not stated).

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
- Largest attention logit per layer (pre-softmax, scale applied; Wortsman et al. 2023, whose
  early warning of divergence it is), on the BOS windows.

Metric names (what `gatelab report` reads): `sink/first_token_attn`,
`sink/first_token_attn_random`, `sink/first_token_attn_short`,
`sink/first_token_attn_short_random`, `sink/head_share`, `sink/head_share_random`,
`sink/head_share_short`, `sink/head_share_short_random`, `attn/logit_max` (and per layer),
`sink/eos_attn`, `sink/eos_attn_random`, `act/max_mean`,
`act/attn_output_max_mean`, `act/attn_residual_max_mean`, `act/ffn_output_max_mean`,
`gate/mean|std|min|max`, `sdpa/abs_mean`, `sdpa/abs_mean_gated`, `sdpa/sparsity_1e-2`,
`sdpa/sparsity_1e-2_gated`, `sdpa/sparsity_1e-2_average_gate` (and 1e-3),
`long/ppl_<k>x`, `long/ppl_<k>x_yarn`, and for models trained with BOS at position 0
`sink/ppl_with_bos`, `sink/ppl_without_bos`, `sink/bos_reliance` (`bos_reliance`).
MLflow rejects '@' in metric names, so the long-context names use '_' (`long_context_metric`).
Per-layer values are named under `layers/` (`layers/sink/first_token_attn/layer_03`, ...);
a run records them as one table, `analysis/layers.json` (lab/analysis/outputs.py), and in
full in `analysis/analysis.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lab.config import RunConfig
from lab.data.store import TokenStore
from lab.data.windows import eval_windows
from lab.errors import LabError
from lab.model.gates import GateSpec, apply_gate

SPARSITY_THRESHOLDS = (1e-2, 1e-3)  # App. A.3, Fig. 5
ACTIVATION_CURVES = ("attn_output", "attn_residual", "ffn_output", "ffn_residual")  # Fig. 6
GATE_SAMPLES_PER_BATCH = 20_000     # gate scores kept per layer and batch for the histogram
PROBE_BATCH = 4                     # windows per exact-attention forward
LONG_CONTEXT_TOKENS_PER_FORWARD = 8  # x context: tokens per long-context forward
ATTENTION_MAP_LAYERS = 4            # layers drawn in attention_maps.png
IGNORED_TARGET = -100               # cross-entropy's ignore_index: predictions left out


def threshold_name(threshold: float) -> str:
    return f"{threshold:.0e}".replace("e-0", "e-")  # 0.01 -> '1e-2'


def long_context_metric(factor: int, yarn: bool) -> str:
    return f"long/ppl_{factor}x" + ("_yarn" if yarn else "")


def layer_metric(name: str, layer: int, n_layers: int) -> str:
    """`layers/<name>/layer_<i>`, i zero-padded in models of 10 or more layers (layer_07)."""
    return f"layers/{name}/layer_{layer:0{len(str(max(n_layers - 1, 1)))}d}"


def split_layer_metric(metric: str) -> tuple[str, int] | None:
    """`layers/<name>/layer_<i>` -> ("layers/<name>", i); None for any other metric."""
    head, _, index = metric.rpartition("/layer_")
    return (head, int(index)) if head.startswith("layers/") and index.isdigit() else None


class ProbeRecorder:
    """The `probe` `Decoder.forward` calls: each tensor becomes per-layer running sums.

    Sums stay on the device as tensors (no synchronisation per layer); `finish` turns them
    into per-layer lists. Set `tokens` to the batch before each forward (delimiter masks).
    `sink_only` keeps the attention probabilities alone (the sink metrics) and skips the
    rest, with its per-layer copies to the host.
    """

    def __init__(self, n_layers: int, gate: GateSpec | None, eos_id: int | None = None,
                 map_layers: Sequence[int] = (), gate_samples: int = GATE_SAMPLES_PER_BATCH,
                 sink_only: bool = False):
        self.n_layers, self.gate, self.eos_id = n_layers, gate, eos_id
        self.sink_only = sink_only
        self.map_layers, self.gate_samples_per_batch = set(map_layers), gate_samples
        self.tokens: torch.Tensor | None = None
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.counts: dict[tuple[str, int], torch.Tensor | int] = {}
        self.received: dict[int, torch.Tensor] = {}          # layer -> (T,) attention received
        self.received_rows: dict[int, int] = {}              # layer -> (window, head, query) rows
        self.position_max: dict[tuple[str, int], torch.Tensor] = {}  # (curve, layer) -> (T,)
        self.logit_max: dict[int, torch.Tensor] = {}          # layer -> largest attention logit
        self.head_first: dict[int, torch.Tensor] = {}         # layer -> (H,) position-0 mass
        self.head_rows: dict[int, int] = {}                   # layer -> (window, query) rows
        self.gate_min: dict[int, torch.Tensor] = {}
        self.gate_max: dict[int, torch.Tensor] = {}
        self.gate_samples: dict[int, list[np.ndarray]] = {}
        self.attention_maps: dict[int, np.ndarray] = {}
        self._pre_gate: dict[int, torch.Tensor] = {}
        self._scores: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        if name == "attn_logits":
            # The largest pre-softmax logit (Wortsman et al. 2023: its growth precedes
            # divergence at small scale, notably without QK-norm).
            top = tensor.detach().amax()
            previous = self.logit_max.get(layer)
            self.logit_max[layer] = top if previous is None else torch.maximum(previous, top)
            return
        if self.sink_only and name != "attn_probs":
            return
        tensor = tensor.detach()
        if name == "attn_probs":
            self._attention(layer, tensor.float())
        elif name == "sdpa_out":
            self._sparsity("sdpa", layer, tensor)
            if self.gate is not None and self.gate.position == "sdpa":
                self._pre_gate[layer] = tensor
        elif name == "gate_scores":
            self._gate(layer, tensor.float())
        elif name == "sdpa_out_gated":
            self._sparsity("sdpa_gated", layer, tensor)
            before, scores = self._pre_gate.pop(layer, None), self._scores.pop(layer, None)
            if before is not None and scores is not None:
                # Fig. 5's control: the same outputs scaled by the mean score, not the real gate.
                self._sparsity("sdpa_average_gate", layer, apply_gate(self.gate, before, scores.mean()))
        elif name in ACTIVATION_CURVES:
            per_position = tensor.float().abs().amax(dim=(0, 2))  # (T,)
            previous = self.position_max.get((name, layer))
            self.position_max[(name, layer)] = per_position if previous is None else \
                torch.maximum(previous, per_position)

    def _add(self, quantity: str, layer: int, total: torch.Tensor, count) -> None:
        key = (quantity, layer)
        self.sums[key] = self.sums.get(key, 0) + total.double()
        self.counts[key] = self.counts.get(key, 0) + count

    def _attention(self, layer: int, probs: torch.Tensor) -> None:
        B, H, T, _ = probs.shape
        rows = probs[:, :, 1:, :]  # query 0 attends only to itself: excluded (module docstring)
        self._add("first_token_attn", layer, rows[..., 0].sum(), rows[..., 0].numel())
        per_head = rows[..., 0].sum(dim=(0, 2), dtype=torch.float64)  # (H,)
        self.head_first[layer] = self.head_first.get(layer, 0) + per_head
        self.head_rows[layer] = self.head_rows.get(layer, 0) + B * (T - 1)
        received = rows.sum(dim=(0, 1, 2), dtype=torch.float64)  # (T,) over all (head, query) rows
        self.received[layer] = self.received.get(layer, 0) + received
        self.received_rows[layer] = self.received_rows.get(layer, 0) + B * H * (T - 1)
        if self.eos_id is not None and self.tokens is not None:
            delimiters = self.tokens[:, :T] == self.eos_id  # (B, T)
            delimiters[:, 0] = False                          # position 0 is F-Attn's
            mass = torch.einsum("bhqk,bk->bhq", probs, delimiters.float())  # (B, H, T)
            sees = delimiters.cumsum(dim=-1) > 0              # query q sees one at 1..q
            self._add("eos_attn", layer, (mass * sees[:, None, :]).sum(), sees.sum() * H)
        if layer in self.map_layers and layer not in self.attention_maps:
            self.attention_maps[layer] = probs[0].mean(dim=0).cpu().numpy()  # head-averaged

    def _sparsity(self, kind: str, layer: int, y: torch.Tensor) -> None:
        magnitude = y.float().abs()
        self._add(f"{kind}_abs_mean", layer, magnitude.sum(), magnitude.numel())
        for threshold in SPARSITY_THRESHOLDS:
            self._add(f"{kind}_below_{threshold_name(threshold)}", layer,
                      (magnitude < threshold).sum(), magnitude.numel())

    def _gate(self, layer: int, scores: torch.Tensor) -> None:
        self._add("gate_mean", layer, scores.sum(), scores.numel())
        self._add("gate_square", layer, (scores.double() ** 2).sum(), scores.numel())
        low, high = scores.min(), scores.max()
        self.gate_min[layer] = torch.minimum(self.gate_min.get(layer, low), low)
        self.gate_max[layer] = torch.maximum(self.gate_max.get(layer, high), high)
        flat = scores.flatten()
        stride = max(1, flat.numel() // self.gate_samples_per_batch)
        self.gate_samples.setdefault(layer, []).append(flat[::stride].cpu().numpy())
        if self.gate is not None and self.gate.position == "sdpa":
            self._scores[layer] = scores

    # --- read-out ----------------------------------------------------------------------

    def mean(self, quantity: str) -> list[float] | None:
        """Per-layer mean of a summed quantity, None where it was never probed."""
        if not any(key[0] == quantity for key in self.sums):
            return None
        out = []
        for layer in range(self.n_layers):
            key = (quantity, layer)
            count = float(self.counts.get(key, 0))
            out.append(float(self.sums[key]) / count if key in self.sums and count else math.nan)
        return out

    def top_key(self) -> tuple[list[int], list[float]]:
        """Per layer: the key position that receives the most attention, and how much."""
        positions, values = [], []
        for layer in range(self.n_layers):
            mean = self.received[layer] / self.received_rows[layer]
            value, position = mean.max(dim=0)
            positions.append(int(position))
            values.append(float(value))
        return positions, values

    def head_first_token_attn(self) -> list[list[float]]:
        """Per layer, per head: the mean attention on position 0 over (window, query >= 1)."""
        return [(self.head_first[layer] / self.head_rows[layer]).tolist()
                for layer in range(self.n_layers)]

    def logit_maxima(self) -> list[float]:
        return [float(self.logit_max[layer]) for layer in range(self.n_layers)]

    def activation_maxima(self, curve: str) -> tuple[list[float], list[int]]:
        values, positions = [], []
        for layer in range(self.n_layers):
            value, position = self.position_max[(curve, layer)].max(dim=0)
            values.append(float(value))
            positions.append(int(position))
        return values, positions

    def gate_layers(self) -> dict[str, list[float]] | None:
        means = self.mean("gate_mean")
        if means is None:
            return None
        squares = self.mean("gate_square")
        std = [math.sqrt(max(s - m * m, 0.0)) for m, s in zip(means, squares)]
        return {"gate_mean": means, "gate_std": std,
                "gate_min": [float(self.gate_min[l]) for l in range(self.n_layers)],
                "gate_max": [float(self.gate_max[l]) for l in range(self.n_layers)]}


@dataclass
class Analysis:
    metrics: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, list] = field(default_factory=dict)
    gate_samples: np.ndarray | None = None
    attention_maps: dict[int, np.ndarray] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was measured (non-finite weights)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "per_layer": self.per_layer, "skipped": self.skipped}


@torch.no_grad()
def record(model, windows: torch.Tensor, recorder: ProbeRecorder,
           batch_size: int = PROBE_BATCH, length: int | None = None) -> ProbeRecorder:
    """Exact-attention forwards over the first `length` (default: context) tokens of
    `windows` (n, >= length) feeding `recorder`."""
    device = next(model.parameters()).device
    T = length or model.cfg.context
    for start in range(0, len(windows), batch_size):
        tokens = windows[start:start + batch_size, :T].to(device)
        recorder.tokens = tokens
        # forward, not __call__: an in-place torch.compile would trace the Python probe.
        model.forward(tokens, probe=recorder)
    return recorder


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
