"""The pieces the decoder and its experts both build from: the SwiGLU feed-forward block
(the dense FFN, and each expert of lab/model/moe.py) and the top-k pick a router makes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # [gate | up], one matmul
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def top_k_indices(module: nn.Module, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best entries of `scores` along the last dimension, for a routing module.

    `gatelab check` compares a bf16 pass with a float32 reference, and a near-tie between the
    k-th and (k+1)-th score can fall either way between them: the outputs then differ for a
    reason that is no kernel's fault. So the check records the fast pass's picks
    (`module.routing_record`, a list) and the reference replays them (`module.routing_replay`,
    popped in call order); in training both are None and this is plain topk."""
    replay = getattr(module, "routing_replay", None)
    kept = replay.pop(0) if replay else scores.topk(k, dim=-1).indices
    record = getattr(module, "routing_record", None)
    if record is not None:
        record.append(kept.detach())
    return kept
