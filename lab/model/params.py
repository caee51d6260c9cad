"""Parameter counts, without allocating weights: total and non-embedding, added over the
variant's baseline (docs/paper.md §4.2: the paper quotes what each gate adds), active per
token (MoE experts not selected left out), and the model FLOPs per token MFU reads from them.

The counts take a RunConfig, which lives above this package (lab/config.py); the import is
for the annotation only, so the model never imports the run's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from lab.model.config import ModelConfig
from lab.model.decoder import Decoder
from lab.model.flops import flops_per_token
from lab.model.variants import VARIANTS
from lab.model.moe import moe_layers

if TYPE_CHECKING:
    from lab.config import RunConfig


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    if not model.cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def active_parameters(config: RunConfig | ModelConfig | nn.Module) -> int:
    """Parameters one token uses: all of them except the experts it does not select
    (k of E experts per layer). Dense models: the total. For MFU (6 x active x tokens).
    Given a built Decoder (e.g. on the meta device), counts that one instead of building one."""
    if isinstance(config, nn.Module):
        model = config
    else:
        with torch.device("meta"):
            model = Decoder(config if isinstance(config, ModelConfig) else config.model)
    inactive = sum(layer.expert_parameters() * (layer.num_experts - layer.top_k)
                   // layer.num_experts for layer in moe_layers(model))
    return count_parameters(model)["total"] - inactive


def baseline_model(config: RunConfig) -> ModelConfig:
    """The same architecture with the variant taken out: what `params/added` is counted against."""
    variant = VARIANTS.get(config.variant)
    model = config.model
    if variant is None:
        return dataclasses.replace(model, gate=None, gate_insert_fraction=None)
    defaults = ModelConfig()
    reset = {name: getattr(defaults, name) for name in variant.model}
    return dataclasses.replace(model, gate=None, **reset,
                               n_heads=round(model.n_heads / variant.q_heads_factor),
                               n_kv_heads=round(model.n_kv_heads / variant.kv_heads_factor))


def count_params(config: RunConfig) -> dict[str, int]:
    """Total, non-embedding, added-over-baseline and active (used per token: MoE experts
    not selected excluded; lab/model/moe.py) parameters, without allocating weights."""
    with torch.device("meta"):
        model = Decoder(config.model)
        counts = count_parameters(model)
        counts["added"] = counts["total"] - count_parameters(Decoder(baseline_model(config)))["total"]
    counts["active"] = active_parameters(model)
    return counts


def model_flops_per_token(config: RunConfig, counts: dict | None = None) -> float:
    """For a RunConfig: active parameters, counted without allocating weights (or taken
    from `counts`, count_params's result, where the caller has it)."""
    counts = counts or count_params(config)
    n_params = counts.get("active", counts["total"])
    m = config.model
    return flops_per_token(n_params, m.n_layers, m.n_heads * m.head_dim, m.context)
