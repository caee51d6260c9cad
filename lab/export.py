"""Hugging Face export: a run's checkpoint -> a transformers Qwen3 directory, and back.

The layout is the one of the paper's released models (docs/paper.md §6, the reference
`modeling_qwen3.py`): `model_type` qwen3 with the flags `headwise_attn_output_gate` /
`elementwise_attn_output_gate`, separate q/k/v/o projections, and the G1 gate logits
fused into `q_proj`, grouped per KV head: the output of `q_proj` is read as
`[b, t, num_kv_heads, -1]` and each group is `[head_dim*groups query | gate]`, the gate
being `groups` columns (headwise) or `head_dim*groups` (elementwise).

Our `Attention` fuses `[q | k | v | gate]` into one `in_proj` with the gate logits head by
head after V, and the MLP's `[gate | up]` into `gate_up`; the two directions below only
split, regroup and join rows of those matrices, so export then import is bit-exact.
RoPE is rotate-half as HF Qwen3 and RMSNorm is the same function, so the exported weights
compute our model's logits in the reference code.

Only architectures the reference code can express are exported: the baseline and the
SDPA (G1) head-specific multiplicative sigmoid gates, headwise and elementwise, on a plain
Qwen3 block. Everything else is refused with a LabError before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lab.config import RunConfig
from lab.data.sources import open_source
from lab.errors import LabError, check_choice, writable_folder
from lab.model.config import ModelConfig
from lab.model.decoder import Decoder
from lab.model.gates import GateSpec
from lab.records import checkpoint_path, read_checkpoint
from lab.training.schedule import total_steps

FORMATS = ("hf",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS_FILE = "model.safetensors"
END_OF_TEXT = "<|endoftext|>"
SUPPORTED = ("baseline", "sdpa_headwise_sigmoid_mul", "sdpa_elementwise_sigmoid_mul")
# The gate the reference code implements, per granularity -> its config flag.
GATE_FLAGS = {"headwise": "headwise_attn_output_gate", "elementwise": "elementwise_attn_output_gate"}

# Per-layer tensors that only change name (ours -> HF); the fused ones are split below.
RENAMED = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
}


# --- what can be exported -------------------------------------------------------------

# ModelConfig fields an export may hold at any value: those config.json carries
# (`hf_config`; `ffn_widen_g1_fraction` through `intermediate_size`, the FFN's width) and
# those that do not change what trained weights compute (the init's scale; the experts'
# shapes and losses, unused by the dense FFN an export must have). Every other field must be
# at its default, a plain Qwen3 block: a field added to ModelConfig is refused until it is
# listed here, rather than exported with a meaning the reference code does not have.
EXPORTED_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim",
                   "ffn_hidden", "ffn_widen_g1_fraction", "context", "rope_base", "rms_eps",
                   "tie_embeddings", "init_std")
NEUTRAL_FIELDS = ("residual_init_scale", "moe_experts", "moe_top_k", "moe_expert_hidden",
                  "moe_shared_expert", "moe_normalize_top_k", "moe_aux_loss_coef",
                  "moe_z_loss_coef")
# Gate fields that do not change what a trained G1 head-specific gate computes.
INERT_GATE_FIELDS = ("init", "shared_average", "qk_placement")


def unsupported_gate_fields(gate: GateSpec) -> dict:
    """Fields where `gate` differs from the gates the reference code has: G1, head-specific,
    sigmoid, multiplicative, input-dependent, no bias (its q_proj bias follows `qkv_bias`,
    which switches every projection's bias at once). Empty: exportable."""
    reference = GateSpec(position="sdpa", granularity=gate.granularity)
    return {f.name: getattr(gate, f.name) for f in dataclasses.fields(gate)
            if f.name not in INERT_GATE_FIELDS and getattr(gate, f.name) != getattr(reference, f.name)}


def check_exportable(config: RunConfig) -> None:
    """LabError naming the reason and what is supported, for anything the reference Qwen3 cannot load."""
    m, defaults = config.model, ModelConfig()
    allowed = EXPORTED_FIELDS + NEUTRAL_FIELDS + ("gate",)
    changed = [f"{f.name}={getattr(m, f.name)}" for f in dataclasses.fields(m)
               if f.name not in allowed and getattr(m, f.name) != getattr(defaults, f.name)]
    if m.gate is not None and unsupported_gate_fields(m.gate):
        changed.append("gate " + ",".join(f"{k}={v}" for k, v in unsupported_gate_fields(m.gate).items()))
    if changed:
        raise LabError(f"export: variant {config.variant} is not expressible in the reference Qwen3 "
                       f"layout ({'; '.join(changed)}); supported: {', '.join(SUPPORTED)} "
                       "(plain Qwen3 block with QK-norm)")


def gate_flags(model: ModelConfig) -> dict[str, bool]:
    return {flag: model.gate is not None and model.gate.granularity == granularity
            for granularity, flag in GATE_FLAGS.items()}


# --- configs --------------------------------------------------------------------------

def hf_config(model: ModelConfig, dtype: str = "float32", eos_id: int | None = None) -> dict:
    """config.json for the reference `Qwen3Config` (also readable by stock transformers)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.ffn_width,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.context,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.rms_eps,
        "rope_theta": model.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": model.n_layers,
        # Read by the reference modeling code (docs/paper.md §6): qk-norm switch, q/k/v/o bias, gates.
        "use_qk_norm": True,
        "qkv_bias": False,
        **gate_flags(model),
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The inverse of `hf_config` for exported directories (refuses what it does not know)."""
    if hf.get("model_type") != "qwen3":
        raise LabError(f"import: model_type {hf.get('model_type')!r} is not qwen3")
    headwise, elementwise = (bool(hf.get(flag, False)) for flag in GATE_FLAGS.values())
    if headwise and elementwise:
        raise LabError("import: config sets both headwise_attn_output_gate and "
                       "elementwise_attn_output_gate")
    if not hf.get("use_qk_norm", True) or hf.get("qkv_bias") or hf.get("attention_bias"):
        raise LabError("import: only Qwen3 with QK-norm and no q/k/v/o bias is supported")
    gate = None
    if headwise or elementwise:
        gate = GateSpec(position="sdpa", granularity="headwise" if headwise else "elementwise")
    return ModelConfig(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"],
                       d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
                       ffn_hidden=hf["intermediate_size"], context=hf["max_position_embeddings"],
                       rope_base=float(hf["rope_theta"]), rms_eps=hf["rms_norm_eps"],
                       qk_norm=True, tie_embeddings=hf["tie_word_embeddings"],
                       init_std=hf.get("initializer_range", ModelConfig.init_std), gate=gate)


# --- weights --------------------------------------------------------------------------

def q_proj_rows(model: ModelConfig) -> torch.Tensor:
    """Row order of the reference `q_proj` as indices into our `[q | gate]` rows.

    Per KV group g (docs/paper.md §6): the query rows of its `groups` heads, then their gate rows.
    Our q rows are head by head (h*D + d) and the gate rows after them (h or h*D + d), so
    the query heads of group g are g*groups .. g*groups+groups-1 in both layouts.
    """
    H, G, D = model.n_heads, model.n_kv_heads, model.head_dim
    query = torch.arange(H * D).view(G, -1)
    if model.gate is None:
        return query.flatten()
    width = D if model.gate.granularity == "elementwise" else 1
    gate = (H * D + torch.arange(H * width)).view(G, -1)
    return torch.cat((query, gate), dim=1).flatten()


def _attention_widths(model: ModelConfig) -> list[int]:
    """[q, k, v, gate] column widths of our fused in_proj."""
    H, G, D = model.n_heads, model.n_kv_heads, model.head_dim
    gate = 0 if model.gate is None else H * (D if model.gate.granularity == "elementwise" else 1)
    return [H * D, G * D, G * D, gate]


def to_hf_state_dict(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our Decoder's state dict -> HF Qwen3ForCausalLM tensor names and layout."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]  # tied: HF re-ties it on load
    q_rows = q_proj_rows(model)
    for layer in range(model.n_layers):
        ours, hf = f"blocks.{layer}.", f"model.layers.{layer}."
        for name, hf_name in RENAMED.items():
            out[hf + hf_name] = state[ours + name]
        q, k, v, gate = state[ours + "attn.in_proj.weight"].split(_attention_widths(model))
        out[hf + "self_attn.q_proj.weight"] = torch.cat((q, gate))[q_rows]
        out[hf + "self_attn.k_proj.weight"] = k
        out[hf + "self_attn.v_proj.weight"] = v
        gate_rows, up_rows = state[ours + "ffn.gate_up.weight"].chunk(2)
        out[hf + "mlp.gate_proj.weight"] = gate_rows
        out[hf + "mlp.up_proj.weight"] = up_rows
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Qwen3 tensors (exported layout) -> our Decoder's state dict."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise LabError(f"import: tensor {name} missing from the checkpoint")
        return hf[name]

    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    state["lm_head.weight"] = state["embed.weight"] if model.tie_embeddings else take("lm_head.weight")
    inverse = torch.argsort(q_proj_rows(model))
    q_width, _, _, gate_width = _attention_widths(model)
    for layer in range(model.n_layers):
        ours, hf_prefix = f"blocks.{layer}.", f"model.layers.{layer}."
        for name, hf_name in RENAMED.items():
            state[ours + name] = take(hf_prefix + hf_name)
        q_and_gate = take(hf_prefix + "self_attn.q_proj.weight")
        if q_and_gate.shape[0] != q_width + gate_width:
            raise LabError(f"import: {hf_prefix}self_attn.q_proj.weight has {q_and_gate.shape[0]} rows, "
                           f"expected {q_width + gate_width} for this config's gate flags")
        state[ours + "attn.in_proj.weight"] = torch.cat(
            (q_and_gate[inverse][:q_width], take(hf_prefix + "self_attn.k_proj.weight"),
             take(hf_prefix + "self_attn.v_proj.weight"), q_and_gate[inverse][q_width:]))
        state[ours + "ffn.gate_up.weight"] = torch.cat((take(hf_prefix + "mlp.gate_proj.weight"),
                                                        take(hf_prefix + "mlp.up_proj.weight")))
    return state


# --- checkpoints ----------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    state: dict[str, torch.Tensor]  # our Decoder's, without the LightningModule's `model.` prefix
    step: int
    planned_steps: int

    @property
    def is_final(self) -> bool:
        return self.step >= self.planned_steps


def load_checkpoint(run_or_path: str) -> Checkpoint:

    path = checkpoint_path(run_or_path, "export")
    config, state, step = read_checkpoint(path, "export")
    return Checkpoint(path, config, state, step, total_steps(config))


# --- tokenizer ------------------------------------------------------------------------

def tokenizer_file(config: RunConfig) -> Path | None:
    """The run's tokenizer.json: none for the synthetic corpus (its ids are not text)."""
    source = config.data.source
    if source == "synthetic":
        return None
    path = Path(source)
    if path.is_dir():
        found = path / "tokenizer.json"
        return found if found.exists() else None
    # Text files: the prepared store is cached by file identity, so this reopens the one the run used.
    store = open_source(source, config.data.vocab_size, config.data.valid, config.data.test)
    found = store.path / "tokenizer.json"
    return found if found.exists() else None


def write_tokenizer(tokenizer_json: Path, out: Path, model: ModelConfig) -> int:
    """tokenizer.json plus the small files `AutoTokenizer` reads; returns the end-of-text id."""
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if tokenizer.get_vocab_size() != model.vocab_size:
        raise LabError(f"export: tokenizer {tokenizer_json} has {tokenizer.get_vocab_size()} tokens, "
                       f"the model {model.vocab_size}")
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
        raise LabError(f"export: tokenizer {tokenizer_json} has no {END_OF_TEXT} token")
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    # Training puts end-of-text before every document (lab/data/store.py), so it is also the BOS.
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
    _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                "model_max_length": model.context, **special})
    _write_json(out / "special_tokens_map.json", special)
    return eos_id


