"""The model's configuration: a Qwen3-style decoder's shapes, its gate and its experts,
validated once with a readable error (the run's other sections: lab/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lab.errors import (LabError, check_choice, check_field_types, check_int_range,
                        check_nonnegative, check_nonnegative_int, check_positive,
                        check_positive_int)
from lab.model.gates import GateSpec

SDPA_TRANSFORMS = ("none", "rmsnorm", "silu")
FFN_KINDS = ("dense", "moe")
# Vocabulary bounds. Below 16 tokens the synthetic language (4 likely successors per token,
# lab/data/store.py) degenerates to near-deterministic text; 2^24 is over 100x the 151,936 of the
# paper's Qwen models, and its embedding alone is 2^24 x d_model weights.
MIN_VOCAB, MAX_VOCAB = 16, 2 ** 24


@dataclass(frozen=True)
class ModelConfig:
    """A Qwen3-style decoder (docs/paper.md §6; Table 7, docs/paper.md §9.7): pre-RMSNorm,
    RoPE, SwiGLU, GQA, QK-norm.

    Init: every Linear and the embedding draw from normal(0, init_std) with zero biases,
    the reference implementation's `_init_weights` (0.02); norms start at 1. No depth scaling
    by default; `residual_init_scale` multiplies the std of the projections that write into
    the residual stream (attention o_proj, FFN down), e.g. 1/sqrt(2 n_layers) for GPT-2's
    depth scaling. It is the control for gains that only come from a smaller attention output
    early in training (docs/results.md).
    """

    vocab_size: int = 16384
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden: int = 192
    context: int = 128
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    residual_init_scale: float = 1.0     # std multiplier for o_proj and FFN down projections
    gate: GateSpec | None = None
    # The paper's controls (docs/paper.md §5.2, docs/paper.md §5.5).
    sdpa_transform: str = "none"         # "rmsnorm" (per-head "GroupNorm") or "silu" at G1
    sandwich_norm: bool = False
    residual_clip: float | None = None
    switch_head: str | None = None       # "kv:E:K" or "v:E:K": experts, top-k
    # Low-rank Switch Head experts sized so the experts and router add this fraction of the
    # projections they replace (K+V or V; `switch_expert_rank`); None: full-rank experts.
    switch_head_added_fraction: float | None = None
    # Extra dense-FFN hidden units adding this fraction of the G1 elementwise gate's
    # parameters (L d q d_k): the FFN-widened parameter-matched baselines (`ffn_width`).
    ffn_widen_g1_fraction: float = 0.0
    gate_insert_fraction: float | None = None  # gate off until this fraction of training
    # Feed-forward: dense SwiGLU or a mixture of experts (lab/model/moe.py).
    ffn: str = "dense"
    moe_experts: int = 8
    moe_top_k: int = 2
    moe_expert_hidden: int = 128
    moe_shared_expert: bool = False
    moe_extra_experts: int = 0           # baseline_add4experts: more total and activated experts
    moe_normalize_top_k: bool = True     # renormalise the k kept router probabilities (Qwen3-MoE)
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001

    def validate(self) -> None:
        check_field_types("model", self)
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_hidden", "context"):
            check_positive_int(f"model.{name}", getattr(self, name))
        check_vocab("model.vocab_size", self.vocab_size)
        if self.n_heads % self.n_kv_heads:
            raise LabError(f"model.n_heads: {self.n_heads} query heads are not divisible by "
                           f"{self.n_kv_heads} KV heads (GQA needs whole groups)")
        if self.head_dim % 2:
            raise LabError(f"model.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        check_positive("model.rope_base", self.rope_base)
        check_positive("model.init_std", self.init_std)
        check_positive("model.residual_init_scale", self.residual_init_scale)
        check_positive("model.rms_eps", self.rms_eps)
        check_choice("model.sdpa_transform", self.sdpa_transform, SDPA_TRANSFORMS)
        check_choice("model.ffn", self.ffn, FFN_KINDS)
        if self.residual_clip is not None:
            check_positive("model.residual_clip", self.residual_clip)
        if self.gate is not None:
            check_field_types("gate", self.gate)
            self.gate.validate()
        if self.gate_insert_fraction is not None:
            if self.gate is None:
                raise LabError("model.gate_insert_fraction: needs a gate to insert")
            if not 0 < self.gate_insert_fraction < 1:
                raise LabError("model.gate_insert_fraction: must lie in (0, 1), got "
                               f"{self.gate_insert_fraction!r}")
        if self.switch_head is not None:
            parse_switch_head(self.switch_head)
        if self.switch_head_added_fraction is not None:
            check_positive("model.switch_head_added_fraction", self.switch_head_added_fraction)
            if self.switch_head is None:
                raise LabError("model.switch_head_added_fraction: needs Switch Head experts "
                               "(model.switch_head)")
            switch_expert_rank(self)
        if self.ffn_widen_g1_fraction != 0.0:
            check_positive("model.ffn_widen_g1_fraction", self.ffn_widen_g1_fraction)
        if self.ffn_widen_g1_fraction and self.ffn != "dense":
            raise LabError("model.ffn_widen_g1_fraction: widens the dense FFN and needs a dense "
                           "preset (model.ffn=dense); at MoE presets baseline_add4experts adds "
                           "FFN capacity")
        if self.ffn == "moe":
            for name in ("moe_experts", "moe_top_k", "moe_expert_hidden"):
                check_positive_int(f"model.{name}", getattr(self, name))
            check_nonnegative_int("model.moe_extra_experts", self.moe_extra_experts)
            check_nonnegative("model.moe_aux_loss_coef", self.moe_aux_loss_coef)
            check_nonnegative("model.moe_z_loss_coef", self.moe_z_loss_coef)
            if self.moe_top_k > self.moe_experts:
                raise LabError(f"model.moe_top_k: {self.moe_top_k} exceeds the "
                               f"{self.moe_experts} experts")
        elif self.moe_extra_experts:
            raise LabError("model.moe_extra_experts: needs an MoE preset (model.ffn=moe); "
                           "baseline_add4experts is defined on MoE models only")

    @property
    def ffn_width(self) -> int:
        """The dense FFN's hidden width: `ffn_hidden`, widened by `ffn_widen_g1_fraction`.
        A SwiGLU unit costs 3 d_model parameters (gate, up, down) and the G1 elementwise gate
        d_model x (q heads x head_dim) per layer, so f x G1 is f q d_k / 3 more units (docs/paper.md §4.4:
        the paper matches its dense models' parameters through the FFN width)."""
        extra = self.ffn_widen_g1_fraction * self.n_heads * self.head_dim / 3
        return self.ffn_hidden + round(extra)


def check_vocab(field_name: str, vocab_size) -> None:
    check_int_range(field_name, vocab_size, MIN_VOCAB, MAX_VOCAB,
                    "see MIN_VOCAB and MAX_VOCAB in lab/model/config.py")


def experts_and_top_k(cfg: ModelConfig) -> tuple[int, int]:
    """Experts in the pool and experts per token, `moe_extra_experts` included in both."""
    return cfg.moe_experts + cfg.moe_extra_experts, cfg.moe_top_k + cfg.moe_extra_experts


def parse_switch_head(text: str) -> tuple[str, int, int]:
    """'kv:8:8' -> ('kv', 8, 8): which projections get experts, how many, and top-k."""
    parts = text.split(":")
    try:
        target, experts, top_k = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        raise LabError(f"model.switch_head: expected 'kv:E:K' or 'v:E:K', got {text!r}") from None
    check_choice("model.switch_head target", target, ("kv", "v"))
    if not 1 <= top_k <= experts:
        raise LabError(f"model.switch_head: top-k {top_k} must lie in 1..{experts}")
    return target, experts, top_k


def switch_expert_rank(model: ModelConfig) -> int | None:
    """Rank r of each low-rank Switch Head expert (d_model -> r -> head_dim), or None for
    full-rank experts (no `switch_head_added_fraction`).

    The rule: per replaced projection and KV head, E experts of rank r and a router column
    per expert cost E r (d + D) + E d parameters where the projection cost d D, and r is the
    whole number that brings the difference closest to f d D, f the variant's fraction of the
    paper (Table 6 over the MoE's K+V or V projections; lab/model/variants.py). The experts' output
    stays head_dim wide, so attention is unchanged; only the budget of the map shrinks.
    """
    if model.switch_head_added_fraction is None:
        return None
    _, experts, _ = parse_switch_head(model.switch_head)
    d, D, f = model.d_model, model.head_dim, model.switch_head_added_fraction
    rank = round((d * D * (1 + f) - d * experts) / (experts * (d + D)))
    if not 1 <= rank <= D:
        raise LabError(f"model.switch_head_added_fraction: {f!r} gives {experts} experts a rank "
                       f"of {rank} at d_model {d}, head_dim {D}; the rank must lie in 1..{D} "
                       "(use none for full-rank experts)")
    return rank

