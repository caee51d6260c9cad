"""lab/model/decoder.py: shapes, causality, parameter counts against the paper's formulas, every gate
position against a slow reference, the controls, and that every variant learns."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lab.training.callbacks import GateInsertion
from lab.config import resolve
from lab.data.store import generate_synthetic
from lab.errors import LabError
from lab.model.config import ModelConfig, parse_switch_head, switch_expert_rank
from lab.model.decoder import Decoder, RotaryEmbedding, SwitchProjection, apply_rotary
from lab.model.gates import GateSpec
from lab.model.params import count_parameters
from lab.model.params import count_params
from lab.model.variants import VARIANTS, custom_variant
from lab.presets import PRESETS

DENSE_VARIANTS = [slug for slug, v in VARIANTS.items() if v.needs != "moe"]
G1_TO_G5 = ["sdpa", "value", "key", "query", "dense_out"]
_TINY = PRESETS["tiny"]["model"]
H, G, D, C = _TINY["n_heads"], _TINY["n_kv_heads"], _TINY["head_dim"], _TINY["d_model"]


def model_config(variant, preset="tiny", overrides=None) -> ModelConfig:
    return resolve(variant, preset, overrides).model


def build(variant, seed=0, overrides=None) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(model_config(variant, overrides=overrides)).eval()


def tokens(batch=2, length=24, vocab=512, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_leading_rows(target: Decoder, source: Decoder) -> None:
    """Give `target` the weights of `source`; where `source` has more rows (a fused
    projection with gate logits appended), the leading rows are the shared ones."""
    source_state = source.state_dict()
    target.load_state_dict({name: source_state[name][:value.shape[0]]
                            for name, value in target.state_dict().items()})


# --- shapes, gradients, causality: every variant --------------------------------------------

@pytest.mark.parametrize("slug", DENSE_VARIANTS)
def test_forward_backward_shapes(slug):
    model = build(slug).train()
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, 24, model.cfg.vocab_size)
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("slug", DENSE_VARIANTS)
def test_causality(slug):
    """Changing token t+1 leaves the logits at positions <= t unchanged."""
    model = build(slug)
    x = tokens()
    changed = x.clone()
    t = 11
    changed[:, t + 1] = (changed[:, t + 1] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])  # the change is seen


# --- parameter counts: closed forms -----------------------------------------------------------

def baseline_total(m: ModelConfig) -> int:
    """Tied embedding + per layer (fused QKV, W_o, QK-norm, two RMSNorms, SwiGLU) + final norm."""
    attention = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim \
        + m.n_heads * m.head_dim * m.d_model + 2 * m.head_dim
    layer = attention + 2 * m.d_model + 3 * m.d_model * m.ffn_hidden
    return m.vocab_size * m.d_model + m.n_layers * layer + m.d_model


def paper_added(slug: str, m: ModelConfig) -> int:
    """Parameters a variant adds over the baseline: spec 1.4's formulas at the preset's sizes
    (m is the baseline's config: L layers, d model width, q/kv heads, hd head_dim)."""
    L, d, q, kv, hd = m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    variant = VARIANTS[slug]
    if "switch_head" in variant.model:
        target, experts, _ = parse_switch_head(variant.model["switch_head"])
        rank = switch_expert_rank(resolve(slug, m_preset(m)).model)
        # Per projection: E experts of d -> kv*hd (or d -> r -> hd per KV head when low-rank)
        # and a router d -> kv*E, replacing d -> kv*hd.
        experts_params = d * kv * experts * hd if rank is None else kv * experts * rank * (d + hd)
        per_projection = experts_params + d * kv * experts - d * kv * hd
        return L * per_projection * (2 if target == "kv" else 1)
    if "ffn_widen_g1_fraction" in variant.model:
        # SwiGLU: 3 d parameters per hidden unit; f x G1 (L d q hd) in whole units.
        units = round(variant.model["ffn_widen_g1_fraction"] * q * hd / 3)
        return L * 3 * d * units
    formulas = {
        "baseline": 0,
        "baseline_kv8": L * 2 * d * (kv * hd),               # K and V of kv extra heads (T1-2)
        "baseline_q48": L * 2 * d * (q // 2 * hd),           # Q and O of q/2 extra heads (T1-3)
        "sdpa_elementwise_sigmoid_mul": L * d * (q * hd),
        "value_elementwise_sigmoid_mul": L * d * (kv * hd),
        "key_elementwise_sigmoid_mul": L * d * (kv * hd),
        "query_elementwise_sigmoid_mul": L * d * (q * hd),
        "denseout_elementwise_sigmoid_mul": L * d * d,
        "sdpa_headwise_sigmoid_mul": L * d * q,
        "value_headwise_sigmoid_mul": L * d * kv,
        "sdpa_elementwise_headshared_sigmoid_mul": L * d * (q * hd),  # full projection, averaged
        "value_elementwise_headshared_sigmoid_mul": L * d * (kv * hd),
        "sdpa_elementwise_silu_add": L * d * (q * hd),
        "sdpa_elementwise_silu_mul": L * d * (q * hd),
        "sdpa_perhead_rmsnorm": L * hd,                      # one RMSNorm weight, shared by heads
        "sdpa_silu_noparam": 0,
        "sdpa_elementwise_identity_add": L * d * (q * hd),
        "sdpa_input_independent_sigmoid_mul": L * q * hd,    # b in R^{q x d_k} per layer
        "sdpa_elementwise_nssigmoid_mul": L * d * (q * hd),
        "baseline_sandwich_norm": L * 2 * d,                 # two output RMSNorms per block
        "baseline_residual_clip": 0,
        "sdpa_gate_added_in_continued_training": L * d * (q * hd),
    }
    return formulas[slug]


def m_preset(m: ModelConfig) -> str:
    """The dense preset whose baseline has these sizes."""
    return next(name for name in DENSE_PRESETS if resolve("baseline", name).model == m)


DENSE_PRESETS = [name for name, p in PRESETS.items() if p["model"].get("ffn", "dense") == "dense"]


@pytest.mark.parametrize("preset", DENSE_PRESETS)  # MoE presets: tests/unit/test_moe.py
def test_baseline_parameters_per_preset_match_the_formula(preset):
    config = resolve("baseline", preset)
    counts = count_params(config)
    m = config.model
    assert counts["total"] == baseline_total(m)
    assert counts["non_embedding"] == baseline_total(m) - m.vocab_size * m.d_model
    assert counts["added"] == 0


@pytest.mark.parametrize("slug", DENSE_VARIANTS)
def test_added_parameters_match_the_paper_formulas_on_tiny(slug):
    model = build(slug)  # real weights on tiny
    base = model_config("baseline")
    assert count_parameters(model)["total"] - baseline_total(base) == paper_added(slug, base)


@pytest.mark.parametrize("preset", ["small"])
def test_added_parameters_match_the_paper_formulas_at_larger_presets(preset):
    """Counted on the meta device (no weights allocated)."""
    base = model_config("baseline", preset)
    for slug in DENSE_VARIANTS:
        counts = count_params(resolve(slug, preset))
        assert counts["added"] == paper_added(slug, base), slug
        assert counts["total"] == baseline_total(base) + paper_added(slug, base), slug


# The presets the count is held to the built model at: two dense, both MoE ones used in tests.
COUNTED_PRESETS = ["tiny", "small", "moe-tiny", "moe-small"]
COUNT_OVERRIDES = [[], ["model.tie_embeddings=false", "model.qk_norm=false"],
                   ["gate.bias=true", "model.moe_shared_expert=true"],
                   ["gate.input_dependent=false", "gate.sharing=head_shared"]]


@pytest.mark.parametrize("preset", COUNTED_PRESETS)
def test_counts_from_the_config_equal_the_built_models_for_every_variant(preset):
    """lab/model/params.py counts from the shapes alone (`gatelab variants` imports no torch);
    here every registered variant, with overrides that add or remove tensors, is built on the
    meta device and counted tensor by tensor: total, non-embedding, added over the variant's
    baseline, and active (the experts a token does not select left out)."""
    from lab.model.moe import moe_layers
    from lab.model.params import baseline_model

    compared = 0
    for slug in VARIANTS:
        for overrides in COUNT_OVERRIDES:
            try:
                config = resolve(slug, preset, overrides)
            except LabError:  # a variant's needs, or an override its gate does not have
                continue
            with torch.device("meta"):
                model, baseline = Decoder(config.model), Decoder(baseline_model(config))
            built = count_parameters(model)
            inactive = sum(layer.expert_parameters() * (layer.num_experts - layer.top_k)
                           // layer.num_experts for layer in moe_layers(model))
            assert count_params(config) == {
                "total": built["total"], "non_embedding": built["non_embedding"],
                "added": built["total"] - count_parameters(baseline)["total"],
                "active": built["total"] - inactive}, (slug, overrides)
            compared += 1
    assert compared >= len(VARIANTS) * 2


def test_g1_elementwise_adds_layers_times_dmodel_times_query_width():
    """Issue 2's acceptance: exactly layers x d_model x (q heads x head_dim) more than baseline."""
    m = model_config("baseline")
    assert count_params(resolve("sdpa_elementwise_sigmoid_mul", "tiny"))["added"] == \
        m.n_layers * m.d_model * m.n_heads * m.head_dim == 2 * 64 * 64


def test_parameter_matched_baselines_scale_heads_in_the_paper_ratios():
    base = model_config("baseline", "small")
    assert model_config("baseline_kv8", "small").n_kv_heads == 2 * base.n_kv_heads  # k 4 -> 8
    assert model_config("baseline_q48", "small").n_heads * 2 == 3 * base.n_heads    # q 32 -> 48


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_ffn_widened_baselines_add_their_share_of_g1_in_whole_units(preset):
    m = model_config("baseline", preset)
    g1 = count_params(resolve("sdpa_elementwise_sigmoid_mul", preset))["added"]
    for slug, fraction in [("baseline_ffn_g1params", 1.0), ("baseline_ffn_kv8params", 0.25)]:
        widened = model_config(slug, preset)
        assert widened.ffn_hidden == m.ffn_hidden  # the preset's field; the width grows
        added = count_params(resolve(slug, preset))["added"]
        # Within half a hidden unit (3 d parameters per layer) of f x G1.
        assert abs(added - fraction * g1) <= m.n_layers * 3 * m.d_model / 2, slug
    with pytest.raises(LabError, match="needs a dense preset"):
        resolve("baseline_ffn_g1params", "moe-tiny")


@pytest.mark.parametrize("preset", DENSE_PRESETS)
def test_switch_head_experts_add_the_papers_share_of_their_projections(preset):
    """Issue 24: within one rank step of Table 6's fraction of the replaced K+V or V."""
    from lab.model.variants import paper_switch_fraction, projection_params

    for slug, variant in VARIANTS.items():
        if "switch_head_added_fraction" not in variant.model:
            continue
        config = resolve(slug, preset)
        m = config.model
        target, experts, _ = parse_switch_head(m.switch_head)
        replaced = projection_params(target, m.d_model, m.n_kv_heads, m.head_dim, m.n_layers)
        rank = switch_expert_rank(m)
        step = (2 if target == "kv" else 1) * m.n_layers * m.n_kv_heads * experts * (m.d_model + m.head_dim)
        added = count_params(config)["added"]
        assert 1 <= rank <= m.head_dim
        assert abs(added - paper_switch_fraction(target, variant.paper_added_m) * replaced) <= step / 2, slug
    # switchhead_v_1top1 keeps full-rank experts: the value headwise gate's parameters.
    assert count_params(resolve("switchhead_v_1top1", preset))["added"] == \
        count_params(resolve("value_headwise_sigmoid_mul", preset))["added"]


def test_switch_head_added_fraction_is_checked_before_training():
    with pytest.raises(LabError, match="needs Switch Head experts"):
        resolve("baseline", "tiny", ["model.switch_head_added_fraction=0.5"])
    with pytest.raises(LabError, match="the rank must lie in 1..16"):
        resolve("switchhead_kv_8top8", "tiny", ["model.switch_head_added_fraction=20"])
    with pytest.raises(LabError, match="switch_head_added_fraction: must be a positive number"):
        resolve("switchhead_kv_8top8", "tiny", ["model.switch_head_added_fraction=-1"])
    with pytest.raises(LabError, match="ffn_widen_g1_fraction: must be a positive number"):
        resolve("baseline", "tiny", ["model.ffn_widen_g1_fraction=-0.5"])


# --- a gate of 1 equals no gate (G1..G5) -------------------------------------------------------

@pytest.mark.parametrize("gate_axes", [
    *[dict(position=p) for p in G1_TO_G5],
    dict(position="sdpa", granularity="headwise"),
    dict(position="value", granularity="headwise"),
    dict(position="sdpa", sharing="head_shared"),
    dict(position="value", sharing="head_shared"),
    dict(position="key", qk_placement="after_norm_rope"),
    dict(position="query", qk_placement="after_norm_rope"),
    dict(position="sdpa", input_dependent=False),
])
def test_sigmoid_gate_with_very_large_logits_equals_the_baseline(gate_axes):
    gate = GateSpec(**{"bias": True, **gate_axes})
    torch.manual_seed(0)
    gated = Decoder(model_config(custom_variant(gate))).eval()
    baseline = Decoder(model_config("baseline")).eval()
    load_leading_rows(baseline, gated)
    with torch.no_grad():
        for block in gated.blocks:
            saturate = block.attn.gate_bias if gate.input_dependent else block.attn.gate_constant
            saturate.fill_(1e4)  # sigmoid(1e4) == 1.0 exactly in float32
        x = tokens()
        torch.testing.assert_close(gated(x), baseline(x), rtol=1e-5, atol=1e-5)
        for block in gated.blocks:  # and a gate that is not saturated does change the output
            (block.attn.gate_bias if gate.input_dependent else block.attn.gate_constant).fill_(-1)
        assert not torch.allclose(gated(x), baseline(x), atol=1e-3)


# --- every gate position against a slow, unfused reference -------------------------------------

def reference_attention(attn, x: torch.Tensor, gate_at: dict) -> torch.Tensor:
    """Attention written the long way: separate Q, K, V and gate projections (the unfused
    layout), an explicit softmax per query head, and the gate written out per position.
    `gate_at[position](tensor, gate_logits)` gives the gated tensor."""
    B, T, C = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    weights = attn.in_proj.weight.split(attn.split, dim=0)
    projections = [torch.nn.Linear(C, w.shape[0], bias=False) for w in weights]
    for projection, weight in zip(projections, weights):
        projection.weight.data.copy_(weight)
    q_proj, k_proj, v_proj, gate_proj = projections
    gate_logits = gate_proj(x)
    if getattr(attn, "gate_bias", None) is not None:
        gate_logits = gate_logits + attn.gate_bias
    identity = lambda tensor, logits: tensor  # noqa: E731
    q = gate_at.get("query", identity)(q_proj(x).view(B, T, H, D), gate_logits)
    k = gate_at.get("key", identity)(k_proj(x).view(B, T, G, D), gate_logits)
    v = gate_at.get("value", identity)(v_proj(x).view(B, T, G, D), gate_logits)
    cos, sin = attn_rope(attn, T)
    q, k = apply_rotary(attn.q_norm(q), cos, sin), apply_rotary(attn.k_norm(k), cos, sin)
    heads = []
    for h in range(H):
        g = h // (H // G)  # the KV head this query head reads (GQA)
        scores = q[:, :, h] @ k[:, :, g].transpose(-1, -2) / D ** 0.5  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(dim=-1) @ v[:, :, g])  # (B, T, D)
    y = gate_at.get("sdpa", identity)(torch.stack(heads, dim=2), gate_logits)  # (B, T, H, D)
    out = y.reshape(B, T, H * D) @ attn.o_proj.weight.T
    return gate_at.get("dense_out", identity)(out, gate_logits)


def attn_rope(attn, length):
    """The (cos, sin) tables the decoder hands its attention layers (RoPE base 10k)."""
    return RotaryEmbedding(attn.head_dim, 10000.0, _TINY["context"])(length, "cpu")


def _per_head(logits, heads, width):
    return logits.reshape(*logits.shape[:2], heads, width)


REFERENCE_GATES = {
    "sdpa_elementwise_sigmoid_mul": {"sdpa": lambda y, g: y * torch.sigmoid(_per_head(g, H, D))},
    "sdpa_headwise_sigmoid_mul": {"sdpa": lambda y, g: y * torch.sigmoid(_per_head(g, H, 1))},
    "value_elementwise_sigmoid_mul": {"value": lambda v, g: v * torch.sigmoid(_per_head(g, G, D))},
    "value_headwise_sigmoid_mul": {"value": lambda v, g: v * torch.sigmoid(_per_head(g, G, 1))},
    "key_elementwise_sigmoid_mul": {"key": lambda k, g: k * torch.sigmoid(_per_head(g, G, D))},
    "query_elementwise_sigmoid_mul": {"query": lambda q, g: q * torch.sigmoid(_per_head(g, H, D))},
    "denseout_elementwise_sigmoid_mul": {"dense_out": lambda o, g: o * torch.sigmoid(g)},
    "sdpa_elementwise_headshared_sigmoid_mul": {
        "sdpa": lambda y, g: y * torch.sigmoid(_per_head(g, H, D)).mean(dim=2, keepdim=True)},
    "value_elementwise_headshared_sigmoid_mul": {
        "value": lambda v, g: v * torch.sigmoid(_per_head(g, G, D)).mean(dim=2, keepdim=True)},
    "sdpa_elementwise_silu_add": {"sdpa": lambda y, g: y + F.silu(_per_head(g, H, D))},
    "sdpa_elementwise_silu_mul": {"sdpa": lambda y, g: y * F.silu(_per_head(g, H, D))},
    "sdpa_elementwise_identity_add": {"sdpa": lambda y, g: y + _per_head(g, H, D)},
    "sdpa_elementwise_nssigmoid_mul": {
        "sdpa": lambda y, g: y * (0.5 + 0.5 * torch.sigmoid(_per_head(g, H, D)))},
    "sdpa_silu_noparam": {"sdpa": lambda y, g: F.silu(y)},
    "sdpa_perhead_rmsnorm": {"sdpa": lambda y, g: y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True)
                                                                  + 1e-6)},
    "baseline": {},
}


