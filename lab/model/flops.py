"""Model FLOPs per token and the GPU's dense bf16 peak, for MFU.

MFU = (6 N + 12 L d T) x tokens/s / peak (PaLM, App. B): 6N for the matmuls of forward and
backward over N parameters, 12 L d T for attention scores and values (d = query heads x
head_dim). N counts every parameter once, the tied embedding included, because the LM head
is a d_model x vocab matmul even though the embedding lookup is not. For MoE models N is
the active parameter count (lab/model/moe.py).
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (no sparsity).
# Matched by substring of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),      # SXM and NVL
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("V100", 125.0),      # fp16: V100 has no bf16
]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def device_peak_tflops() -> float | None:
    """This machine's GPU peak, or None (no GPU, or one the table does not know)."""
    return peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def flops_per_token(n_params: int, n_layers: int, attn_width: int, context: int) -> float:
    return 6.0 * n_params + 12.0 * n_layers * attn_width * context


def flops_per_token_lower_bound(m) -> float:
    """Model FLOPs per token of a ModelConfig from its shapes alone, before any model exists
    (config validation: the token budget's wall-time bound). The matrices only: embedding
    (and untied LM head), Q/K/V/O, the dense FFN or the experts a token uses; gates, norms
    and routers are left out, so this never exceeds model_flops_per_token."""
    attn_width = m.n_heads * m.head_dim
    attention = m.d_model * (attn_width + 2 * m.n_kv_heads * m.head_dim) + attn_width * m.d_model
    if m.ffn == "moe":  # the experts a token uses (lab.model.moe.experts_and_top_k), shared included
        active = m.moe_top_k + m.moe_extra_experts + int(m.moe_shared_expert)
        ffn = active * 3 * m.d_model * m.moe_expert_hidden
    else:
        ffn = 3 * m.d_model * m.ffn_hidden
    embeddings = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    n_params = embeddings + m.n_layers * (attention + ffn)
    return flops_per_token(n_params, m.n_layers, attn_width, m.context)
