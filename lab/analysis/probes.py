"""The probe of the analyses' exact-attention forward (SDPA returns no probabilities):
`ProbeRecorder` is the `probe` that `Decoder.forward(tokens, probe=...)` hands each layer's
attention logits and probabilities, SDPA output before and after the G1 gate, gate scores
and activations; it reduces each to per-layer sums as it arrives, so memory holds one
layer's attention at a time. `record` runs those forwards over windows;
lab/analysis/metrics.py turns the sums into the paper's metrics.

Choices where the paper is silent (docs/paper.md §8, docs/paper.md §11):
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
- The largest attention logit per layer is taken pre-softmax, scale applied (Wortsman et
  al. 2023, whose early warning of divergence it is).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from lab.analysis.names import threshold_name
from lab.model.gates import GateSpec, apply_gate

SPARSITY_THRESHOLDS = (1e-2, 1e-3)  # App. A.3, Fig. 5
ACTIVATION_CURVES = ("attn_output", "attn_residual", "ffn_output", "ffn_residual")  # Fig. 6
GATE_SAMPLES_PER_BATCH = 20_000     # gate scores kept per layer and batch for the histogram
PROBE_BATCH = 4                     # windows per exact-attention forward


class ProbeRecorder:
    """The `probe` `Decoder.forward` calls: each tensor becomes per-layer running sums.

    Sums stay on the device as tensors (no synchronisation per layer); the read-out methods
    (`mean`, `top_key`, ...) turn them into per-layer lists. Set `tokens` to the batch before each forward (delimiter masks).
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