@pytest.mark.parametrize("slug", list(REFERENCE_GATES))
def test_fused_attention_equals_the_unfused_reference(slug):
    """The gate logits come out of the one fused in_proj; a separate gate Linear with the
    same weights (the unfused layout) gives the same attention output, at every position."""
    attn = build(slug, seed=1).blocks[0].attn
    with torch.no_grad():
        for name, param in attn.named_parameters():  # logits large: gates far from 0.5
            if "in_proj" in name:
                param.mul_(20)
        x = torch.randn(2, 12, C)
        fused = attn(x, attn_rope(attn, 12))
        reference = reference_attention(attn, x, REFERENCE_GATES[slug])
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_input_independent_gate_ignores_x_and_starts_at_one_half():
    model = build("sdpa_input_independent_sigmoid_mul")
    attn = model.blocks[0].attn
    assert torch.equal(attn.gate_constant, torch.zeros(H, D))  # zero-init b in R^{q x d_k}
    seen = []
    probe = lambda layer, name, tensor: seen.append(tensor) if name == "gate_scores" else None  # noqa: E731
    with torch.no_grad():
        attn.gate_constant.copy_(torch.randn(H, D))
        model(tokens(seed=1), probe=probe)
        model(tokens(seed=2), probe=probe)
    assert torch.equal(seen[0], seen[2])  # layer 0, two different inputs
    torch.testing.assert_close(seen[0], torch.sigmoid(attn.gate_constant).view(1, 1, H, D))
    fresh = build("sdpa_input_independent_sigmoid_mul")
    fresh(tokens(), probe=lambda layer, name, tensor: seen.append((name, tensor)))
    assert all((t == 0.5).all() for n, t in seen[4:] if n == "gate_scores")


