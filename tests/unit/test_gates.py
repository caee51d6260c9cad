"""lab/model/gates.py and lab/model/variants.py: the gate axes, the score math, the parameter
formulas and the registry."""


import pytest
import torch

from lab.errors import LabError
from lab.model.gates import (GateSpec, apply_gate, gate_logit_width, gate_param_count, gate_scores,
                             gated_heads_and_width, parse_gate)
from lab.model.variants import VARIANTS, custom_variant, display_name, get_variant

# Spec section 3: the 27 slugs, exactly as named there.
SPEC_SLUGS = [
    "baseline", "baseline_kv8", "baseline_q48", "baseline_add4experts",
    "sdpa_elementwise_sigmoid_mul", "value_elementwise_sigmoid_mul", "key_elementwise_sigmoid_mul",
    "query_elementwise_sigmoid_mul", "denseout_elementwise_sigmoid_mul",
    "sdpa_headwise_sigmoid_mul", "value_headwise_sigmoid_mul",
    "sdpa_elementwise_headshared_sigmoid_mul", "value_elementwise_headshared_sigmoid_mul",
    "sdpa_elementwise_silu_add", "sdpa_elementwise_silu_mul", "sdpa_perhead_rmsnorm",
    "sdpa_silu_noparam", "sdpa_elementwise_identity_add", "sdpa_input_independent_sigmoid_mul",
    "sdpa_elementwise_nssigmoid_mul", "switchhead_kv_8top8", "switchhead_kv_4top4",
    "switchhead_v_4top4", "switchhead_v_8top2", "baseline_sandwich_norm", "baseline_residual_clip",
    "sdpa_gate_added_in_continued_training",
]

# MoE-15A2B (spec 1.4): d_model 2048, 32 query heads, 4 KV heads, head_dim 128, 24 layers.
PAPER_MOE = dict(d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, layers=24)


def test_registry_has_every_spec_slug():
    assert len(SPEC_SLUGS) == 27 == len(set(SPEC_SLUGS))
    assert set(SPEC_SLUGS) <= set(VARIANTS)
    # Table 6 row 6, and the FFN-widened parameter-matched baselines (issue 24)
    assert set(VARIANTS) - set(SPEC_SLUGS) == {"switchhead_v_1top1", "baseline_ffn_g1params",
                                               "baseline_ffn_kv8params"}


@pytest.mark.parametrize("slug", list(VARIANTS))
def test_every_variant_gate_is_valid_and_cites_the_paper(slug):
    variant = get_variant(slug)
    if variant.gate is not None:
        variant.gate.validate()
    assert variant.paper and variant.description


def test_unknown_variant_names_the_registry():
    with pytest.raises(LabError, match="unknown variant 'nope'.*sdpa_elementwise_sigmoid_mul"):
        get_variant("nope")


def test_paper_delta_ppl_is_against_table_1_baseline():
    assert get_variant("sdpa_elementwise_sigmoid_mul").paper_delta_ppl == pytest.approx(-0.265)
    assert get_variant("value_headwise_sigmoid_mul").paper_delta_ppl == pytest.approx(-0.218)
    # Sandwich norm is dense-only: Table 2 row 7 against row 6 (the baseline at the same LR).
    assert get_variant("baseline_sandwich_norm").paper_delta_ppl == pytest.approx(7.407 - 9.195)
    assert get_variant("baseline_residual_clip").paper_delta_ppl is None
    assert (get_variant("sdpa_headwise_sigmoid_mul").paper_table,
            get_variant("sdpa_headwise_sigmoid_mul").paper_row) == ("Table 1", 10)


def test_display_names_are_the_registrys_short_names_else_the_slug():
    """The report's trend lines name variants by `short` (lab/reports/trends/definitions.py)."""
    assert display_name("sdpa_elementwise_sigmoid_mul") == "G1 elementwise"
    assert display_name("value_headwise_sigmoid_mul") == "G2 value headwise"
    assert display_name("switchhead_kv_8top8") == "switchhead_kv_8top8"  # none given
    assert display_name("custom_sdpa_headwise") == "custom_sdpa_headwise"  # not registered
    shorts = [v.short for v in VARIANTS.values() if v.short]
    assert len(shorts) == len(set(shorts)) == 17


# --- the axis spec -------------------------------------------------------------------------

def test_parse_gate_reads_any_point_of_the_space():
    spec = parse_gate("position=sdpa,granularity=headwise,form=additive,activation=silu")
    assert spec == GateSpec(granularity="headwise", form="additive", activation="silu")
    spec = parse_gate("position=value, sharing=head_shared, input_dependent=false, "
                      "shared_average=pre_activation")
    assert (spec.position, spec.sharing, spec.input_dependent, spec.shared_average) == \
        ("value", "head_shared", False, "pre_activation")


