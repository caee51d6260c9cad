"""Configuration: the resolved run config, overrides, validation (presets: lab/presets.py;
a cell's identity: lab/identity.py).

Data flows one way: a `RunConfig` is resolved once (preset + variant + overrides),
validated with a readable error, and then read by the model, the Lightning module,
the trainer and the tracker. Nothing downstream mutates it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lab.errors import (LabError, allows_none, check_choice, check_field_types, check_fraction,
                        check_int_range, check_nonnegative, check_nonnegative_int,
                        check_positive, check_positive_int)
from lab.identity import cell_hash
from lab.model.config import ModelConfig, check_vocab
from lab.model.flops import PEAK_BF16_TFLOPS, flops_per_token_lower_bound
from lab.model.gates import GateSpec
from lab.model.variants import Variant, get_variant
from lab.presets import PRESETS

# numpy's legacy seeding and Lightning's seed_everything accept seeds in [0, 2^32 - 1].
MAX_SEED = 2 ** 32 - 1
# A token budget whose training would take longer than this even at the fastest GPU's bf16
# peak (lab/model/flops.py) on every device of the run is a typo, not a plan (`--tokens 1e30`).
MAX_RUN_DAYS = 30


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. The paper states AdamW with "default" settings and no more (docs/paper.md §7.1);
    betas 0.9/0.95, weight decay 0.1 on matrices only and clipping at 1.0 are the common
    LLM choices we adopt. Schedule: linear warmup, cosine decay to min_lr_ratio of the peak
    (the MoE recipe: warmup then cosine; docs/paper.md §7.2). `gate_constant_decay`: whether the
    input-independent gate's tensor b (Table 4 row 6) is decayed too; off, because decay pulls
    b to 0 and the gate to 0.5, a pull that control's gate-mean and sink measurements would
    carry (docs/paper-notes.md)."""

    tokens: float = 2e5
    batch_size: int = 16               # sequences per optimizer step (all devices)
    micro_batch_size: int = 0          # sequences per forward pass; 0 = batch_size
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    gate_constant_decay: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"            # auto: bf16-mixed on GPU, 32-true on CPU
    # torch.compile the model: "auto" compiles where CUDA is present (the GPU's speed needs
    # it: an eager `small` cell ran at 0.3 of a compiled loop) and not on the CPU, where
    # compiling costs more than short runs gain; true or false forces it.
    compile: bool | str = "auto"
    # torch.compile mode when `compile` is on: "reduce-overhead" adds CUDA graphs (launch-bound
    # small models), "max-autotune" searches matmul kernels; speed only, same model.
    compile_mode: str = "default"
    # The LM loss's kernel (lab/model/loss.py): "none", PyTorch's cross-entropy on float32
    # logits; "liger", Liger Kernel's fused linear cross-entropy (CUDA, the `fused` extra),
    # which never holds the whole logits. Speed and memory; same loss to rounding.
    fused_loss: str = "none"
    val_every: int = 50                # steps between validations
    val_batches: int = 8               # batches of the fixed validation set
    log_every: int = 5                 # steps between logged training metrics
    devices: int = 1                   # GPUs for one run (DDP when > 1)
    deterministic: bool = False
    # Divergence: non-finite loss, or loss above ceiling for patience logged steps.
    divergence_loss_ceiling: float = 20.0
    divergence_patience: int = 3
    # Loss-spike detector (lab/training/callbacks.py).
    spike_window: int = 50
    spike_k: float = 6.0
    spike_floor: float = 0.1
    spike_merge: int = 20
    checkpoint_every: int = 0          # steps between resumable checkpoints; 0 = at validations
    # With checkpoint_every 0, at most one such checkpoint per this many seconds (0: at every
    # validation): a `small`
    # checkpoint (weights and AdamW state, ~200 MB) at each validation cost several percent
    # of the run; a crash now loses at most this much training.
    checkpoint_min_interval_s: float = 300.0
    # End-of-run analyses (lab/analysis/metrics.py): attention sink, massive activations, gate
    # statistics on this many held-out windows of `context` tokens (0 = no analysis) ...
    analysis_windows: int = 8
    analysis_every: int = 0            # ... also every N steps as a time series (0 = end only)
    long_context_factors: str = "1,2,4,8"  # validation ppl at these multiples of context ("" = off)
    # The sink as small-scale studies measure it (Gu et al., ICLR 2025, "When attention sink
    # emerges"): the share of heads whose mean attention on position 0 exceeds this threshold,
    # on windows of the first `sink_short_window` tokens as well as on whole windows.
    sink_head_threshold: float = 0.3
    sink_short_window: int = 64

    def __post_init__(self):
        # `--set train.compile=true` arrives as text (the default, "auto", is a string).
        text = str(self.compile).lower()
        if text in ("true", "false"):
            object.__setattr__(self, "compile", text == "true")

    def validate(self) -> None:
        if self.compile not in (True, False, "auto"):
            raise LabError(f"train.compile: {self.compile!r} is not one of auto, true, false")
        check_field_types("train", self)
        check_positive("train.tokens", self.tokens)
        check_positive("train.lr", self.lr)
        check_positive_int("train.batch_size", self.batch_size)
        check_positive_int("train.devices", self.devices)
        if self.micro_batch_size < 0 or (self.micro_batch_size and
                                         self.batch_size % (self.micro_batch_size * self.devices)):
            raise LabError(f"train.micro_batch_size: batch_size {self.batch_size} must be a multiple "
                           f"of micro_batch_size x devices ({self.micro_batch_size} x {self.devices})")
        check_fraction("train.min_lr_ratio", self.min_lr_ratio, closed_high=True)
        check_fraction("train.warmup_fraction", self.warmup_fraction)
        # torch.optim.AdamW's own bounds, checked here so that they fail before the run exists.
        check_nonnegative("train.weight_decay", self.weight_decay)
        check_fraction("train.beta1", self.beta1)
        check_fraction("train.beta2", self.beta2)
        check_positive("train.eps", self.eps)
        check_positive("train.grad_clip", self.grad_clip)
        check_nonnegative_int("train.seed", self.seed)
        check_int_range("train.seed", self.seed, 0, MAX_SEED, "the seeds numpy and Lightning accept")
        if not isinstance(self.gate_constant_decay, bool):
            raise LabError("train.gate_constant_decay: expected true or false, got "
                           f"{self.gate_constant_decay!r}")
        check_choice("train.precision", self.precision, ("auto", "32-true", "bf16-mixed", "16-mixed"))
        check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("train.fused_loss", self.fused_loss, LOSS_KERNELS)
        for name in ("val_every", "val_batches", "log_every", "divergence_patience",
                     "spike_window"):
            check_positive_int(f"train.{name}", getattr(self, name))
        check_positive("train.divergence_loss_ceiling", self.divergence_loss_ceiling)
        check_nonnegative("train.spike_k", self.spike_k)
        check_nonnegative("train.spike_floor", self.spike_floor)
        check_fraction("train.sink_head_threshold", self.sink_head_threshold)
        check_int_range("train.sink_short_window", self.sink_short_window, 2, 1 << 20,
                        "(tokens of the short sink windows)")
        for name in ("spike_merge", "checkpoint_every", "analysis_windows", "analysis_every"):
            check_nonnegative_int(f"train.{name}", getattr(self, name))
        if not isinstance(self.checkpoint_min_interval_s, (int, float)) or \
                not 0 <= self.checkpoint_min_interval_s < float("inf"):
            raise LabError("train.checkpoint_min_interval_s: must be a finite number >= 0, got "
                           f"{self.checkpoint_min_interval_s!r}")
        self.context_factors()

    def context_factors(self) -> list[int]:
        """`long_context_factors` parsed: '1,2,4' -> [1, 2, 4] (LabError on anything else)."""
        text = str(self.long_context_factors or "").strip()
        if not text:
            return []
        try:
            factors = [int(part) for part in text.split(",")]
        except ValueError:
            factors = []
        if not factors or any(f < 1 for f in factors):
            raise LabError("train.long_context_factors: expected comma-separated positive integers "
                           f"(multiples of the context, e.g. 1,2,4,8) or empty, got {text!r}")
        return sorted(set(factors))

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size // self.devices

    def compile_on(self, cuda: bool) -> bool:
        """Whether this run compiles the model: `auto` compiles on GPU only."""
        return cuda if self.compile == "auto" else bool(self.compile)

    def precision_on(self, cuda: bool) -> str:
        """The Lightning precision this run trains in: `auto` is bf16-mixed on GPU, 32-true
        on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16-mixed" if cuda else "32-true"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# train.fused_loss: the LM loss's kernels, each computed by lab/model/loss.py (named here, not
# imported from there: that module imports torch, and validating a config does not need it).
LOSS_KERNELS = ("none", "liger")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: `synthetic`, a prepared token directory, or text files (lab/data/sources.py)."""

    source: str = "synthetic"
    vocab_size: int = 16384            # BPE vocabulary for text sources
    bos_aligned: bool = False          # start every training window at a document boundary
    bos_prefix: bool = False           # random windows with BOS at position 0 (long documents)
    valid: str | None = None           # explicit valid/test files for text sources
    test: str | None = None

    def validate(self) -> None:
        check_field_types("data", self)
        if not self.source.strip():
            raise LabError("data.source: expected synthetic, a prepared corpus directory or text "
                           "files, got ''")
        check_vocab("data.vocab_size", self.vocab_size)


