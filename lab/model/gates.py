"""The gate math of the paper: a gate as a point of the gate space, and how it applies.

A gate is a point in five axes (docs/paper.md §3): position (G1-G5), granularity,
head sharing, form and activation, plus whether it depends on the input at all.
`GateSpec` holds that point; `gate_logit_width`, `gate_scores` and `apply_gate`
are the whole of the math. The attention module (lab/model/decoder.py) computes the gate
logits from the pre-norm hidden state X in the same matmul as Q, K and V
(the reference code fuses the G1 gate into q_proj; docs/paper.md §6) and calls
these functions at the position docs/paper.md §3.2 names.

The paper's variants, each a named gate spec or a few architecture changes for its
controls, are the registry in lab/model/variants.py (docs/paper.md §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab.errors import LabError, check_choice

if TYPE_CHECKING:
    import torch

POSITIONS = ("sdpa", "value", "key", "query", "dense_out")  # G1, G2, G3, G4, G5
PAPER_POSITION_NAMES = {"sdpa": "G1", "value": "G2", "key": "G3", "query": "G4", "dense_out": "G5"}
GRANULARITIES = ("elementwise", "headwise")
SHARINGS = ("head_specific", "head_shared")
FORMS = ("multiplicative", "additive")
SHARED_AVERAGES = ("post_activation", "pre_activation")
QK_PLACEMENTS = ("after_projection", "after_norm_rope")
GATE_INITS = ("normal", "zeros")
ACTIVATIONS = ("sigmoid", "silu", "identity", "ns_sigmoid")  # computed by `activation`


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
        check_choice("gate.activation", self.activation, ACTIVATIONS)
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

def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The gate's activation (ACTIVATIONS) of x.

    torch is imported here, when a model computes its first gate scores, not with the
    module: config validation, the variant registry and `gatelab variants` read GateSpec
    before any model exists, and importing torch cost them 1.3-1.5 s of a 2 s start-up on
    the 2-core CPU machine (benchmarks/README.md, start-up). Once imported it is a lookup,
    and torch.compile traces through it (the import is no graph break)."""
    import torch
    import torch.nn.functional as F

    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "silu":
        return F.silu(x)
    if name == "ns_sigmoid":
        # Table 4 row 7: scores in [0.5, 1] keep the non-linearity and remove sparsity.
        return 0.5 + 0.5 * torch.sigmoid(x)
    return x  # identity


def gate_scores(spec: GateSpec, logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., heads, w) -> scores (..., heads or 1, w), activation and head sharing applied."""
    if spec.sharing == "head_shared":
        # Table 1 rows 12-13: average over the head dimension, one score per token and element.
        if spec.shared_average == "pre_activation":
            return activation(spec.activation, logits.mean(dim=-2, keepdim=True))
        return activation(spec.activation, logits).mean(dim=-2, keepdim=True)
    return activation(spec.activation, logits)


def apply_gate(spec: GateSpec, y: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Y' = Y * s (multiplicative, Eq. 5) or Y' = Y + s (additive); s broadcasts over heads/width."""
    if spec.form == "additive":
        return y + scores
    return y * scores
