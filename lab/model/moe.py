"""A fine-grained mixture-of-experts SwiGLU FFN: the paper's MoE-15A2B block at small scale.

docs/paper.md §7.2: 128 fine-grained experts (DeepSeekMoE style), top-8 softmax routing, a
global-batch load-balancing loss and a router z-loss. What the paper leaves open, and what
we chose (every choice is a ModelConfig field):

- Routing (Qwen3-MoE style): softmax over *all* experts in fp32, keep the top-k, and
  renormalise the k kept probabilities to sum to 1 (`moe_normalize_top_k`, default on, as
  Qwen3-MoE's `norm_topk_prob`; off gives the Qwen1.5/2-MoE weighting by raw probability).
- Dropless: every token reaches all k of its experts; there is no capacity factor.
- Load-balancing loss (Switch Transformer, Fedus et al. 2021, generalised to top-k):
  E * sum_i f_i * P_i, f_i = share of the N*k (token, slot) assignments routed to expert i,
  P_i = mean router probability of expert i. Uniform routing gives exactly 1.
  "Global batch" (Qiu et al. 2025, the Qwen team's global-batch LBL): f_i counts every token
  of the micro-batch, not per sequence, and under DDP the counts are summed over all ranks
  (one all-reduce of E numbers per layer) before the loss is formed; P_i stays local so each
  rank's gradient is its own. Across gradient-accumulation micro-batches f_i is NOT pooled:
  the scope is micro-batch x data-parallel ranks.
- Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2.
- Coefficients: `moe_aux_loss_coef` 0.01 (Switch's value) and `moe_z_loss_coef` 0.001
  (ST-MoE's value); the paper states neither. Each layer contributes coef x loss / n_layers,
  so the Decoder's sum over layers is coef x (mean over layers) whatever the depth.
- Shared expert (`moe_shared_expert`, default off, as Qwen3-MoE; the paper does not say):
  one always-on SwiGLU of `moe_expert_hidden`, added without a gate (DeepSeekMoE style).
- `moe_extra_experts` (`baseline_add4experts`, Table 1 row 4): the paper adds "4 experts"
  (+400M parameters) without stating the top-k afterwards. We add them to both the pool and
  the top-k (E + 4 experts, top-(k + 4)), so the baseline gains activated parameters and
  compute as the gates do, not only stored weights.

Efficiency: the N*k assignments are sorted by expert, and the expert SwiGLUs run as two
grouped matmuls (torch's `grouped_mm`) over the sorted rows; the results are weighted and
summed back per token with one index_add. Where grouped_mm is unavailable or unsupported
(no such op in this torch, CUDA without bf16, fp32 under torch.compile, dims not 16-byte
aligned) the fallback is a loop over experts (never over tokens), which needs the per-expert
counts on the host: one synchronisation per layer per forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lab.model.config import ModelConfig, experts_and_top_k
from lab.model.layers import SwiGLU, top_k_indices

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def route(logits: torch.Tensor, top_k: int, normalize: bool, module: nn.Module | None = None):
    """Softmax over all experts, then top-k. logits: (N, E) -> probs (N, E), weights and
    expert indices (N, k). Weights are renormalised over the k kept experts when asked.
    `module`: the routing layer, whose picks `gatelab check` records or replays
    (lab.model.layers.top_k_indices)."""
    probs = logits.float().softmax(dim=-1)
    if module is None:
        weights, experts = probs.topk(top_k, dim=-1)
    else:
        experts = top_k_indices(module, probs, top_k)
        weights = probs.gather(-1, experts)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64, E). scatter_add, not bincount: a static shape for compile."""
    flat = experts.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch loss for top-k: E * sum_i f_i * P_i; 1 for uniform router probabilities.
    probs: (N, E) router probabilities; counts: (E,) assignments per expert (no gradient)."""
    num_experts = probs.shape[-1]
    share = counts.float() / counts.sum().clamp_min(1)  # f_i
    return num_experts * (share.detach() * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean_n logsumexp(logits_n)^2, keeps router logits small."""
    return logits.float().logsumexp(dim=-1).square().mean()


