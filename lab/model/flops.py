"""Model FLOPs per token, and the dense bf16 peaks Lightning's table lacks, for MFU.

MFU = (6 N + 12 L d T) x tokens/s / peak (PaLM, App. B): 6N for the matmuls of forward and
backward over N parameters, 12 L d T for attention scores and values (d = query heads x
head_dim). N counts every parameter once, the tied embedding included, because the LM head
is a d_model x vocab matmul even though the embedding lookup is not. For MoE models N is
the active parameter count (lab/model/moe.py).
"""

from __future__ import annotations

from lab.model.config import experts_and_top_k

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (no sparsity), for the
# GPUs where Lightning's table (lightning.fabric.utilities.throughput, which
# lab/training/callbacks.py device_peak_tflops reads for every other GPU) has no entry for the
# name CUDA reports, or quotes another figure. Matched by substring of
# torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),      # Lightning: only names with SXM1/NVL1, at the with-sparsity figures
    ("H100 NVL", 989.4),  # Lightning: 1978.8, the with-sparsity figure
    ("GH200", 989.4),     # Lightning reads the name as an unknown H200
    ("B200", 2250.0),     # not in Lightning's table; also the fastest peak config.py bounds with
    ("L40S", 362.0),      # Lightning reads "L4" in the name: 121
    ("RTX 4090", 165.2),  # Lightning: 82.6, the card's non-tensor FP32 rate
    ("RTX 3090", 71.0),   # Lightning: 35.6, likewise
    ("V100", 125.0),      # fp16: V100 has no bf16 (Lightning lists none for it)
]


def peak_tflops(device_name: str) -> float | None:
    """The lab's own entry for a GPU (PEAK_BF16_TFLOPS), or None."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def flops_per_token(n_params: int, n_layers: int, attn_width: int, context: int) -> float:
    return 6.0 * n_params + 12.0 * n_layers * attn_width * context


def flops_per_token_lower_bound(m) -> float:
    """Model FLOPs per token of a ModelConfig from its shapes alone, before any model exists
    (config validation: the token budget's wall-time bound). The matrices only: embedding
    (and untied LM head), Q/K/V/O, the dense FFN or the experts a token uses; gates, norms
    and routers are left out, so this never exceeds model_flops_per_token."""
    attn_width = m.n_heads * m.head_dim
    attention = m.d_model * (attn_width + 2 * m.n_kv_heads * m.head_dim) + attn_width * m.d_model
    if m.ffn == "moe":  # the experts a token uses, shared included
        active = experts_and_top_k(m)[1] + int(m.moe_shared_expert)
        ffn = active * 3 * m.d_model * m.moe_expert_hidden
    else:
        ffn = 3 * m.d_model * m.ffn_hidden
    embeddings = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    n_params = embeddings + m.n_layers * (attention + ffn)
    return flops_per_token(n_params, m.n_layers, attn_width, m.context)