# --- the two directions ---------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    variant: str
    step: int
    planned_steps: int
    tokenizer: bool

    def describe(self) -> str:
        which = ("the final checkpoint" if self.step >= self.planned_steps else
                 f"an intermediate checkpoint: step {self.step} of {self.planned_steps} "
                 "(the last one the run saved)")
        tokenizer = "with its tokenizer" if self.tokenizer else "no tokenizer (synthetic corpus)"
        return f"exported {self.variant} to {self.out} from {which}, {tokenizer}"


def export(run_or_path: str, out: str | Path, fmt: str = "hf", dtype: str = "float32",
           tokenizer: str | None = None, force: bool = False) -> ExportResult:
    """Write a Hugging Face Qwen3 directory for a run (see the module docstring for the layout)."""
    check_choice("--format", fmt, FORMATS)
    check_choice("--dtype", dtype, tuple(DTYPES))
    out = Path(out)
    writable_folder("--out", out)  # a file there, a read-only place: one line, nothing written
    if out.exists() and any(out.iterdir()) and not force:
        raise LabError(f"--out: {out} is not empty (pass --force to overwrite)")
    ckpt = load_checkpoint(run_or_path)
    check_exportable(ckpt.config)
    tokenizer_json = Path(tokenizer) if tokenizer else tokenizer_file(ckpt.config)
    if tokenizer_json is not None and not tokenizer_json.is_file():
        raise LabError(f"--tokenizer: file not found: {tokenizer_json}")
    model = ckpt.config.model
    try:
        out.mkdir(parents=True, exist_ok=True)
        eos_id = write_tokenizer(tokenizer_json, out, model) if tokenizer_json else None
        tensors = {name: t.to(DTYPES[dtype])
                   for name, t in to_hf_state_dict(ckpt.state, model).items()}
        # transformers checks the "pt" format
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors writes through a private temporary file (mode 0600); the weights get the
        # mode of the other files written here (0666 less the umask, 0644 usually).
        os.chmod(out / WEIGHTS_FILE, 0o666 & ~_umask())
        _write_json(out / "config.json", hf_config(model, dtype, eos_id))
        if eos_id is not None:
            _write_json(out / "generation_config.json",
                        {"bos_token_id": eos_id, "eos_token_id": eos_id})
        result = ExportResult(out, ckpt.config.variant, ckpt.step, ckpt.planned_steps,
                              tokenizer_json is not None)
        (out / "README.md").write_text(model_card(ckpt, result))
    except OSError as err:  # a full disk, or the place changed under us: one line
        raise LabError(f"--out: cannot write {out} ({err.strerror or err}); the files written "
                       "so far are incomplete") from None
    return result


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def model_card(ckpt: Checkpoint, result: ExportResult) -> str:
    flags = [flag for flag, on in gate_flags(ckpt.config.model).items() if on]
    tokenizer = ("tokenizer.json is the BPE tokenizer the run trained on; every document starts "
                 f"with {END_OF_TEXT}, so prepend it when scoring text."
                 if result.tokenizer else
                 "No tokenizer: the run trained on the lab's synthetic corpus, whose token ids "
                 "are not text. Feed token ids directly.")
    return (f"# gatelab export: {ckpt.config.variant}\n\n"
            f"A Qwen3 decoder trained by gated-attention-lab ({ckpt.config.preset} preset), in the "
            "layout of the released gated-attention models (Qiu et al., 2025): "
            f"{', '.join(flags) or 'no output gate'}.\n\n"
            f"- checkpoint: step {ckpt.step} of {ckpt.planned_steps} planned "
            f"({'final' if ckpt.is_final else 'intermediate: the last checkpoint the run saved'})\n"
            f"- config hash: {ckpt.config.hash()}\n"
            f"- tokenizer: {tokenizer}\n\n"
            "Stock transformers' Qwen3 does not read the gate flags; load gated exports with the "
            "reference modeling_qwen3.py (see docs/ecosystem.md of the lab).\n")


def load_hf(directory: str | Path):
    """An exported directory -> our `Decoder` with its weights (the import direction)."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.exists():
            raise LabError(f"import: {path} not found")
    model_config = model_config_from_hf(json.loads(config_path.read_text()))
    model_config.validate()
    decoder = Decoder(model_config)
    state = from_hf_state_dict(load_file(str(weights_path)), model_config)
    decoder.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    return decoder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