@dataclass(frozen=True)
class RunConfig:
    variant: str
    preset: str
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        if self.train.micro_batch_size == 0 and self.train.batch_size % self.train.devices:
            raise LabError(f"train.batch_size: {self.train.batch_size} is not divisible by "
                           f"{self.train.devices} devices")
        self.check_token_budget()

    def check_token_budget(self) -> None:
        """At least one optimizer step, and no more than MAX_RUN_DAYS of training at the
        fastest GPU's peak on every device: the arithmetic goes into the message."""
        t, m = self.train, self.model
        tokens_per_step = t.batch_size * m.context
        if t.tokens < tokens_per_step:
            raise LabError(f"train.tokens: {t.tokens:g} is less than one optimizer step of "
                           f"{t.batch_size} sequences x {m.context} tokens = {tokens_per_step:,} "
                           "tokens; give at least that many")
        flops = flops_per_token_lower_bound(m)
        peak_tflops = max(value for _, value in PEAK_BF16_TFLOPS)
        days = t.tokens * flops / (peak_tflops * 1e12 * t.devices) / 86400
        if days > MAX_RUN_DAYS:
            most = MAX_RUN_DAYS * 86400 * peak_tflops * 1e12 * t.devices / flops
            raise LabError(f"train.tokens: {t.tokens:.3g} tokens x {flops:.3g} FLOPs per token "
                           f"(at least, lab/model/flops.py) = {t.tokens * flops:.3g} FLOPs take at least "
                           f"{days:.3g} days on {t.devices} device(s) at {peak_tflops:g} TFLOP/s "
                           f"(the fastest bf16 peak known); at most {most:.3g} tokens fit in "
                           f"{MAX_RUN_DAYS} days")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identity of a grid cell (lab/identity.py: which fields make it, and why)."""
        return cell_hash(self.to_dict())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    out.update(extra)
    return out


def _coerce(field_name: str, current: Any, text: str, optional: bool) -> Any:
    """Parse an override value by the type of the field's current value; `optional`: the
    field may hold None (its annotation says so: lab/errors.py allows_none)."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise LabError(f"{field_name}: expected true or false, got {text!r}")
    # A text field that may not be None keeps "none" as its text: train.fused_loss and
    # model.sdpa_transform name their default "none". One that may (model.switch_head, which
    # a Switch Head variant sets) reads it as None, whatever its value now.
    if text.lower() in ("none", "null") and (optional or not isinstance(current, str)):
        return None
    try:
        if isinstance(current, int):
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(current, float) or current is None and _looks_numeric(text):
            return float(text)
    except (ValueError, OverflowError):  # int("inf") overflows
        raise LabError(f"{field_name}: expected a {type(current).__name__}, got {text!r}") from None
    return text


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def parse_overrides(pairs: list[str] | dict | None) -> dict[str, dict[str, str]]:
    """['train.lr=1e-3', 'gate.activation=silu'] -> {'train': {'lr': '1e-3'}, ...} (validated keys)."""
    if not pairs:
        return {}
    items = pairs.items() if isinstance(pairs, dict) else (_split_pair(p) for p in pairs)
    out: dict[str, dict[str, Any]] = {}
    for key, value in items:
        section, _, name = key.partition(".")
        allowed = {**SECTIONS, "gate": GateSpec}
        if section not in allowed or not name:
            raise LabError(f"override {key!r}: keys look like section.field with section one of "
                           f"{', '.join(allowed)}")
        fields = {f.name for f in dataclasses.fields(allowed[section])}
        if name not in fields:
            raise LabError(f"override {key!r}: unknown field {name!r} of {section}; allowed: "
                           f"{', '.join(sorted(fields))}")
        out.setdefault(section, {})[name] = value
    return out


