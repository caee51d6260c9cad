"""The paper's variants as data: one `Variant` entry per row the paper measured (docs/paper.md §5).

A variant is a gate spec (a point of the gate space, lab/model/gates.py) or a few
architecture changes (the paper's controls), with the paper's numbers for the report to set
beside ours, its short display name, and the arithmetic of its parameter budget against the
paper's (Switch Head experts over the projections they replace, the parameter-matched
baselines over the G1 gates; docs/paper-notes.md). Adding a variant that is a point of the
gate space is one `Variant(...)` line in `_VARIANT_LIST`: `gatelab variants`, `gatelab
train --variant`, grids, export and the report look it up here.

No torch here: config validation and `gatelab variants` read the registry before any model
exists (benchmarks/README.md, start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.errors import LabError
from lab.model.config import ModelConfig, parse_switch_head, switch_expert_rank
from lab.model.gates import GateSpec

PAPER_BASELINE_PPL = 6.026  # Table 1 row 1, MoE-15A2B
# The dense reference for dense presets (docs/paper.md §9.2): Table 2's 48-layer, 400B-token
# group at LR 4e-3 (rows 5, 8, 9), the only group of that table where both G1 gates and the
# baseline train at the same LR. The 28-layer pairs give G1 elementwise -0.095 (400B) and
# -0.050 (3.5T), the 48-layer 1T pair -0.262 (docs/paper.md §10, trend 10).
PAPER_DENSE_BASELINE_PPL = 7.421
PAPER_DENSE_TABLE = "Table 2 rows 5, 8, 9 (dense 1.7B, 48 layers, 400B tokens, LR 4e-3)"
# MoE-15A2B's attention (docs/paper.md §4.1, Table 7): what the paper's "Added Param" is counted on.
PAPER_MOE = {"d_model": 2048, "n_heads": 32, "n_kv_heads": 4, "head_dim": 128, "n_layers": 24}


def projection_params(target: str, d_model: int, n_kv_heads: int, head_dim: int,
                      n_layers: int) -> int:
    """Parameters of the projections Switch Head experts replace: K and V ("kv") or V ("v")."""
    one = n_layers * d_model * n_kv_heads * head_dim
    return one * (2 if target == "kv" else 1)


def paper_switch_fraction(target: str, paper_added_m: float) -> float:
    """Table 6's added parameters over the MoE's replaced projections (K+V 50.3M, V 25.2M):
    kv 8top8 38/50.3 = 0.755, kv 4top4 13/50.3 = 0.258, v 4top4 13/25.2 = 0.517,
    v 8top2 25/25.2 = 0.993."""
    p = PAPER_MOE
    replaced = projection_params(target, p["d_model"], p["n_kv_heads"], p["head_dim"], p["n_layers"])
    return round(paper_added_m * 1e6 / replaced, 3)


@dataclass(frozen=True)
class Variant:
    """A named point the paper measured: a gate, or architecture changes (its controls).

    `model` holds ModelConfig field overrides (lab/model/config.py); `q_heads_factor` and
    `kv_heads_factor` scale the preset's head counts for the parameter-matched baselines.
    `paper` cites table and row; the paper_* numbers are the MoE-15A2B values (Tables 1, 3, 4, 6)
    where it reports them, for the report to set beside ours. `paper_baseline_ppl` is the
    row the paper's delta is taken against: the MoE baseline (T1-1), except for the dense-only
    sandwich norm, which Table 2 sets beside the baseline at the same LR (T2-6).
    `paper_added_m` is the paper's "Added Param" in millions (Tables 1 and 6). `budget_of`
    marks a parameter-matched baseline: the slug of the paper's control whose added
    parameters (as a multiple of the G1 gates') it matches, itself for the paper's own.
    `needs` is the FFN kind a variant is defined on ("moe" or "dense"), None for either.
    `short` is its name in the report's trend lines ("G1 elementwise"), where it has one.
    """

    slug: str
    gate: GateSpec | None = None
    model: dict = field(default_factory=dict)
    q_heads_factor: float = 1.0
    kv_heads_factor: float = 1.0
    paper: str = ""
    paper_ppl: float | None = None
    paper_baseline_ppl: float = PAPER_BASELINE_PPL
    paper_dense_ppl: float | None = None  # Table 2 (PAPER_DENSE_TABLE), where it has the variant
    paper_gate_mean: float | None = None
    paper_first_token_attn: float | None = None
    paper_max_activation: float | None = None
    paper_added_m: float | None = None
    budget_of: str | None = None
    needs: str | None = None
    description: str = ""
    short: str = ""

    @property
    def paper_delta_ppl(self) -> float | None:
        return None if self.paper_ppl is None else round(self.paper_ppl - self.paper_baseline_ppl, 3)

    @property
    def paper_dense_delta_ppl(self) -> float | None:
        """Against Table 2's dense baseline of the same row group (PAPER_DENSE_TABLE)."""
        return None if self.paper_dense_ppl is None else \
            round(self.paper_dense_ppl - PAPER_DENSE_BASELINE_PPL, 3)

    @property
    def paper_table(self) -> str:
        """'T1-5' -> 'Table 1'; appendix references ('App. A.6') as they are."""
        return f"Table {self.paper[1:].split('-')[0]}" if self.paper.startswith("T") else self.paper

    @property
    def paper_row(self) -> int | None:
        """'T1-5' -> 5; a whole table ('T2') or an appendix has none."""
        whole_row = self.paper.startswith("T") and "-" in self.paper
        return int(self.paper.split("-")[1]) if whole_row else None


_G = GateSpec  # short alias: the table below reads as one line per variant
_SWITCH = "switch_head"
_WIDEN = "ffn_widen_g1_fraction"


def _switch_head(target: str, experts: int, top_k: int, paper_added_m: float) -> dict:
    """A Table 6 row: low-rank experts sized to add the paper's share of the replaced
    projections (lab/model/config.py `switch_expert_rank`; docs/paper-notes.md)."""
    fraction = paper_switch_fraction(target, paper_added_m)
    which, replaced = ("K and V", "K+V") if target == "kv" else ("V", "V")
    return {"model": {_SWITCH: f"{target}:{experts}:{top_k}",
                      "switch_head_added_fraction": fraction},
            "paper_added_m": paper_added_m,
            "description": f"sigmoid-routed {which} projection experts, {experts} experts, "
                           f"top-{top_k}, low-rank to add the paper's {fraction}x of {replaced}"}


# The paper's kv=8 control adds K and V for k more KV heads, 2 k d_k d per layer; G1
# elementwise adds q d_k d: 2k/q = 1/4 of G1 at the paper's sizes (T1-2: 50M vs 201M).
_KV8_OVER_G1 = 2 * PAPER_MOE["n_kv_heads"] / PAPER_MOE["n_heads"]

_VARIANT_LIST = [
    Variant("baseline", short="baseline", paper="T1-1", paper_ppl=6.026, paper_dense_ppl=7.421,
            paper_added_m=0, paper_first_token_attn=0.467, paper_max_activation=1053,
            description="GQA softmax attention, no gate"),
    Variant("baseline_kv8", kv_heads_factor=2.0, paper="T1-2", paper_ppl=5.979,
            paper_added_m=50, budget_of="baseline_kv8",
            description="parameter-matched: twice the KV heads (paper: k=4 -> 8, 1/4 of G1's "
                        "added parameters; with 2:1 GQA this is full multi-head attention and "
                        "adds as much as G1: baseline_ffn_kv8params keeps the paper's 1/4)"),
    Variant("baseline_q48", q_heads_factor=1.5, paper="T1-3", paper_ppl=5.953,
            paper_added_m=201, budget_of="baseline_q48",
            description="parameter-matched: 1.5x the query heads, Q and O grow (paper: q=32 -> 48, "
                        "as many added parameters as G1 elementwise, at every preset too)"),
    Variant("baseline_add4experts", model={"moe_extra_experts": 4}, paper="T1-4",
            paper_ppl=5.964, paper_added_m=400, budget_of="baseline_add4experts", needs="moe",
            description="parameter-matched: 4 more total and activated experts"),
    Variant("baseline_ffn_g1params", model={_WIDEN: 1.0}, paper="T2", budget_of="baseline_q48",
            needs="dense",
            description="parameter-matched: the FFN widened by G1 elementwise's added parameters "
                        "(the paper matches its dense models through the FFN width, Table 2; "
                        "q=48's budget, T1-3)"),
    Variant("baseline_ffn_kv8params", model={_WIDEN: _KV8_OVER_G1}, paper="T2",
            budget_of="baseline_kv8", needs="dense",
            description="parameter-matched: the FFN widened by 1/4 of G1 elementwise's added "
                        "parameters, the paper's kv=8 budget (T1-2), which no KV head count "
                        "reaches with 2:1 GQA"),
    Variant("sdpa_elementwise_sigmoid_mul", _G(), short="G1 elementwise", paper="T1-5",
            paper_ppl=5.761, paper_dense_ppl=7.288, paper_added_m=201, paper_gate_mean=0.116,
            paper_first_token_attn=0.048, paper_max_activation=94,
            description="G1: Y' = Y * sigmoid(X W), one score per head and element"),
    Variant("value_elementwise_sigmoid_mul", _G(position="value"), short="G2 value", paper="T1-6",
            paper_ppl=5.820, paper_added_m=25, paper_gate_mean=0.221, paper_first_token_attn=0.297,
            paper_max_activation=125, description="G2: gate on V after its projection"),
    Variant("key_elementwise_sigmoid_mul", _G(position="key"), short="G3 key", paper="T1-7",
            paper_ppl=6.016, paper_added_m=25, description="G3: gate on K after its projection"),
    Variant("query_elementwise_sigmoid_mul", _G(position="query"), short="G4 query", paper="T1-8",
            paper_ppl=5.981, paper_added_m=201, description="G4: gate on Q after its projection"),
    Variant("denseout_elementwise_sigmoid_mul", _G(position="dense_out"), short="G5 dense-out",
            paper="T1-9", paper_ppl=6.017, paper_added_m=100,
            description="G5: gate on the W_o output, before the residual add"),
    Variant("sdpa_headwise_sigmoid_mul", _G(granularity="headwise"), short="G1 headwise",
            paper="T1-10", paper_ppl=5.792, paper_dense_ppl=7.370, paper_added_m=1.6,
            paper_gate_mean=0.172, paper_first_token_attn=0.073, paper_max_activation=98,
            description="G1: one scalar per query head"),
    Variant("value_headwise_sigmoid_mul", _G(position="value", granularity="headwise"),
            short="G2 value headwise", paper="T1-11", paper_ppl=5.808, paper_added_m=0.2,
            description="G2: one scalar per KV head"),
    Variant("sdpa_elementwise_headshared_sigmoid_mul", _G(sharing="head_shared"),
            short="G1 head-shared", paper="T1-12", paper_ppl=5.801, paper_added_m=201,
            paper_gate_mean=0.271, paper_first_token_attn=0.301, paper_max_activation=286,
            description="G1: scores averaged over heads"),
    Variant("value_elementwise_headshared_sigmoid_mul", _G(position="value", sharing="head_shared"),
            short="G2 value head-shared", paper="T1-13", paper_ppl=5.867, paper_added_m=25,
            description="G2: scores averaged over KV heads"),
    Variant("sdpa_elementwise_silu_add", _G(form="additive", activation="silu"),
            short="SiLU additive", paper="T1-14", paper_ppl=5.821, paper_added_m=201,
            description="G1 additive: Y' = Y + SiLU(X W)"),
    Variant("sdpa_elementwise_silu_mul", _G(activation="silu"), short="SiLU multiplicative",
            paper="T1-15", paper_ppl=5.822, paper_added_m=201,
            description="G1: Y' = Y * SiLU(X W)"),
    Variant("sdpa_perhead_rmsnorm", model={"sdpa_transform": "rmsnorm"}, short="per-head RMSNorm",
            paper="T3-5", paper_ppl=5.847,
            description="control: RMSNorm on each head's SDPA output"),
    Variant("sdpa_silu_noparam", model={"sdpa_transform": "silu"}, short="parameter-free SiLU",
            paper="T3-6", paper_ppl=5.975, description="control: Y' = SiLU(Y) at G1, no parameters"),
    Variant("sdpa_elementwise_identity_add", _G(form="additive", activation="identity"),
            short="identity additive", paper="T3-7", paper_ppl=5.882,
            description="control: Y' = Y + X W at G1"),
    Variant("sdpa_input_independent_sigmoid_mul", _G(input_dependent=False),
            short="input-independent", paper="T4-6", paper_ppl=5.917, paper_gate_mean=0.335,
            paper_first_token_attn=0.364, paper_max_activation=471,
            description="G1: Y' = Y * sigmoid(b), b zero-initialised and not weight-decayed "
                        "(decay would pull the gate to 0.5; train.gate_constant_decay)"),
    Variant("sdpa_elementwise_nssigmoid_mul", _G(activation="ns_sigmoid"), short="NS-sigmoid",
            paper="T4-7", paper_ppl=5.900, paper_gate_mean=0.653, paper_first_token_attn=0.451,
            paper_max_activation=892, description="G1: Y' = Y * (0.5 + 0.5 sigmoid(X W))"),
    Variant("switchhead_kv_8top8", **_switch_head("kv", 8, 8, 38), paper="T6-2", paper_ppl=5.847),
    Variant("switchhead_kv_4top4", **_switch_head("kv", 4, 4, 13), paper="T6-3", paper_ppl=5.935),
    Variant("switchhead_v_4top4", **_switch_head("v", 4, 4, 13), paper="T6-4", paper_ppl=5.820),
    Variant("switchhead_v_8top2", **_switch_head("v", 8, 2, 25), paper="T6-5", paper_ppl=5.870),
    Variant("switchhead_v_1top1", model={_SWITCH: "v:1:1"}, paper="T6-6", paper_ppl=5.808,
            paper_added_m=3,
            description="one full-rank V expert, top-1: the same function as "
                        "value_headwise_sigmoid_mul (adds its router only, not Table 6's "
                        "unexplained 3M)"),
    Variant("baseline_sandwich_norm", model={"sandwich_norm": True}, paper="T2-7",
            paper_ppl=7.407, paper_baseline_ppl=9.195,
            description="control: RMSNorm on attention and FFN outputs before the residual add"),
    Variant("baseline_residual_clip", model={"residual_clip": 100.0}, paper="App. A.6",
            description="control: clamp attention and FFN outputs to +-100 before the residual add"),
    Variant("sdpa_gate_added_in_continued_training", _G(),
            model={"gate_insert_fraction": 0.5}, paper="App. A.7",
            description="G1 elementwise gate inserted halfway through training (baseline before)"),
]

VARIANTS: dict[str, Variant] = {v.slug: v for v in _VARIANT_LIST}


def get_variant(slug: str) -> Variant:
    if slug not in VARIANTS:
        raise LabError(f"variant: unknown variant {slug!r}; see `gatelab variants` "
                       f"(allowed: {', '.join(VARIANTS)})")
    return VARIANTS[slug]


def custom_variant(gate: GateSpec) -> Variant:
    """An unnamed point of the gate space, asked for by axes (`--gate ...`).

    The slug names the five axes, then every option that differs from its default, so two
    different gates never share a name (`custom_sdpa_headwise_head_specific_additive_silu_bias-true`).
    """
    a = gate
    slug = f"custom_{a.position}_{a.granularity}_{a.sharing}_{a.form}_{a.activation}"
    defaults = GateSpec()
    axes = ("position", "granularity", "sharing", "form", "activation")
    for name, value in gate.axes().items():
        if name not in axes and value != getattr(defaults, name):
            slug += f"_{name.replace('_', '')}-{str(value).lower()}"
    return Variant(slug, gate, description="asked for by axes")


def display_name(slug: str) -> str:
    """A variant's short name for the report ("G1 elementwise"), else its slug."""
    variant = VARIANTS.get(slug)
    return variant.short if variant is not None and variant.short else slug


# --- budgets: our added parameters beside the paper's (docs/paper-notes.md) -----------------

# What the parameter-matched baselines are measured against (Table 1 rows 5 and 10).
G1_REFERENCES = {"g1_elementwise": "sdpa_elementwise_sigmoid_mul",
                 "g1_headwise": "sdpa_headwise_sigmoid_mul"}


def switch_budget(variant: Variant, model: ModelConfig, added: int) -> dict:
    """Added parameters over the projections the experts replace, ours and Table 6's."""
    target, _, _ = parse_switch_head(model.switch_head)
    replaced = projection_params(target, model.d_model, model.n_kv_heads, model.head_dim,
                                 model.n_layers)
    paper = paper_switch_fraction(target, variant.paper_added_m)
    return {"replaced": "K+V" if target == "kv" else "V", "replaced_params": replaced,
            "expert_rank": switch_expert_rank(model),
            "added_over_replaced": round(added / replaced, 4),
            "paper_added_over_replaced": paper, "ratio_to_paper": round(added / replaced / paper, 3)}


def matched_budget(variant: Variant, added: int, g1_added: dict[str, int]) -> dict:
    """Added parameters over the G1 gates' (`g1_added`, by G1_REFERENCES name), ours and the
    paper's (of the control it matches)."""
    paper_of = VARIANTS[variant.budget_of]
    budget = {"matches_paper": variant.budget_of}
    for name, slug in G1_REFERENCES.items():
        ours = added / g1_added[name]
        paper = paper_of.paper_added_m / VARIANTS[slug].paper_added_m
        budget.update({f"{name}_added": g1_added[name], f"added_over_{name}": round(ours, 4),
                       f"paper_added_over_{name}": round(paper, 4),
                       f"ratio_to_paper_{name}": round(ours / paper, 3)})
    budget["ratio_to_paper"] = budget["ratio_to_paper_g1_elementwise"]
    return budget


def budget(variant: Variant, model: ModelConfig, added: int,
           g1_added: dict[str, int] | None) -> dict | None:
    """A Switch Head variant's budget over the projections it replaces, a matched baseline's
    over the G1 gates, or None for every other variant."""
    if model.switch_head is not None and variant.paper_added_m is not None:
        return switch_budget(variant, model, added)
    if variant.budget_of is not None:
        return matched_budget(variant, added, g1_added)
    return None
