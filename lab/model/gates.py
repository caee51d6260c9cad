"""The gate math of the paper, and every variant it tests, as data.

A gate is a point in five axes (docs/paper.md §3): position (G1-G5), granularity,
head sharing, form and activation, plus whether it depends on the input at all.
`GateSpec` holds that point; `gate_logit_width`, `gate_scores` and `apply_gate`
are the whole of the math. The attention module (lab/model/decoder.py) computes the gate
logits from the pre-norm hidden state X in the same matmul as Q, K and V
(the reference code fuses the G1 gate into q_proj; docs/paper.md §6) and calls
these functions at the position docs/paper.md §3.2 names.

Each of the paper's variants is one `Variant` entry in `VARIANTS` (docs/paper.md §5):
a gate spec, or a few architecture changes for the paper's controls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lab.errors import LabError, check_choice

POSITIONS = ("sdpa", "value", "key", "query", "dense_out")  # G1, G2, G3, G4, G5
PAPER_POSITION_NAMES = {"sdpa": "G1", "value": "G2", "key": "G3", "query": "G4", "dense_out": "G5"}
GRANULARITIES = ("elementwise", "headwise")
SHARINGS = ("head_specific", "head_shared")
FORMS = ("multiplicative", "additive")
SHARED_AVERAGES = ("post_activation", "pre_activation")
QK_PLACEMENTS = ("after_projection", "after_norm_rope")
GATE_INITS = ("normal", "zeros")


def _ns_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # Table 4 row 7: scores in [0.5, 1] keep the non-linearity and remove sparsity.
    return 0.5 + 0.5 * torch.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "identity": lambda x: x,
    "ns_sigmoid": _ns_sigmoid,
}


@dataclass(frozen=True)
class GateSpec:
    """One point of the paper's gate space.

    Defaults are the paper's default gate (Eq. 5): head-specific, multiplicative,
    sigmoid, on the SDPA output, computed from the pre-norm hidden state.
    Choices the paper leaves open (docs/paper.md §11, docs/paper.md §3.7) are fields with documented defaults:
    - bias: False, as the reference code (bias only with qkv_bias, which its configs leave off).
    - init: "normal", the reference init (normal(0, init_std), so scores start near sigmoid(0)=0.5).
    - shared_average: "post_activation": the paper averages "gating scores", i.e. after the activation.
    - qk_placement: "after_projection": the paper says "after the Q, K, V projections (Eq. 1)",
      so G3/G4 act before QK-norm and RoPE; "after_norm_rope" is the alternative. Note that
      QK-norm (an RMSNorm per head) undoes any per-head scale, so a *headwise* multiplicative
      G3/G4 gate before it changes nothing; elementwise gates keep their effect either way.
    - init: "normal" or "zeros" (gate logit weights start at 0, scores at activation(0)).
    The input-independent gate (`input_dependent=False`) is a learnable tensor b of the
    score shape, always zero-initialised (Table 4 row 6); `bias` and `init` do not apply to it.
    It is not weight-decayed unless `train.gate_constant_decay` says so (docs/paper-notes.md).
    """

    position: str = "sdpa"
    granularity: str = "elementwise"
    sharing: str = "head_specific"
    form: str = "multiplicative"
    activation: str = "sigmoid"
    input_dependent: bool = True
    bias: bool = False
    init: str = "normal"
    shared_average: str = "post_activation"
    qk_placement: str = "after_projection"

    def validate(self) -> None:
        check_choice("gate.position", self.position, POSITIONS)
        check_choice("gate.granularity", self.granularity, GRANULARITIES)
        check_choice("gate.sharing", self.sharing, SHARINGS)
        check_choice("gate.form", self.form, FORMS)
        check_choice("gate.activation", self.activation, tuple(ACTIVATIONS))
        check_choice("gate.init", self.init, GATE_INITS)
        check_choice("gate.shared_average", self.shared_average, SHARED_AVERAGES)
        check_choice("gate.qk_placement", self.qk_placement, QK_PLACEMENTS)
        if self.position == "dense_out" and self.granularity == "headwise":
            raise LabError("gate.granularity: headwise makes no sense at position dense_out "
                           "(the W_o output has no heads); use elementwise")
        if self.position == "dense_out" and self.sharing == "head_shared":
            raise LabError("gate.sharing: head_shared makes no sense at position dense_out "
                           "(the W_o output has no heads); use head_specific")
        if self.sharing == "head_shared" and self.granularity == "headwise":
            raise LabError("gate.sharing: head_shared with headwise granularity is one scalar "
                           "for every head; use elementwise with head_shared")

    @property
    def paper_position(self) -> str:
        return PAPER_POSITION_NAMES[self.position]

    def axes(self) -> dict:
        return dataclasses.asdict(self)


def parse_gate(text: str, base: GateSpec | None = None) -> GateSpec:
    """`position=sdpa,granularity=headwise,...` -> GateSpec (unnamed points of the space)."""
    values = dataclasses.asdict(base or GateSpec())
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise LabError(f"--gate: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in values:
            raise LabError(f"--gate: unknown gate axis {key!r}; allowed: {', '.join(values)}")
        if isinstance(values[key], bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise LabError(f"gate.{key}: expected true or false, got {value!r}")
            value = value.lower() in ("true", "1")
        values[key] = value
    spec = GateSpec(**values)
    spec.validate()
    return spec


# --- shapes -------------------------------------------------------------------

def gated_heads_and_width(spec: GateSpec, n_heads: int, n_kv_heads: int, head_dim: int,
                          d_model: int) -> tuple[int, int]:
    """(heads, width) of the tensor the gate modulates, viewed as (..., heads, width)."""
    if spec.position in ("sdpa", "query"):
        return n_heads, head_dim
    if spec.position in ("value", "key"):
        return n_kv_heads, head_dim
    return 1, d_model  # dense_out: the W_o output, one "head" of width d_model


def gate_score_shape(spec: GateSpec, heads: int, width: int) -> tuple[int, int]:
    """(heads, width) of the scores before broadcasting (Table 1's score shape per token)."""
    return heads, (width if spec.granularity == "elementwise" else 1)


def gate_logit_width(spec: GateSpec, heads: int, width: int) -> int:
    """Columns the gate adds to the fused input projection (0 for the input-independent gate).

    Head-shared keeps the full head-specific projection and averages afterwards, as the
    paper's parameter counts show (201M / 25M, the same as head-specific; docs/paper.md §3.4).
    """
    if not spec.input_dependent:
        return 0
    score_heads, score_width = gate_score_shape(spec, heads, width)
    return score_heads * score_width


def gate_param_count(spec: GateSpec, heads: int, width: int, d_model: int) -> int:
    """Parameters one layer's gate adds (docs/paper.md §4.2)."""
    score_heads, score_width = gate_score_shape(spec, heads, width)
    if not spec.input_dependent:
        return score_heads * score_width  # the learnable tensor b
    logits = score_heads * score_width
    return logits * d_model + (logits if spec.bias else 0)


# --- the math -----------------------------------------------------------------

def gate_scores(spec: GateSpec, logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., heads, w) -> scores (..., heads or 1, w), activation and head sharing applied."""
    activation = ACTIVATIONS[spec.activation]
    if spec.sharing == "head_shared":
        # Table 1 rows 12-13: average over the head dimension, one score per token and element.
        if spec.shared_average == "pre_activation":
            return activation(logits.mean(dim=-2, keepdim=True))
        return activation(logits).mean(dim=-2, keepdim=True)
    return activation(logits)


def apply_gate(spec: GateSpec, y: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Y' = Y * s (multiplicative, Eq. 5) or Y' = Y + s (additive); s broadcasts over heads/width."""
    if spec.form == "additive":
        return y + scores
    return y * scores


# --- the variant registry -------------------------------------------------------

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

    `model` holds ModelConfig field overrides (lab/config.py); `q_heads_factor` and
    `kv_heads_factor` scale the preset's head counts for the parameter-matched baselines.
    `paper` cites table and row; the paper_* numbers are the MoE-15A2B values (Tables 1, 3, 4, 6)
    where it reports them, for the report to set beside ours. `paper_baseline_ppl` is the
    row the paper's delta is taken against: the MoE baseline (T1-1), except for the dense-only
    sandwich norm, which Table 2 sets beside the baseline at the same LR (T2-6).
    `paper_added_m` is the paper's "Added Param" in millions (Tables 1 and 6). `budget_of`
    marks a parameter-matched baseline: the slug of the paper's control whose added
    parameters (as a multiple of the G1 gates') it matches, itself for the paper's own.
    `needs` is the FFN kind a variant is defined on ("moe" or "dense"), None for either.
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
    projections (lab/config.py `switch_expert_rank`; docs/paper-notes.md)."""
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
    Variant("baseline", paper="T1-1", paper_ppl=6.026, paper_dense_ppl=7.421, paper_added_m=0,
            paper_first_token_attn=0.467, paper_max_activation=1053,
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
    Variant("sdpa_elementwise_sigmoid_mul", _G(), paper="T1-5", paper_ppl=5.761,
            paper_dense_ppl=7.288, paper_added_m=201, paper_gate_mean=0.116,
            paper_first_token_attn=0.048, paper_max_activation=94,
            description="G1: Y' = Y * sigmoid(X W), one score per head and element"),
    Variant("value_elementwise_sigmoid_mul", _G(position="value"), paper="T1-6", paper_ppl=5.820,
            paper_added_m=25, paper_gate_mean=0.221, paper_first_token_attn=0.297,
            paper_max_activation=125, description="G2: gate on V after its projection"),
    Variant("key_elementwise_sigmoid_mul", _G(position="key"), paper="T1-7", paper_ppl=6.016,
            paper_added_m=25, description="G3: gate on K after its projection"),
    Variant("query_elementwise_sigmoid_mul", _G(position="query"), paper="T1-8", paper_ppl=5.981,
            paper_added_m=201, description="G4: gate on Q after its projection"),
    Variant("denseout_elementwise_sigmoid_mul", _G(position="dense_out"), paper="T1-9",
            paper_ppl=6.017, paper_added_m=100,
            description="G5: gate on the W_o output, before the residual add"),
    Variant("sdpa_headwise_sigmoid_mul", _G(granularity="headwise"), paper="T1-10",
            paper_ppl=5.792, paper_dense_ppl=7.370, paper_added_m=1.6, paper_gate_mean=0.172,
            paper_first_token_attn=0.073, paper_max_activation=98,
            description="G1: one scalar per query head"),
    Variant("value_headwise_sigmoid_mul", _G(position="value", granularity="headwise"),
            paper="T1-11", paper_ppl=5.808, paper_added_m=0.2,
            description="G2: one scalar per KV head"),
    Variant("sdpa_elementwise_headshared_sigmoid_mul", _G(sharing="head_shared"), paper="T1-12",
            paper_ppl=5.801, paper_added_m=201, paper_gate_mean=0.271,
            paper_first_token_attn=0.301, paper_max_activation=286,
            description="G1: scores averaged over heads"),
    Variant("value_elementwise_headshared_sigmoid_mul", _G(position="value", sharing="head_shared"),
            paper="T1-13", paper_ppl=5.867, paper_added_m=25,
            description="G2: scores averaged over KV heads"),
    Variant("sdpa_elementwise_silu_add", _G(form="additive", activation="silu"), paper="T1-14",
            paper_ppl=5.821, paper_added_m=201, description="G1 additive: Y' = Y + SiLU(X W)"),
    Variant("sdpa_elementwise_silu_mul", _G(activation="silu"), paper="T1-15", paper_ppl=5.822,
            paper_added_m=201, description="G1: Y' = Y * SiLU(X W)"),
    Variant("sdpa_perhead_rmsnorm", model={"sdpa_transform": "rmsnorm"}, paper="T3-5",
            paper_ppl=5.847, description="control: RMSNorm on each head's SDPA output"),
    Variant("sdpa_silu_noparam", model={"sdpa_transform": "silu"}, paper="T3-6", paper_ppl=5.975,
            description="control: Y' = SiLU(Y) at G1, no parameters"),
    Variant("sdpa_elementwise_identity_add", _G(form="additive", activation="identity"),
            paper="T3-7", paper_ppl=5.882, description="control: Y' = Y + X W at G1"),
    Variant("sdpa_input_independent_sigmoid_mul", _G(input_dependent=False), paper="T4-6",
            paper_ppl=5.917, paper_gate_mean=0.335, paper_first_token_attn=0.364,
            paper_max_activation=471,
            description="G1: Y' = Y * sigmoid(b), b zero-initialised and not weight-decayed "
                        "(decay would pull the gate to 0.5; train.gate_constant_decay)"),
    Variant("sdpa_elementwise_nssigmoid_mul", _G(activation="ns_sigmoid"), paper="T4-7",
            paper_ppl=5.900, paper_gate_mean=0.653, paper_first_token_attn=0.451,
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