def _split_pair(pair: str) -> tuple[str, str]:
    if "=" not in pair:
        raise LabError(f"--set: expected key=value, got {pair!r}")
    key, value = pair.split("=", 1)
    return key.strip(), value.strip()


def _apply(section_obj, section: str, values: dict) -> Any:
    updates = {}
    for name, value in values.items():
        current = getattr(section_obj, name)
        if isinstance(value, str):
            value = _coerce(f"{section}.{name}", current, value,
                            allows_none(type(section_obj), name))
        updates[name] = value
    return dataclasses.replace(section_obj, **updates)


def _scaled_heads(preset_heads: int, factor: float, what: str, variant: str) -> int:
    heads = preset_heads * factor
    if heads != int(heads):
        raise LabError(f"variant {variant}: {what} x {factor} = {heads} is not a whole number "
                       "at this preset")
    return int(heads)


def resolve(variant: str | Variant, preset: str, overrides: list[str] | dict | None = None,
            data: str | None = None, tokens: float | None = None, seed: int | None = None,
            lr: float | None = None) -> RunConfig:
    """Preset + variant + overrides -> a validated RunConfig (raises LabError, never trains)."""
    if preset not in PRESETS:
        raise LabError(f"preset: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    spec = get_variant(variant) if isinstance(variant, str) else variant
    preset_values = PRESETS[preset]
    parsed = parse_overrides(overrides)

    model = ModelConfig(**preset_values["model"])
    model = dataclasses.replace(
        model,
        n_heads=_scaled_heads(model.n_heads, spec.q_heads_factor, "n_heads", spec.slug),
        n_kv_heads=_scaled_heads(model.n_kv_heads, spec.kv_heads_factor, "n_kv_heads", spec.slug),
        gate=spec.gate, **spec.model)
    if "gate" in parsed:
        if model.gate is None:
            raise LabError(f"override gate.*: variant {spec.slug} has no gate to change")
        model = dataclasses.replace(model, gate=_apply(model.gate, "gate", parsed["gate"]))
    model = _apply(model, "model", parsed.get("model", {}))

    train = TrainConfig(**preset_values.get("train", {}))
    direct = {k: v for k, v in (("tokens", tokens), ("seed", seed), ("lr", lr)) if v is not None}
    train = dataclasses.replace(train, **direct)
    train = _apply(train, "train", parsed.get("train", {}))

    data_cfg = DataConfig(vocab_size=model.vocab_size)
    if data is not None:
        data_cfg = dataclasses.replace(data_cfg, source=data)
    data_cfg = _apply(data_cfg, "data", parsed.get("data", {}))

    config = RunConfig(variant=spec.slug, preset=preset, model=model, train=train, data=data_cfg)
    if spec.needs is not None and model.ffn != spec.needs:
        kind = "an MoE" if spec.needs == "moe" else "a dense"
        raise LabError(f"variant {spec.slug}: needs {kind} preset (model.ffn={spec.needs})")
    config.validate()
    return config


def with_vocab(config: RunConfig, vocab_size: int) -> RunConfig:
    """The model's vocabulary is the data's: set once the tokens are known, and checked as
    `model.vocab_size` is (a corpus's manifest may name any number; the embedding is
    allocated from it)."""
    check_vocab("data: the corpus's vocab_size (the model's vocabulary)", vocab_size)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'model.n_layers': 2, 'model.gate.position': 'sdpa', ...} for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def from_dict(raw: dict) -> RunConfig:
    """Inverse of RunConfig.to_dict (for configs read back from MLflow or checkpoints)."""
    model = dict(raw["model"])
    if model.get("gate") is not None:
        model["gate"] = GateSpec(**model["gate"])
    return RunConfig(variant=raw["variant"], preset=raw["preset"], model=ModelConfig(**model),
                     train=TrainConfig(**raw["train"]), data=DataConfig(**raw["data"]))