def _global_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum the per-expert counts over data-parallel ranks (the global-batch f_i)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if _GROUPED_MM is None or x.dtype != weight.dtype:
        return False
    if any(size * x.element_size() % 16 for size in weight.shape[1:]):
        return False  # grouped GEMM kernels need 16-byte aligned rows
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if torch.compiler.is_compiling():
        return x.dtype == torch.bfloat16  # the op's meta function accepts bf16 only
    return x.device.type == "cpu"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects expanded (stride-0) gradients, e.g. the gradient of a plain .sum()."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert times that expert's matrix: (M, K) x (E, K, N) -> (M, N).
    ends: (E,) int32 cumulative row counts (the end of each expert's rows)."""
    if _grouped_mm_supported(x, weight):
        return _ContiguousGrad.apply(_GROUPED_MM(x, weight, offs=ends))
    # Fallback: a loop over experts (one host sync for the counts), see the module docstring.
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    pieces = [rows @ weight[e] for e, rows in enumerate(x.split(counts)) if counts[e]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[-1])


class MoEFeedForward(nn.Module):
    """Drop-in for the dense SwiGLU: (B, T, C) -> (B, T, C). After each forward,
    `aux_losses` holds the weighted router losses (added to the LM loss by the Lightning
    module) and `routing` the detached statistics the RoutingStats callback logs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = experts_and_top_k(cfg)
        self.normalize = cfg.moe_normalize_top_k
        hidden = cfg.moe_expert_hidden
        self.router = nn.Linear(cfg.d_model, self.num_experts, bias=False)
        # Expert weights stored (E, in, out) so the grouped matmul reads x @ W[e] directly.
        self.gate_up = nn.Parameter(torch.empty(self.num_experts, cfg.d_model, 2 * hidden))
        self.down = nn.Parameter(torch.empty(self.num_experts, hidden, cfg.d_model))
        if not self.gate_up.is_meta:  # (a meta model, for counting, has no values to draw)
            nn.init.normal_(self.gate_up, std=cfg.init_std)  # the Decoder's normal(0, init_std)
            nn.init.normal_(self.down, std=cfg.init_std)
        self.shared = SwiGLU(cfg.d_model, hidden) if cfg.moe_shared_expert else None
        # Each layer adds coef x loss / n_layers: the Decoder's sum is the mean over layers.
        self.aux_weight = cfg.moe_aux_loss_coef / cfg.n_layers
        self.z_weight = cfg.moe_z_loss_coef / cfg.n_layers
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.routing: dict[str, torch.Tensor] = {}

    def expert_parameters(self) -> int:
        return self.gate_up.numel() + self.down.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        # Router in fp32 (autocast off): small logits differences decide the top-k.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())  # (N, E)
        probs, weights, experts = route(logits, self.top_k, self.normalize, self)  # (N, E), (N, k)

        # Sort the N*k assignments by expert: rows of one expert become contiguous.
        flat_experts = experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)
        token_of_row = order // self.top_k
        counts = expert_counts(flat_experts, self.num_experts)
        ends = counts.cumsum(0).to(torch.int32)

        compute_dtype = torch.get_autocast_dtype(x.device.type) \
            if torch.is_autocast_enabled(x.device.type) else x.dtype
        gate_up, down = self.gate_up.to(compute_dtype), self.down.to(compute_dtype)
        rows = tokens.to(compute_dtype)[token_of_row]  # (N*k, C)
        gate, up = grouped_matmul(rows, gate_up, ends).chunk(2, dim=-1)  # (N*k, H) each
        out_rows = grouped_matmul(F.silu(gate) * up, down, ends)  # (N*k, C)
        out_rows = out_rows * weights.flatten()[order, None].to(out_rows.dtype)
        out = torch.zeros_like(tokens, dtype=out_rows.dtype).index_add_(0, token_of_row, out_rows)
        out = out.view(B, T, C)
        if self.shared is not None:
            out = out + self.shared(x)

        if self.training:
            balance = load_balancing_loss(probs, _global_counts(counts))
            z_loss = router_z_loss(logits)
            self.aux_losses = {"moe_balance_loss": self.aux_weight * balance,
                               "moe_z_loss": self.z_weight * z_loss}
            self.routing = {"counts": counts.detach(), "balance_loss": balance.detach(),
                            "z_loss": z_loss.detach()}
        else:
            self.aux_losses, self.routing = {}, {}
        return out


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def routing_summary(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """counts: (layers, E) assignments -> the busiest and the idlest expert's load over the
    mean load (1 = perfectly balanced), taking the worst layer; device tensors, no sync."""
    mean = counts.mean(dim=-1, keepdim=True).clamp_min(1e-9)
    load = counts / mean
    return {"load_max_over_mean": load.max(), "load_min_over_mean": load.min()}