@pytest.mark.parametrize("text, message", [
    ("position=G7", "gate.position: 'G7' is not one of sdpa, value"),
    ("activation=tanh", "gate.activation: 'tanh' is not one of sigmoid, silu"),
    ("colour=red", "unknown gate axis 'colour'"),
    ("position", "expected key=value"),
    ("input_dependent=maybe", "gate.input_dependent: expected true or false"),
    ("position=dense_out,granularity=headwise", "headwise makes no sense at position dense_out"),
    ("position=dense_out,sharing=head_shared", "head_shared makes no sense at position dense_out"),
    ("granularity=headwise,sharing=head_shared", "head_shared with headwise"),
    ("qk_placement=somewhere", "gate.qk_placement"),
])
def test_parse_gate_rejects_bad_axes_with_the_field_name(text, message):
    with pytest.raises(LabError, match=message):
        parse_gate(text)


def test_custom_variant_slugs_differ_when_options_differ():
    plain = custom_variant(parse_gate("granularity=headwise"))
    biased = custom_variant(parse_gate("granularity=headwise,bias=true"))
    assert plain.slug == "custom_sdpa_headwise_head_specific_multiplicative_sigmoid"
    assert biased.slug != plain.slug and "bias-true" in biased.slug


# --- the score math ------------------------------------------------------------------------

def test_sigmoid_gate_with_large_logits_is_the_identity():
    y = torch.randn(2, 5, 4, 8)
    spec = GateSpec()
    scores = gate_scores(spec, torch.full((2, 5, 4, 8), 1e4))
    assert torch.equal(apply_gate(spec, y, scores), y)


def test_ns_sigmoid_scores_lie_in_half_to_one():
    logits = torch.cat([torch.randn(1000) * 30, torch.tensor([-1e4, 1e4, 0.0])]).view(-1, 1, 1)
    scores = gate_scores(GateSpec(activation="ns_sigmoid"), logits)
    assert scores.min() >= 0.5 and scores.max() <= 1.0
    assert scores.min() < 0.51 and scores.max() > 0.99  # the whole range is reached
    assert gate_scores(GateSpec(activation="ns_sigmoid"), torch.zeros(1, 1)).item() == 0.75


@pytest.mark.parametrize("average", ["post_activation", "pre_activation"])
def test_head_shared_scores_are_the_same_for_every_head(average):
    logits = torch.randn(2, 5, 4, 8) * 3
    spec = GateSpec(sharing="head_shared", shared_average=average)
    scores = gate_scores(spec, logits)
    assert scores.shape == (2, 5, 1, 8)
    gated = apply_gate(spec, torch.ones(2, 5, 4, 8), scores)
    assert torch.equal(gated, gated[:, :, :1].expand_as(gated))
    # Table 1 rows 12-13 average "gating scores": the default is after the activation.
    expected = (torch.sigmoid(logits).mean(dim=2, keepdim=True) if average == "post_activation"
                else torch.sigmoid(logits.mean(dim=2, keepdim=True)))
    torch.testing.assert_close(scores, expected)


def test_pre_and_post_activation_averages_differ():
    logits = torch.randn(3, 4, 8) * 3
    post = gate_scores(GateSpec(sharing="head_shared"), logits)
    pre = gate_scores(GateSpec(sharing="head_shared", shared_average="pre_activation"), logits)
    assert not torch.allclose(post, pre)


@pytest.mark.parametrize("activation, function", [
    ("sigmoid", torch.sigmoid), ("silu", torch.nn.functional.silu), ("identity", lambda x: x)])
def test_additive_form_adds_the_activated_logits(activation, function):
    y, logits = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    spec = GateSpec(form="additive", activation=activation)
    torch.testing.assert_close(apply_gate(spec, y, gate_scores(spec, logits)), y + function(logits))


def test_headwise_scores_broadcast_one_scalar_per_head():
    spec = GateSpec(granularity="headwise")
    heads, width = gated_heads_and_width(spec, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32)
    assert gate_logit_width(spec, heads, width) == 4
    logits = torch.randn(2, 3, 4, 1)
    gated = apply_gate(spec, torch.ones(2, 3, 4, 8), gate_scores(spec, logits))
    torch.testing.assert_close(gated, torch.sigmoid(logits).expand(2, 3, 4, 8))


# --- parameter formulas against the paper (spec 1.4, Table 1 "Added Param") ------------------

