"""The names of the analysis metrics (lab/analysis/metrics.py, lab/analysis/perplexity.py):
what `gatelab report` reads, and the rules that spell the per-layer, per-threshold and
per-factor ones.

Metric names: `sink/first_token_attn`, `sink/first_token_attn_random`,
`sink/first_token_attn_short`, `sink/first_token_attn_short_random`, `sink/head_share`,
`sink/head_share_random`, `sink/head_share_short`, `sink/head_share_short_random`,
`attn/logit_max` (and per layer), `sink/eos_attn`, `sink/eos_attn_random`, `act/max_mean`,
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