def test_ns_sigmoid_scores_in_the_model_lie_in_half_to_one():
    model = build("sdpa_elementwise_nssigmoid_mul")
    with torch.no_grad():
        model.blocks[0].attn.in_proj.weight.mul_(200)  # push the logits far out
        scores = []
        model(tokens(), probe=lambda l, n, t: scores.append(t) if n == "gate_scores" else None)
    scores = torch.cat([s.flatten() for s in scores])
    assert scores.min() >= 0.5 and scores.max() <= 1.0
    assert scores.min() < 0.55 and scores.max() > 0.95


def test_head_shared_gate_gives_every_head_the_same_scores():
    model = build("sdpa_elementwise_headshared_sigmoid_mul")
    seen = {}
    with torch.no_grad():
        model(tokens(), probe=lambda l, n, t: seen.setdefault((l, n), t))
    for layer in range(2):
        before, after = seen[(layer, "sdpa_out")], seen[(layer, "sdpa_out_gated")]
        ratio = after / before  # the score each head's output was multiplied by
        torch.testing.assert_close(ratio, ratio[:, :, :1].expand_as(ratio))


def test_gate_init_zeros_starts_every_score_at_activation_of_zero():
    model = build("sdpa_headwise_sigmoid_mul", overrides=["gate.init=zeros"])
    scores = []
    model(tokens(), probe=lambda l, n, t: scores.append(t) if n == "gate_scores" else None)
    assert all((s == 0.5).all() for s in scores) and len(scores) == 2
    default = build("sdpa_headwise_sigmoid_mul")
    assert default.blocks[0].attn.in_proj.weight[-H:].abs().sum() > 0  # normal init by default