@pytest.mark.parametrize("gate, paper_millions", [
    (GateSpec(), 201),                                             # T1-5 SDPA elementwise
    (GateSpec(granularity="headwise"), 1.6),                       # T1-10 SDPA headwise
    (GateSpec(position="value"), 25),                              # T1-6 v elementwise
    (GateSpec(position="value", granularity="headwise"), 0.2),     # T1-11 v headwise
    (GateSpec(position="key"), 25),                                # T1-7
    (GateSpec(position="query"), 201),                             # T1-8
    (GateSpec(position="dense_out"), 100),                         # T1-9
    (GateSpec(sharing="head_shared"), 201),                        # T1-12 (full projection kept)
    (GateSpec(position="value", sharing="head_shared"), 25),       # T1-13
    (GateSpec(form="additive", activation="silu"), 201),           # T1-14
])
def test_gate_parameters_match_table_1_at_paper_sizes(gate, paper_millions):
    p = PAPER_MOE
    heads, width = gated_heads_and_width(gate, p["n_heads"], p["n_kv_heads"], p["head_dim"],
                                         p["d_model"])
    added = p["layers"] * gate_param_count(gate, heads, width, p["d_model"])
    # The paper prints whole millions (100.7M as 100), or one decimal below 10M.
    assert added / 1e6 == pytest.approx(paper_millions, abs=1.0 if paper_millions >= 10 else 0.05)


def test_gate_parameter_formulas_at_paper_sizes_exactly():
    d, q, k, dk = 2048, 32, 4, 128

    def per_layer(**axes):
        gate = GateSpec(**axes)
        heads, width = gated_heads_and_width(gate, q, k, dk, d)
        return gate_param_count(gate, heads, width, d)

    assert per_layer() == d * q * dk
    assert per_layer(granularity="headwise") == d * q
    assert per_layer(position="value") == per_layer(position="key") == d * k * dk
    assert per_layer(position="value", granularity="headwise") == d * k
    assert per_layer(position="query") == d * q * dk
    assert per_layer(position="dense_out") == d * d
    assert per_layer(input_dependent=False) == q * dk  # Table 4 row 6: b in R^{q x d_k}
    assert per_layer(bias=True) == d * q * dk + q * dk


# --- the budgets of Switch Head and the parameter-matched baselines (issue 24) -----------------

def test_paper_switch_fractions_are_table_6_over_the_replaced_projections():
    from lab.model.variants import paper_switch_fraction, projection_params

    p = PAPER_MOE
    kv = projection_params("kv", p["d_model"], p["n_kv_heads"], p["head_dim"], p["layers"])
    assert kv == 2 * 2048 * 4 * 128 * 24 == 2 * projection_params("v", 2048, 4, 128, 24)
    assert paper_switch_fraction("kv", 38) == pytest.approx(38e6 / 50_331_648, abs=1e-3)  # 0.755
    assert paper_switch_fraction("kv", 13) == pytest.approx(0.258, abs=1e-3)
    assert paper_switch_fraction("v", 13) == pytest.approx(0.517, abs=1e-3)
    assert paper_switch_fraction("v", 25) == pytest.approx(0.993, abs=1e-3)
    for slug, added in [("switchhead_kv_8top8", 38), ("switchhead_kv_4top4", 13),
                        ("switchhead_v_4top4", 13), ("switchhead_v_8top2", 25)]:
        variant = get_variant(slug)
        target = variant.model["switch_head"].split(":")[0]
        assert variant.paper_added_m == added
        assert variant.model["switch_head_added_fraction"] == paper_switch_fraction(target, added)
    # The value headwise gate's twin keeps full-rank experts: no budget fraction.
    assert "switch_head_added_fraction" not in get_variant("switchhead_v_1top1").model


def test_matched_baselines_name_the_paper_control_whose_budget_they_keep():
    matched = {slug: v.budget_of for slug, v in VARIANTS.items() if v.budget_of}
    assert matched == {"baseline_kv8": "baseline_kv8", "baseline_q48": "baseline_q48",
                       "baseline_add4experts": "baseline_add4experts",
                       "baseline_ffn_g1params": "baseline_q48",
                       "baseline_ffn_kv8params": "baseline_kv8"}
    # kv=8 adds 2 k d_k d per layer, 1/4 of G1's q d_k d at the paper's sizes (50M vs 201M).
    assert get_variant("baseline_ffn_kv8params").model["ffn_widen_g1_fraction"] == 0.25
    assert get_variant("baseline_ffn_g1params").model["ffn_widen_g1_fraction"] == 1.0
    assert get_variant("baseline_ffn_g1params").paper_row is None  # Table 2's method, no row
