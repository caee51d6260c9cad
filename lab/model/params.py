"""Parameter counts from the config's shapes, without building a model: total and
non-embedding, added over the variant's baseline (docs/paper.md §4.2: the paper quotes what
each gate adds), active per token (MoE experts not selected left out), and the model FLOPs
per token MFU reads from them.

The arithmetic follows the modules of lab/model/decoder.py, moe.py and layers.py tensor by
tensor; tests/unit/test_model.py holds it equal to the built model's count for every variant at
two presets and the MoE presets. No torch: `gatelab variants` prints these counts for every
variant, and importing torch to build each model on the meta device took 1.4 s of its
2.1 s start-up on the 2-core CPU machine (benchmarks/README.md, start-up).

The counts take a RunConfig, which lives above this package (lab/config.py); the import is
for the annotation only, so the model never imports the run's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lab.model.config import (ModelConfig, experts_and_top_k, parse_switch_head,
                              switch_expert_rank)
from lab.model.flops import flops_per_token
from lab.model.gates import gate_param_count, gated_heads_and_width
from lab.model.variants import VARIANTS

if TYPE_CHECKING:
    import torch.nn as nn

    from lab.config import RunConfig


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters of a built Decoder (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    if not model.cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def _switch_head_change(m: ModelConfig) -> int:
    """What one layer's Switch Head experts and routers (decoder.SwitchProjection) add, less
    the V (or K and V) projection they replace in the fused in_proj."""
    target, experts, _ = parse_switch_head(m.switch_head)
    rank, d, G, D = switch_expert_rank(m), m.d_model, m.n_kv_heads, m.head_dim
    experts_weights = d * G * experts * D if rank is None else G * experts * rank * (d + D)
    return (2 if target == "kv" else 1) * (experts_weights + d * G * experts - d * G * D)


def _attention_parameters(m: ModelConfig) -> int:
    """One layer's attention (decoder.Attention): the fused [q | k | v] projection less what
    Switch Head experts replace, the gate, o_proj, QK-norm and the controls' per-head norm."""
    d, q_width, kv_width = m.d_model, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    count = d * (q_width + 2 * kv_width) + q_width * d  # in_proj's q, k, v; o_proj
    if m.switch_head is not None:
        count += _switch_head_change(m)
    if m.gate is not None:
        heads, width = gated_heads_and_width(m.gate, m.n_heads, m.n_kv_heads, m.head_dim, d)
        count += gate_param_count(m.gate, heads, width, d)
    if m.qk_norm:
        count += 2 * m.head_dim
    if m.sdpa_transform == "rmsnorm":
        count += m.head_dim
    return count


def _ffn_parameters(m: ModelConfig) -> tuple[int, int]:
    """One layer's FFN (layers.SwiGLU or moe.MoEFeedForward): its parameters, and those of
    the experts a token does not select ((E - k) / E of the experts' weights)."""
    if m.ffn != "moe":
        return 3 * m.d_model * m.ffn_width, 0
    experts, top_k = experts_and_top_k(m)
    expert_weights = experts * 3 * m.d_model * m.moe_expert_hidden
    shared = 3 * m.d_model * m.moe_expert_hidden if m.moe_shared_expert else 0
    return (m.d_model * experts + expert_weights + shared,
            expert_weights * (experts - top_k) // experts)


def model_parameters(m: ModelConfig) -> dict[str, int]:
    """Total, non-embedding and active parameters of the Decoder `m` describes."""
    ffn, inactive = _ffn_parameters(m)
    norms = (4 if m.sandwich_norm else 2) * m.d_model
    embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    total = embedding + m.n_layers * (_attention_parameters(m) + ffn + norms) + m.d_model
    return {"total": total, "non_embedding": total - embedding,
            "active": total - m.n_layers * inactive}


def active_parameters(config: RunConfig | ModelConfig) -> int:
    """Parameters one token uses: all of them except the experts it does not select
    (k of E experts per layer). Dense models: the total. For MFU (6 x active x tokens)."""
    return model_parameters(config if isinstance(config, ModelConfig) else config.model)["active"]


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
    not selected excluded; lab/model/moe.py) parameters."""
    counts = model_parameters(config.model)
    counts["added"] = counts["total"] - model_parameters(baseline_model(config))["total"]
    return {name: counts[name] for name in ("total", "non_embedding", "added", "active")}


def model_flops_per_token(config: RunConfig, counts: dict | None = None) -> float:
    """For a RunConfig: active parameters, counted from its shapes (or taken from `counts`,
    count_params's result, where the caller has it)."""
    counts = counts or count_params(config)
    n_params = counts.get("active", counts["total"])
    m = config.model
    return flops_per_token(n_params, m.n_layers, m.n_heads * m.head_dim, m.context)
