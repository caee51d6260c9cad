"""The presets: named model shapes and their training defaults (`--preset`), as data.

A preset sets ModelConfig and TrainConfig fields (lab/model/config.py, lab/config.py); a
variant then changes the model (lab/model/variants.py) and overrides come last
(`lab.config.resolve`). Plain dicts, no torch: `gatelab variants` and a bad `--preset`
read them before any model exists (benchmarks/README.md, start-up).
"""

from __future__ import annotations

from typing import Any

# Sub-billion Qwen3-style decoders: 2:1 GQA and head_dim 64 as the paper's dense models
# (Table 7), context 1024. `tiny` is for CPU tests (head_dim 16, context 128, synthetic vocab).

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_hidden=192, context=128),
                 train=dict(batch_size=16, lr=3e-3, val_every=50, val_batches=4)),
    "small": dict(model=dict(n_layers=6, d_model=384, n_heads=6, n_kv_heads=3, head_dim=64,
                             ffn_hidden=1024, context=1024),
                  train=dict(batch_size=32, lr=3e-3, val_every=200, val_batches=16)),
    "base": dict(model=dict(n_layers=12, d_model=512, n_heads=8, n_kv_heads=4, head_dim=64,
                            ffn_hidden=1792, context=1024),
                 train=dict(batch_size=64, lr=2e-3, val_every=250, val_batches=16)),
    "medium": dict(model=dict(n_layers=16, d_model=768, n_heads=12, n_kv_heads=6, head_dim=64,
                              ffn_hidden=2304, context=1024),
                   train=dict(batch_size=64, lr=1.5e-3, val_every=250, val_batches=16)),
    "large": dict(model=dict(n_layers=28, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=64,
                             ffn_hidden=2816, context=1024),
                  train=dict(batch_size=128, micro_batch_size=32, lr=1e-3, val_every=250,
                             val_batches=16)),
    "xl": dict(model=dict(n_layers=28, d_model=1536, n_heads=24, n_kv_heads=12, head_dim=64,
                          ffn_hidden=4096, context=1024),
               train=dict(batch_size=128, micro_batch_size=16, lr=8e-4, val_every=250,
                          val_batches=16)),
    # Depth is what exposes the paper's stability trend at small scale (issue: reproduce).
    # Its step is launch-bound (32 thin layers), so it replays CUDA graphs: on one H100
    # (2026-12-06, benchmarks/results/2026-12-06-h100-time-to-verdict.json, batch 16) the lab
    # path ran 632,833 tokens/s with them against 392,345 without, 0.91 of the bare loop's
    # 691,880 with them. Only where it compiles (a GPU); the mode is not in a cell's identity.
    "deep-narrow": dict(model=dict(n_layers=32, d_model=256, n_heads=4, n_kv_heads=2,
                                   head_dim=64, ffn_hidden=768, context=1024),
                        train=dict(batch_size=32, lr=1e-2, val_every=250, val_batches=16,
                                   compile_mode="reduce-overhead")),
    # Mixture-of-experts FFN (lab/model/moe.py), the paper's main model family (docs/paper.md §7.2) at small
    # scale: fine-grained experts (expert FFN ~0.375 d_model, as 768 / 2048), top-k of the pool
    # so that the activated FFN width equals the dense preset's, untied embeddings as the paper.
    "moe-tiny": dict(model=dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                head_dim=16, ffn_hidden=192, context=128, tie_embeddings=False,
                                ffn="moe", moe_experts=16, moe_top_k=4, moe_expert_hidden=48),
                     train=dict(batch_size=16, lr=3e-3, val_every=50, val_batches=4)),
    "moe-small": dict(model=dict(n_layers=6, d_model=384, n_heads=6, n_kv_heads=3, head_dim=64,
                                 ffn_hidden=1024, context=1024, tie_embeddings=False, ffn="moe",
                                 moe_experts=32, moe_top_k=8, moe_expert_hidden=128),
                      train=dict(batch_size=32, lr=3e-3, val_every=200, val_batches=16)),
    "moe-base": dict(model=dict(n_layers=12, d_model=512, n_heads=8, n_kv_heads=4, head_dim=64,
                                ffn_hidden=1792, context=1024, tie_embeddings=False, ffn="moe",
                                moe_experts=32, moe_top_k=8, moe_expert_hidden=224),
                     train=dict(batch_size=64, lr=2e-3, val_every=250, val_batches=16)),
}
