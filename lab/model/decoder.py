"""A Qwen3-style decoder with every gate position of the paper exposed.

Reads top to bottom: rotary embedding (with optional YaRN), SwiGLU, Switch Head
projection experts, attention, block, decoder. Shapes: B batch, T tokens, H query heads,
G KV heads, D head_dim, C d_model.

The attention computes Q, K, V and every input-dependent gate's logits from the same
pre-norm hidden state X in one fused matmul (the reference code fuses the G1 gate into
q_proj; docs/paper.md §6). The gate math itself is lab/model/gates.py. A `probe` callable, when given,
receives the tensors at each gate position and the exact attention probabilities
(lab/analysis/probes.py ProbeRecorder; lab/analysis/metrics.py turns its sums into the
paper's metrics); without one the fast SDPA path runs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.model.config import ModelConfig, parse_switch_head, switch_expert_rank
from lab.model.gates import (apply_gate, gate_logit_width, gate_score_shape, gate_scores,
                             gated_heads_and_width)
from lab.model.layers import SwiGLU, top_k_indices
from lab.model.loss import lm_loss
from lab.model.moe import MoEFeedForward

Probe = Callable[[int, str, torch.Tensor], None]
PROJECTION_ALIGNMENT = 8  # output columns; 8 bf16 values = 16 bytes
# Elements every SDPA operand's strides, storage offset and head_dim are made a multiple of:
# 8 bf16/fp16 values are 16 bytes (32 for fp32), the alignment the fused kernels assume.
SDPA_ALIGNMENT = 8


def sdpa_operand(x: torch.Tensor) -> torch.Tensor:
    """An SDPA operand (B, heads, T, D) in a layout every backend handles correctly.

    Why: the fused kernels read q, k and v through their strides and assume 16-byte
    alignment without checking it. With torch 2.11 and cuDNN 9.19 on an H200, a V that was a
    view into the fused projection's output with a row stride of 774 bf16 values (1,548
    bytes) made cuDNN attention return wrong outputs and gradients with no error raised, and
    the flash kernel fail with "misaligned address" (docs/results.md, the withdrawn headwise
    section; benchmarks/sdpa_layout_check.py reproduces it). That broke the published headwise
    result. Padding the projection (PROJECTION_ALIGNMENT) is not enough on its own: an odd
    head_dim or KV width can break alignment again, so every operand is checked here.

    A head_dim that is not a multiple of SDPA_ALIGNMENT is zero-padded: zeros added to q and
    k leave q.k unchanged, zeros added to v add output columns that `Attention` drops (the
    softmax scale is passed explicitly, so it still uses the true head_dim). A misaligned
    view is copied to a contiguous tensor. An aligned operand passes through untouched, so
    the presets' layouts cost nothing. Under torch.compile the strides are static, so this
    check is resolved while tracing (see `sdpa_aligned` for the storage offset)."""
    pad = -x.shape[-1] % SDPA_ALIGNMENT
    if pad:
        x = F.pad(x, (0, pad))
    if not sdpa_aligned(x):
        x = x.contiguous()
    return x


def sdpa_aligned(x: torch.Tensor) -> bool:
    """Last dimension contiguous; storage offset and every other stride (of dimensions longer
    than 1, the only ones ever stepped) a multiple of SDPA_ALIGNMENT elements; head_dim too."""
    strides = [s for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1]
    layout_aligned = (x.stride(-1) == 1 and x.shape[-1] % SDPA_ALIGNMENT == 0
                      and all(s % SDPA_ALIGNMENT == 0 for s in strides))
    if torch.compiler.is_compiling():
        # Dynamo cannot trace `storage_offset()` (torch 2.11: "torch.* op returned
        # non-Tensor"): the call broke the graph inside every layer, so the decoder's layer
        # loop ran eagerly between small compiled pieces, 0.55 of the GPU busy at `small`
        # (benchmarks/README.md, "Graph breaks"). Inside `Attention` the offset is aligned by
        # construction: q and k are fresh tensors (norm and RoPE), and v is either fresh or a
        # column slice of the fused projection starting at (n_heads + k columns) x head_dim,
        # a multiple of SDPA_ALIGNMENT whenever head_dim is; any other head_dim is padded
        # above, which makes a fresh tensor. tests/unit/test_model.py checks that argument for
        # odd layouts with the offset read in eager mode.
        return layout_aligned
    return layout_aligned and x.storage_offset() % SDPA_ALIGNMENT == 0


class RotaryEmbedding(nn.Module):
    """RoPE (base 10k, docs/paper.md §7.1), rotate-half layout as Qwen3. `yarn_factor` > 1 applies YaRN
    (Peng et al., 2023): frequencies interpolated by a ramp between wavelengths that fit
    beta_slow and beta_fast times in the trained context, and attention logits scaled by
    (0.1 ln s + 1)^2. Factor 1 is plain RoPE."""

    def __init__(self, head_dim: int, base: float, context: int, yarn_factor: float = 1.0,
                 beta_fast: float = 32.0, beta_slow: float = 1.0):
        super().__init__()
        # (on the meta device the table is made on the CPU: arange on meta first loads torch's
        # compiler stack; Decoder.__init__ says who builds on meta)
        device = "cpu" if torch.empty(0).is_meta else None
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64,
                                                device=device) / head_dim))
        self.attention_scale = 1.0
        if yarn_factor > 1.0:
            wavelength = 2 * math.pi / inv_freq
            rotations_in_context = context / wavelength
            # ramp: 0 -> interpolate fully (long wavelengths), 1 -> keep (short wavelengths)
            keep = ((rotations_in_context - beta_slow) / (beta_fast - beta_slow)).clamp(0, 1)
            inv_freq = inv_freq / yarn_factor * (1 - keep) + inv_freq * keep
            self.attention_scale = (0.1 * math.log(yarn_factor) + 1.0) ** 2
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.to(device))  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, D); cos/sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class SwitchProjection(nn.Module):
    """Switch Head projection experts (Csordas et al.; paper App. A.1, Table 6).

    Per KV head, E expert projections d_model -> D; a sigmoid router (d_model -> E per head)
    scores them, each token keeps its top-k and sums the selected experts weighted by their
    scores. With E = 1 and k = 1 this is sigmoid(X w) * (X W_v): the value headwise gate.
    Experts are few (<= 8), so all are computed in one matmul and the unselected masked out.

    `rank` r makes every expert low-rank, d_model -> r -> D (`experts_down`, `experts_up`),
    so a variant adds the paper's share of the projection (lab/model/config.py
    `switch_expert_rank`); None keeps full-rank experts (`experts_proj`).
    """

    def __init__(self, d_model: int, kv_heads: int, head_dim: int, experts: int, top_k: int,
                 rank: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.kv_heads, self.head_dim, self.experts, self.top_k = kv_heads, head_dim, experts, top_k
        self.rank = rank
        if rank is None:
            self.experts_proj = nn.Linear(d_model, kv_heads * experts * head_dim, bias=False)
        else:
            self.experts_down = nn.Linear(d_model, kv_heads * experts * rank, bias=False)
            self.experts_up = nn.Parameter(torch.empty(kv_heads, experts, rank, head_dim))
            self.init_factors(init_std)
        self.router = nn.Linear(d_model, kv_heads * experts, bias=False)

    def init_factors(self, init_std: float) -> None:
        """Both low-rank factors from normal(0, s), s = (init_std^2 / r)^(1/4): the product
        A B then starts with a full-rank projection's entry scale (r s^4 = init_std^2), and
        neither factor is far smaller than the other (drawing A like every Linear, at
        init_std, and B at 1/sqrt(r) learned markedly slower at `tiny`'s rank 2)."""
        if self.rank is None or self.experts_up.is_meta:
            return
        std = (init_std ** 2 / self.rank) ** 0.25
        nn.init.normal_(self.experts_down.weight, std=std)
        nn.init.normal_(self.experts_up, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        scores = torch.sigmoid(self.router(x)).view(B, T, self.kv_heads, self.experts)
        if self.top_k < self.experts:
            kept = top_k_indices(self, scores, self.top_k)
            scores = scores * torch.zeros_like(scores).scatter_(-1, kept, 1.0)
        if self.rank is None:
            values = self.experts_proj(x).view(B, T, self.kv_heads, self.experts, self.head_dim)
            return (values * scores[..., None]).sum(dim=-2)  # (B, T, G, D)
        # Weight the rank-r codes before the up-projection: one einsum sums the experts.
        codes = self.experts_down(x).view(B, T, self.kv_heads, self.experts, self.rank)
        return torch.einsum("btger,gerd->btgd", codes * scores[..., None], self.experts_up)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.gate_spec = cfg.gate
        self.gate_active = cfg.gate is not None and cfg.gate_insert_fraction is None
        q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

        self.switch = None
        if cfg.switch_head is not None:
            target, experts, top_k = parse_switch_head(cfg.switch_head)
            self.switch = target
            sizes = (cfg.d_model, cfg.n_kv_heads, cfg.head_dim, experts, top_k,
                     switch_expert_rank(cfg), cfg.init_std)
            self.v_experts = SwitchProjection(*sizes)
            if target == "kv":
                self.k_experts = SwitchProjection(*sizes)
        k_in_proj = 0 if self.switch == "kv" else kv_width
        v_in_proj = 0 if self.switch else kv_width

        gate_width = 0
        if cfg.gate is not None:
            heads, width = gated_heads_and_width(cfg.gate, cfg.n_heads, cfg.n_kv_heads,
                                                 cfg.head_dim, cfg.d_model)
            self.gate_heads, self.gate_score_width = gate_score_shape(cfg.gate, heads, width)
            gate_width = gate_logit_width(cfg.gate, heads, width)
            if not cfg.gate.input_dependent:
                # Table 4 row 6: a learnable tensor, zero-initialised, so the gate starts at 0.5.
                self.gate_constant = nn.Parameter(torch.zeros(self.gate_heads, self.gate_score_width))
            elif cfg.gate.bias:
                self.gate_bias = nn.Parameter(torch.zeros(gate_width))
        # One matmul from X: [q | k | v | gate logits].
        self.split = [q_width, k_in_proj, v_in_proj, gate_width]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.split), bias=False)
        # Zero columns that round the matmul's output up to a multiple of 8, so its bf16 rows
        # are 16-byte aligned: cuBLAS's fastest kernels need that, and a headwise gate's few
        # columns (e.g. 768+384+384+12 at `medium`) break it. Not a parameter; the padded
        # outputs are dropped, so the math and the state dict are unchanged.
        self.in_proj_pad = -sum(self.split) % PROJECTION_ALIGNMENT
        self.o_proj = nn.Linear(q_width, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_eps) if cfg.qk_norm else nn.Identity()
        self.sdpa_transform = cfg.sdpa_transform
        # True: attention by the explicit softmax (_exact_attention) instead of SDPA, the
        # reference `gatelab check` compares the fast path with (lab/check.py).
        self.reference_attention = False
        if cfg.sdpa_transform == "rmsnorm":
            self.sdpa_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_eps)  # per head ("GroupNorm")

    def init_gate(self) -> None:
        """Apply `gate.init` after the model-wide init (which draws every Linear, gate logits
        included, from normal(0, init_std) like the reference code). "zeros" starts every
        input-dependent gate at activation(0) exactly (0.5 for sigmoid). The input-independent
        gate's tensor b is zero-initialised whatever `init` says (Table 4 row 6)."""
        gate_width = self.split[-1]
        if self.gate_spec is not None and self.gate_spec.init == "zeros" and gate_width:
            with torch.no_grad():
                self.in_proj.weight[-gate_width:].zero_()

    def _gate_scores(self, gate_logits: torch.Tensor, B: int, T: int) -> torch.Tensor:
        if self.gate_spec.input_dependent:
            if self.gate_spec.bias:
                gate_logits = gate_logits + self.gate_bias
            logits = gate_logits.view(B, T, self.gate_heads, self.gate_score_width)
        else:
            logits = self.gate_constant.view(1, 1, self.gate_heads, self.gate_score_width)
        return gate_scores(self.gate_spec, logits)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attention_scale: float = 1.0, probe: Optional[Probe] = None) -> torch.Tensor:
        B, T, C = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        weight = self.in_proj.weight
        if self.in_proj_pad:
            weight = F.pad(weight, (0, 0, 0, self.in_proj_pad))
        q, k, v, gate_logits, _ = F.linear(x, weight).split(self.split + [self.in_proj_pad], dim=-1)
        q = q.view(B, T, H, D)
        k = self.k_experts(x) if self.switch == "kv" else k.view(B, T, G, D)
        v = self.v_experts(x) if self.switch else v.view(B, T, G, D)

        spec = self.gate_spec if self.gate_active else None
        scores = self._gate_scores(gate_logits, B, T) if spec is not None else None
        position = spec.position if spec is not None else None
        early_qk = spec is not None and spec.qk_placement == "after_projection"
        if position == "value":
            v = apply_gate(spec, v, scores)  # G2
        elif position == "key" and early_qk:
            k = apply_gate(spec, k, scores)  # G3
        elif position == "query" and early_qk:
            q = apply_gate(spec, q, scores)  # G4

        cos, sin = rope
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        if position == "key" and not early_qk:
            k = apply_gate(spec, k, scores)
        elif position == "query" and not early_qk:
            q = apply_gate(spec, q, scores)

        scale = attention_scale / math.sqrt(D)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if probe is None and not self.reference_attention:
            y = F.scaled_dot_product_attention(sdpa_operand(qh), sdpa_operand(kh),
                                               sdpa_operand(vh), is_causal=True, scale=scale,
                                               enable_gqa=H != G)[..., :D]
        else:
            y = self._exact_attention(qh, kh, vh, scale, probe)
        y = y.transpose(1, 2)  # (B, T, H, D): per-head SDPA output before concatenation

        if self.sdpa_transform == "rmsnorm":
            y = self.sdpa_norm(y)
        elif self.sdpa_transform == "silu":
            y = F.silu(y)
        if probe is not None:
            probe(self.layer, "gate_input", x)
            probe(self.layer, "sdpa_out", y)
            if scores is not None:
                probe(self.layer, "gate_scores", scores)
        if position == "sdpa":
            y = apply_gate(spec, y, scores)  # G1
            if probe is not None:
                probe(self.layer, "sdpa_out_gated", y)

        out = self.o_proj(y.reshape(B, T, H * D))
        if position == "dense_out":
            out = apply_gate(spec, out.view(B, T, 1, C), scores).view(B, T, C)  # G5
        return out

    def _exact_attention(self, q, k, v, scale, probe: Optional[Probe]) -> torch.Tensor:
        """Softmax attention with the probabilities in hand (SDPA returns none); in float32,
        through no fused kernel, so it is also the reference of `gatelab check`."""
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        T = q.shape[-2]
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        probs = logits.softmax(dim=-1)
        if probe is not None:
            probe(self.layer, "attn_logits", logits)  # masked positions are -inf
            probe(self.layer, "attn_probs", probs)
        return (probs @ v.float()).to(v.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.rms_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.rms_eps)
        if cfg.ffn == "moe":
            self.ffn = MoEFeedForward(cfg)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_width)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:  # Ding et al. 2021; dense Table 2 row 7
            self.attn_out_norm = nn.RMSNorm(cfg.d_model, eps=cfg.rms_eps)
            self.ffn_out_norm = nn.RMSNorm(cfg.d_model, eps=cfg.rms_eps)
        self.clip = cfg.residual_clip  # App. A.6

    def _to_residual(self, out: torch.Tensor, norm_name: str) -> torch.Tensor:
        if self.sandwich:
            out = getattr(self, norm_name)(out)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def forward(self, x, rope, attention_scale: float = 1.0, probe: Optional[Probe] = None):
        attn_out = self._to_residual(self.attn(self.attn_norm(x), rope, attention_scale, probe),
                                     "attn_out_norm")
        h = x + attn_out
        ffn_out = self._to_residual(self.ffn(self.ffn_norm(h)), "ffn_out_norm")
        out = h + ffn_out
        if probe is not None:  # the four curves of the paper's Fig. 6
            probe(self.layer, "attn_output", attn_out)
            probe(self.layer, "attn_residual", h)
            probe(self.layer, "ffn_output", ffn_out)
            probe(self.layer, "ffn_residual", out)
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, yarn_factor: float = 1.0):
        super().__init__()
        self.cfg = cfg
        # On the meta device (tests/unit/test_model.py builds every variant there to hold
        # lab/model/params.py's counts to the built model's) the embedding skips its default
        # init: normal_ on meta loads torch's Python reference ops first (with the RoPE table
        # and the experts' init, about 5 s more of those tests on CPU). Elsewhere the default
        # init stays: it draws from the RNG stream every recorded run was initialised with.
        meta = torch.empty(0).is_meta
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(
            cfg.vocab_size, cfg.d_model) if meta else None)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.context, yarn_factor)
        self.loss_kernel = "none"  # train.fused_loss, set by whoever trains it (lab/model/loss.py)
        if not self.embed.weight.is_meta:  # a meta model (parameter counting) has no values to draw
            self.apply(self._init_weights)
            for block in self.blocks:
                block.attn.init_gate()
                self._scale_residual_writes(block)

    def _init_weights(self, module: nn.Module) -> None:
        # The reference `_init_weights`: normal(0, 0.02) for Linear and Embedding, zero bias.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, SwitchProjection):  # after its Linears (apply visits them first)
            module.init_factors(self.cfg.init_std)

    def _scale_residual_writes(self, block: "Block") -> None:
        scale = self.cfg.residual_init_scale
        if scale == 1.0:
            return
        ffn = block.ffn
        writers = [block.attn.o_proj.weight]
        writers.append(ffn.down if isinstance(ffn.down, nn.Parameter) else ffn.down.weight)
        if getattr(ffn, "shared", None) is not None:  # the MoE shared expert
            writers.append(ffn.shared.down.weight)
        with torch.no_grad():
            for weight in writers:
                weight.mul_(scale)

    def set_yarn(self, factor: float) -> None:
        """Long-context evaluation: swap the rotary embedding (no parameters change)."""
        device = self.embed.weight.device
        self.rope = RotaryEmbedding(self.cfg.head_dim, self.cfg.rope_base, self.cfg.context,
                                    factor).to(device)

    def set_reference_attention(self, on: bool) -> None:
        """Attention by the explicit float32 softmax in every layer (on) or by SDPA (off)."""
        for block in self.blocks:
            block.attn.reference_attention = on

    def set_gate_active(self, active: bool) -> None:
        for block in self.blocks:
            block.attn.gate_active = active and block.attn.gate_spec is not None

    def forward(self, tokens: torch.Tensor, probe: Optional[Probe] = None,
                targets: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab); or, given targets, the cross-entropy in float32 by the kernel
        `loss_kernel` names (lab/model/loss.py). Computing the loss here puts the LM head and
        the loss in one compiled graph, so the float32 logits of a 16k vocabulary are never
        written out whole (a large saving at small d_model)."""
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, C)
        rope = self.rope(T, tokens.device)
        for block in self.blocks:
            x = block(x, rope, self.rope.attention_scale, probe)
        if targets is None:
            return self.lm_head(self.norm(x))  # (B, T, vocab)
        return lm_loss(self.norm(x), self.lm_head.weight, targets, reduction, self.loss_kernel)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward (the MoE router's); empty for dense models."""
        losses: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            for name, value in getattr(block.ffn, "aux_losses", {}).items():
                losses[name] = losses.get(name, 0) + value
        return losses