# --- Switch Head (Table 6) -----------------------------------------------------------------------

def test_switch_v_1top1_equals_the_value_headwise_gate_with_mapped_weights():
    headwise = build("value_headwise_sigmoid_mul", seed=3)
    switch = build("switchhead_v_1top1", seed=4)
    q_and_k = (H + G) * D
    state = {}
    for name, value in switch.state_dict().items():
        if "v_experts.experts_proj" in name:  # the one V expert is W_V
            value = headwise.state_dict()[name.replace("v_experts.experts_proj", "in_proj")]
            value = value[q_and_k:q_and_k + G * D]
        elif "v_experts.router" in name:  # the sigmoid router is the headwise gate W_theta
            value = headwise.state_dict()[name.replace("v_experts.router", "in_proj")][-G:]
        elif "in_proj" in name:
            value = headwise.state_dict()[name][:q_and_k]
        else:
            value = headwise.state_dict()[name]
        state[name] = value
    switch.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(switch(tokens()), headwise(tokens()), rtol=1e-5, atol=1e-5)


def top_k_sum(switch: SwitchProjection, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Every expert's output `values` (B, T, G, E, D), summed the long way over each token's
    top-k experts, weighted by their sigmoid router scores."""
    B, T, G, E, D = values.shape
    scores = torch.sigmoid(switch.router(x)).view(B, T, G, E)
    top = scores.topk(switch.top_k, dim=-1)
    expected = torch.zeros(B, T, G, D)
    for slot in range(switch.top_k):
        index = top.indices[..., slot]
        chosen = values.gather(3, index[..., None, None].expand(B, T, G, 1, D)).squeeze(3)
        expected += top.values[..., slot, None] * chosen
    return expected


def test_switch_projection_sums_the_top_k_experts_weighted_by_sigmoid_scores():
    torch.manual_seed(0)
    switch = SwitchProjection(d_model=8, kv_heads=2, head_dim=4, experts=4, top_k=2)
    x = torch.randn(3, 5, 8)
    values = switch.experts_proj(x).view(3, 5, 2, 4, 4)
    torch.testing.assert_close(switch(x), top_k_sum(switch, x, values))


def test_low_rank_switch_projection_sums_the_top_k_low_rank_experts():
    torch.manual_seed(0)
    switch = SwitchProjection(d_model=8, kv_heads=2, head_dim=4, experts=4, top_k=2, rank=3)
    assert not hasattr(switch, "experts_proj")
    x = torch.randn(3, 5, 8)
    # Each expert's full d_model x head_dim map, A_e B_e, applied the long way.
    down = switch.experts_down.weight.view(2, 4, 3, 8)  # (G, E, r, d)
    full = torch.einsum("gerc,gerd->gecd", down, switch.experts_up)  # (G, E, d, D)
    values = torch.einsum("btc,gecd->btged", x, full)
    torch.testing.assert_close(switch(x), top_k_sum(switch, x, values))


def test_low_rank_experts_start_at_the_scale_of_a_full_rank_projection():
    torch.manual_seed(0)
    model = Decoder(model_config("switchhead_v_4top4", "small"))
    switch = model.blocks[0].attn.v_experts
    full = torch.einsum("gerc,gerd->gecd",
                        switch.experts_down.weight.view(switch.kv_heads, switch.experts, switch.rank, -1),
                        switch.experts_up)
    assert full.std().item() == pytest.approx(model.cfg.init_std, rel=0.1)


# --- sandwich norm, residual clip, gate insertion -----------------------------------------------

def _probe_outputs(model, names=("attn_output", "ffn_output")):
    seen = {}
    with torch.no_grad():
        model(tokens(), probe=lambda l, n, t: seen.setdefault((l, n), t) if n in names else None)
    return seen


def test_sandwich_norm_normalises_attention_and_ffn_outputs():
    def outputs(slug):
        model = build(slug)
        with torch.no_grad():  # outputs well above the norm's eps (init outputs are ~1e-3)
            for block in model.blocks:
                block.attn.o_proj.weight.mul_(100)
                block.ffn.down.weight.mul_(100)
        return _probe_outputs(model).values()

    for out in outputs("baseline_sandwich_norm"):
        rms = out.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)
    assert all((o.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1 for o in outputs("baseline"))


def test_residual_clip_clamps_attention_and_ffn_outputs():
    clip = 1e-3
    model = build("baseline_residual_clip", overrides=[f"model.residual_clip={clip}"])
    outputs = _probe_outputs(model)
    assert len(outputs) == 4
    assert all(o.abs().max() <= clip for o in outputs.values())
    assert any(o.abs().max() == clip for o in outputs.values())  # the clip did act


def test_gate_insertion_runs_the_baseline_until_the_insert_step():
    inserted = build("sdpa_gate_added_in_continued_training", seed=5)
    baseline = build("baseline")
    load_leading_rows(baseline, inserted)
    gated = build("sdpa_elementwise_sigmoid_mul")
    gated.load_state_dict(inserted.state_dict())
    callback = GateInsertion(insert_step=10)
    module = SimpleNamespace(model=inserted)
    x = tokens()
    with torch.no_grad():
        callback.on_train_batch_start(SimpleNamespace(global_step=9), module, None, 0)
        torch.testing.assert_close(inserted(x), baseline(x), rtol=1e-5, atol=1e-5)
        callback.on_train_batch_start(SimpleNamespace(global_step=10), module, None, 0)
        torch.testing.assert_close(inserted(x), gated(x))
        assert not torch.allclose(inserted(x), baseline(x), atol=1e-3)


def test_dormant_gate_gets_no_gradient():
    model = build("sdpa_gate_added_in_continued_training").train()
    x = tokens()
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    gate_rows = model.blocks[0].attn.split[-1]
    assert torch.equal(model.blocks[0].attn.in_proj.weight.grad[-gate_rows:],
                       torch.zeros(gate_rows, C))


# --- every variant learns ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_stream():
    return torch.from_numpy(generate_synthetic(512, 60_000, seed=7)).long()


@pytest.mark.parametrize("slug", DENSE_VARIANTS)
def test_loss_falls_over_20_training_steps(slug, synthetic_stream):
    """A bare torch loop (no Lightning, no MLflow): fresh windows every step, loss on a fixed
    held-out batch before and after."""
    torch.manual_seed(0)
    model = Decoder(model_config(slug))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    length, batch = 32, 8
    starts = torch.randint(0, len(synthetic_stream) - length - 1, (21, batch),
                           generator=torch.Generator().manual_seed(0))

    def loss_on(step_starts):
        windows = torch.stack([synthetic_stream[s:s + length + 1] for s in step_starts.tolist()])
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())

    with torch.no_grad():
        before = loss_on(starts[20]).item()
    for step in range(20):
        loss = loss_on(starts[step])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_on(starts[20]).item()
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_residual_init_scale_shrinks_only_the_projections_into_the_residual_stream(preset):
    def model(scale):
        torch.manual_seed(0)
        return Decoder(resolve("baseline", preset, [f"model.residual_init_scale={scale}"]).model)

    plain, scaled = model(1.0).state_dict(), model(0.25).state_dict()
    residual_writers = [n for n in plain if n.endswith(("o_proj.weight", "ffn.down.weight",
                                                       "ffn.down"))]
    assert len(residual_writers) == 2 * _TINY["n_layers"]
    for name, weight in plain.items():
        expected = weight * 0.25 if name in residual_writers else weight
        torch.testing.assert_close(scaled[name], expected, rtol=0, atol=0)


@pytest.mark.parametrize("slug", ["baseline", "sdpa_headwise_sigmoid_mul", "value_headwise_sigmoid_mul"])
def test_fused_projection_is_padded_to_aligned_rows_without_new_parameters(slug):
    attn = build(slug, seed=1).blocks[0].attn
    width = sum(attn.split)
    assert attn.in_proj.weight.shape[0] == width  # the parameter keeps its unpadded shape
    assert (width + attn.in_proj_pad) % 8 == 0 and 0 <= attn.in_proj_pad < 8
    assert (attn.in_proj_pad > 0) == (slug != "baseline")  # tiny: 128 columns, + 4 or 2 gate logits


# --- SDPA operands: aligned for every layout the lab accepts (lab/model/decoder.py sdpa_operand) -----

# Widths that break 16-byte alignment of a fused-projection view: odd d_model, head_dim not a
# multiple of 8, KV widths such as 3 x 20, headwise gates adding a few columns.
ODD_LAYOUTS = [dict(head_dim=20, n_heads=3, n_kv_heads=1, d_model=60),
               dict(head_dim=12, n_heads=5, n_kv_heads=5, d_model=77),
               dict(head_dim=36, n_heads=6, n_kv_heads=3, d_model=50),
               dict(head_dim=16, n_heads=6, n_kv_heads=3, d_model=64)]
LAYOUT_VARIANTS = ["baseline", "sdpa_headwise_sigmoid_mul", "sdpa_elementwise_sigmoid_mul",
                   "value_headwise_sigmoid_mul", "key_elementwise_sigmoid_mul",
                   "query_elementwise_sigmoid_mul", "denseout_elementwise_sigmoid_mul", "baseline_kv8",
                   "switchhead_kv_4top4", "switchhead_v_1top1", "sdpa_input_independent_sigmoid_mul"]


@pytest.mark.parametrize("layout", ODD_LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("slug", LAYOUT_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_sdpa_operand_is_aligned_and_the_result_exact(monkeypatch, slug, layout, dtype):
    from lab.model.decoder import sdpa_aligned

    overrides = [f"model.{k}={v}" for k, v in layout.items()]
    model = build(slug, overrides=overrides).to(dtype)
    real_sdpa = F.scaled_dot_product_attention
    seen = []

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append([(t.shape, t.stride(), t.storage_offset(), sdpa_aligned(t)) for t in (q, k, v)])
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    x = tokens()
    with torch.no_grad():
        fast = model(x).float()
        model.set_reference_attention(True)  # the explicit softmax: no SDPA, no padding
        reference = model(x).float()
    assert len(seen) == model.cfg.n_layers
    for operands in seen:
        for shape, stride, offset, aligned in operands:
            assert aligned, f"misaligned SDPA operand: shape {tuple(shape)} stride {stride} offset {offset}"
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (fast - reference).norm() / reference.norm() < tolerance


@pytest.mark.parametrize("layout", ODD_LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("slug", LAYOUT_VARIANTS)
def test_operands_stay_aligned_when_the_offset_is_not_read(monkeypatch, slug, layout):
    """Under torch.compile `sdpa_aligned` cannot read the storage offset and relies on the
    fused projection's column order (lab/model/decoder.py): run the model as if compiling, and read
    the real offsets of what reaches SDPA."""
    overrides = [f"model.{k}={v}" for k, v in layout.items()]
    model = build(slug, overrides=overrides)
    real_sdpa = F.scaled_dot_product_attention
    offsets = []

    def recording_sdpa(q, k, v, *args, **kwargs):
        offsets.extend((t.storage_offset(), t.stride()) for t in (q, k, v))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        model(tokens())
    assert len(offsets) == 3 * model.cfg.n_layers
    for offset, stride in offsets:
        assert offset % 8 == 0, f"SDPA operand at storage offset {offset} (stride {stride})"


DENSE_AND_MOE = ([("tiny", slug, torch.float32) for slug, v in VARIANTS.items() if v.needs != "moe"]
                 # the MoE layer's grouped GEMM path (bf16 weights); its fp32 fallback loops
                 # over experts with data-dependent sizes and is not one graph
                 + [("moe-tiny", slug, torch.bfloat16) for slug, v in VARIANTS.items()
                    if v.needs != "dense"][:3])


@pytest.mark.parametrize("preset,slug,dtype", DENSE_AND_MOE, ids=str)
def test_the_decoder_compiles_to_one_graph(preset, slug, dtype):
    """No graph break in a training forward: one broke every layer's attention (a
    `storage_offset()` call), which left the layer loop eager and the GPU idle half of a
    `small` step (benchmarks/README.md, "Graph breaks")."""
    torch._dynamo.reset()
    config = resolve(slug, preset, [])
    torch.manual_seed(0)
    model = Decoder(config.model).to(dtype)
    x = tokens(length=config.model.context // 4, vocab=config.model.vocab_size)
    explanation = torch._dynamo.explain(model)(x, targets=x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_sdpa_aligned_rejects_the_layout_that_broke_cudnn():
    from lab.model.decoder import sdpa_aligned, sdpa_operand

    # The headwise gate's fused output at `small`: 384 + 192 + 192 + 6 = 774 columns, V a view.
    fused = torch.randn(2, 16, 774)
    v = fused[..., 576:768].view(2, 16, 3, 64).transpose(1, 2)
    assert not sdpa_aligned(v)
    fixed = sdpa_operand(v)
    assert sdpa_aligned(fixed) and torch.equal(fixed, v)
    padded = sdpa_operand(torch.randn(2, 3, 16, 20))  # head_dim 20 -> 24, zeros appended
    assert padded.shape[-1] == 24 and sdpa_aligned(padded) and not padded[..., 20:].any()
