"""lab/model/moe.py: routing, router losses, the grouped expert computation against a slow
per-token reference, parameter counts, and MoE runs end to end on CPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from lab.config import resolve
from lab.errors import LabError
from lab.model.config import ModelConfig
from lab.model.decoder import Decoder
from lab.model.variants import VARIANTS
from lab.model.layers import SwiGLU
import lab.model.moe as moe
from lab.model.moe import (MoEFeedForward, expert_counts, grouped_matmul, load_balancing_loss,
                           route, router_z_loss)
from lab.model.params import active_parameters


def moe_config(**changes) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn="moe", moe_experts=8, moe_top_k=2, moe_expert_hidden=16)
    return ModelConfig(**{**base, **changes})


def reference_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Slow reference: each token through each of its top-k experts, one at a time."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = (tokens @ layer.router.weight.T).softmax(dim=-1)
    out = torch.zeros_like(tokens)
    for n in range(tokens.shape[0]):
        weights, experts = probs[n].topk(layer.top_k)
        if layer.normalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            gate, up = (tokens[n] @ layer.gate_up[e]).chunk(2)
            out[n] += w * ((F.silu(gate) * up) @ layer.down[e])
    return out.view_as(x)


def test_route_keeps_the_top_k_of_a_softmax_over_all_experts():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]])
    probs, weights, experts = route(logits, 2, normalize=False)
    assert experts.tolist() == [[1, 3], [0, 2]]
    assert torch.allclose(probs, logits.softmax(-1))
    assert torch.allclose(weights, probs.gather(1, experts))  # raw probabilities
    _, normalized, _ = route(logits, 2, normalize=True)
    assert torch.allclose(normalized.sum(-1), torch.ones(2))
    assert torch.allclose(normalized, weights / weights.sum(-1, keepdim=True))


def test_load_balancing_loss_is_one_for_uniform_routing_and_larger_when_skewed():
    E, N = 8, 64
    uniform = torch.full((N, E), 1 / E)
    balanced = expert_counts(torch.arange(N * 2).remainder(E).view(N, 2), E)
    assert load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed_probs = torch.full((N, E), 1e-3).index_fill(1, torch.tensor([0]), 1 - 7e-3)
    collapsed = expert_counts(torch.zeros(N, 1, dtype=torch.long), E)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(E * (1 - 7e-3))
    skewed_probs = (torch.randn(N, E) * 2).softmax(-1)
    _, _, experts = route(skewed_probs.log(), 2, True)
    assert load_balancing_loss(skewed_probs, expert_counts(experts, E)) > 1.0


def test_z_loss_is_the_squared_logsumexp():
    logits = torch.randn(10, 4)
    assert router_z_loss(logits).item() == pytest.approx(
        (logits.logsumexp(-1) ** 2).mean().item(), rel=1e-6)


def test_one_expert_top1_equals_the_dense_swiglu_with_the_same_weights():
    torch.manual_seed(0)
    cfg = moe_config(moe_experts=1, moe_top_k=1)
    dense, layer = SwiGLU(cfg.d_model, cfg.moe_expert_hidden), MoEFeedForward(cfg)
    with torch.no_grad():
        layer.gate_up[0].copy_(dense.gate_up.weight.T)
        layer.down[0].copy_(dense.down.weight.T)
    x = torch.randn(2, 5, cfg.d_model)
    assert torch.allclose(layer(x), dense(x), atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "expert_loop"])
def test_every_token_reaches_all_its_experts(monkeypatch, normalize, grouped):
    """Dropless: the sorted, grouped computation equals the per-token reference exactly,
    with and without grouped_mm (the fallback loop over experts)."""
    if not grouped:
        monkeypatch.setattr(moe, "_GROUPED_MM", None)
    torch.manual_seed(1)
    layer = MoEFeedForward(moe_config(moe_normalize_top_k=normalize, init_std=0.2))
    x = torch.randn(3, 7, 32)
    assert torch.allclose(layer(x), reference_moe(layer, x), atol=1e-5)


def test_grouped_matmul_handles_experts_without_rows_and_expanded_gradients():
    x = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(3, 8, 16, requires_grad=True)
    ends = torch.tensor([2, 2, 6], dtype=torch.int32)
    out = grouped_matmul(x, weight, ends)
    assert torch.allclose(out, torch.cat([x[:2] @ weight[0], x[2:] @ weight[2]]), atol=1e-5)
    out.sum().backward()  # the gradient of .sum() is expanded (stride 0)
    assert torch.allclose(x.grad[:2], weight[0].sum(-1).expand(2, 8).detach(), atol=1e-5)
    assert weight.grad[1].abs().sum() == 0


def test_gradients_reach_every_selected_expert_and_no_other():
    torch.manual_seed(2)
    layer = MoEFeedForward(moe_config(moe_experts=8, moe_top_k=2))
    with torch.no_grad():
        layer.router.weight[5] = -100.0  # inputs are positive: expert 5 is never in the top 2
    x = torch.rand(2, 16, 32)
    layer.train()
    out = layer(x)
    (out.square().sum() + sum(layer.aux_losses.values())).backward()
    counts = layer.routing["counts"]
    assert counts[5] == 0 and (counts > 0).sum() >= 2
    for e in range(8):
        reached = layer.gate_up.grad[e].abs().sum() > 0 and layer.down.grad[e].abs().sum() > 0
        assert reached == bool(counts[e] > 0), f"expert {e}"
    assert layer.router.weight.grad.abs().sum() > 0


def test_aux_losses_are_weighted_in_training_and_absent_in_eval():
    cfg = moe_config(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.25)
    model = Decoder(cfg)
    tokens = torch.randint(0, 64, (2, 8))
    model.train()
    model(tokens)
    losses = model.aux_losses()
    layers = moe.moe_layers(model)
    expected = sum(0.5 * l.routing["balance_loss"] / 2 for l in layers)
    assert set(losses) == {"moe_balance_loss", "moe_z_loss"}
    assert losses["moe_balance_loss"].item() == pytest.approx(expected.item())
    model.eval()
    model(tokens)
    assert model.aux_losses() == {}


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(3)
    layer = MoEFeedForward(moe_config(init_std=0.2))
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference_moe(layer, x.detach()), atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert layer.gate_up.grad is not None and x.grad is not None


def test_shared_expert_adds_an_always_on_swiglu():
    torch.manual_seed(4)
    layer = MoEFeedForward(moe_config(moe_shared_expert=True))
    x = torch.randn(1, 4, 32)
    assert torch.allclose(layer(x), reference_moe(layer, x) + layer.shared(x), atol=1e-6)


def test_active_parameters_count_k_of_e_experts():
    cfg = resolve("baseline", "moe-tiny").model
    E, k, C, H = cfg.moe_experts, cfg.moe_top_k, cfg.d_model, cfg.moe_expert_hidden
    total = sum(p.numel() for p in Decoder(cfg).parameters())
    assert active_parameters(cfg) == total - cfg.n_layers * (E - k) * 3 * C * H
    dense = resolve("baseline", "tiny")
    assert active_parameters(dense) == sum(p.numel() for p in Decoder(dense.model).parameters())


def test_add4experts_adds_four_experts_to_pool_and_top_k():
    from lab.model.params import count_params

    config = resolve("baseline_add4experts", "moe-tiny")
    layer = MoEFeedForward(config.model)
    assert (layer.num_experts, layer.top_k) == (16 + 4, 4 + 4)
    m = config.model
    assert count_params(config)["added"] == m.n_layers * 4 * (3 * m.d_model * m.moe_expert_hidden
                                                              + m.d_model)  # experts + router rows


def test_every_variant_runs_forward_on_moe_tiny():
    tokens = torch.randint(0, 512, (1, 16))
    for slug in (slug for slug, v in VARIANTS.items() if v.needs != "dense"):
        model = Decoder(resolve(slug, "moe-tiny").model)
        assert model(tokens).shape == (1, 16, 512), slug


def test_variants_listing_shows_add4experts_available_only_on_moe():
    from lab.reports.variants import describe_variants

    rows = {r["slug"]: r for r in describe_variants("moe-tiny")}
    assert rows["baseline_add4experts"]["available"] and rows["baseline_add4experts"]["params_added"] > 0
    assert all(r["available"] for r in rows.values() if r["needs"] != "dense")
    assert not any(r["available"] for r in rows.values() if r["needs"] == "dense")
    with pytest.raises(LabError, match="MoE preset"):
        resolve("baseline_add4experts", "tiny")
    with pytest.raises(LabError, match="moe_top_k"):
        resolve("baseline", "moe-tiny", ["model.moe_top_k=17"])


def test_moe_run_logs_routing_statistics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lab.training.run import train_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = resolve("sdpa_headwise_sigmoid_mul", "moe-tiny", data="synthetic", tokens=1e4,
                     overrides=["train.log_every=2", "train.val_batches=1"])
    result = train_run(config, quiet=True)
    assert result.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["moe/load_max_over_mean"] >= 1.0 >= metrics["moe/load_min_over_mean"] >= 0
    assert 0.5 < metrics["moe/aux_loss"] < config.model.moe_experts and metrics["moe/z_loss"] > 0
    assert metrics["params/active"] < metrics["params/total"]
    assert "train/moe_balance_loss" in metrics and "train/moe_z_loss" in metrics
    path = client.download_artifacts(result.run_id, "routing.json", str(tmp_path))
    routing = json.loads(open(path).read())
    fractions = torch.tensor(routing["token_fraction_per_layer"])
    assert fractions.shape == (config.model.n_layers, config.model.moe_experts)
    assert torch.allclose(fractions.sum(-1), torch.ones(config.model.n_layers))
