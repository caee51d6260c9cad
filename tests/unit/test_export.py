"""lab/export.py: HF Qwen3 export, import back, and the reference layout (spec 1.6)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lab.cli import main
from lab.config import resolve
from lab.errors import LabError
from lab.export import export, load_hf, model_config_from_hf, q_proj_rows
from lab.model.decoder import Decoder
from lab.model.variants import VARIANTS

EXPORTED = ["baseline", "sdpa_headwise_sigmoid_mul", "sdpa_elementwise_sigmoid_mul"]
UNTIED = ["model.tie_embeddings=false"]


def trained_like_decoder(config, seed: int = 0) -> Decoder:
    """A tiny decoder with every tensor perturbed (norm weights away from 1, so a swapped
    q_norm/k_norm or input/post-attention norm would change the logits)."""
    torch.manual_seed(seed)
    decoder = Decoder(config.model)
    with torch.no_grad():
        for param in decoder.parameters():
            param.add_(torch.randn_like(param) * (0.3 if param.ndim == 1 else 0.05))
    return decoder.eval()


def write_checkpoint(path, config, decoder: Decoder, step: int) -> None:
    """What AtomicCheckpoint leaves: a Lightning checkpoint of LanguageModel (lab/training/module.py)."""
    state = {f"model.{name}": tensor for name, tensor in decoder.state_dict().items()}
    torch.save({"state_dict": state, "global_step": step,
                "hyper_parameters": {"config": config.to_dict()}}, path)


def exported(tmp_path, variant: str, step: int = 10**6, overrides=None):
    config = resolve(variant, "tiny", overrides)
    decoder = trained_like_decoder(config)
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(ckpt, config, decoder, step)
    out = tmp_path / "hf"
    result = export(str(ckpt), out)
    return config, decoder, out, result


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,overrides", [(v, None) for v in EXPORTED] +
                         [("sdpa_headwise_sigmoid_mul", UNTIED)])
def test_round_trip_gives_identical_logits(tmp_path, variant, overrides):
    config, decoder, out, _ = exported(tmp_path, variant, overrides=overrides)
    loaded = load_hf(out).eval()
    assert loaded.cfg == config.model  # the HF config carries the whole architecture
    x = tokens(config.model.vocab_size)
    with torch.no_grad():
        diff = (loaded(x) - decoder(x)).abs().max().item()
    print(f"{variant}: round-trip max |logit diff| = {diff:.3g}")
    assert diff == 0.0


@pytest.mark.parametrize("variant", EXPORTED)
def test_config_json_has_the_reference_flags(tmp_path, variant):
    config, _, out, _ = exported(tmp_path, variant)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "qwen3" and hf["architectures"] == ["Qwen3ForCausalLM"]
    assert hf["headwise_attn_output_gate"] == (variant == "sdpa_headwise_sigmoid_mul")
    assert hf["elementwise_attn_output_gate"] == (variant == "sdpa_elementwise_sigmoid_mul")
    assert hf["use_qk_norm"] is True and hf["qkv_bias"] is False
    assert model_config_from_hf(hf) == config.model


# --- the reference forward, re-implemented from the reference modeling code's semantics ---

def rms_norm(x, weight, eps):
    # Qwen3RMSNorm: float32 variance, weight * normalised input.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(hf: dict, w: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen3ForCausalLM of the reference code, eager attention, read from config.json and
    the exported tensors: the gate split is per KV group of q_proj's output (spec 1.6)."""
    b, t = input_ids.shape
    H, G, D = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    groups, eps = H // G, hf["rms_norm_eps"]
    inv_freq = 1.0 / (hf["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, t, D)
    mask = torch.full((t, t), float("-inf")).triu(1)

    h = w["model.embed_tokens.weight"][input_ids]
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = x @ w[p + "self_attn.q_proj.weight"].T
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, t, -1, D).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, t, -1, D).transpose(1, 2)
        gate = None
        if hf["headwise_attn_output_gate"] or hf["elementwise_attn_output_gate"]:
            gate_width = groups if hf["headwise_attn_output_gate"] else D * groups
            q, gate = q.view(b, t, G, -1).split([D * groups, gate_width], dim=-1)
            gate = gate.reshape(b, t, H, -1)  # (b, t, H, 1) or (b, t, H, D)
        q = q.reshape(b, t, H, D).transpose(1, 2)
        q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
        k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # repeat_kv
        scores = (q @ k.transpose(2, 3)) / math.sqrt(D) + mask
        attn = F.softmax(scores, dim=-1, dtype=torch.float32) @ v  # (b, H, t, D)
        attn = attn.transpose(1, 2)
        if gate is not None:
            attn = attn * torch.sigmoid(gate)
        h = h + attn.reshape(b, t, H * D) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ head.T


def read_export(out):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("variant,overrides", [(v, None) for v in EXPORTED] +
                         [("sdpa_elementwise_sigmoid_mul", UNTIED)])
def test_reference_forward_on_the_export_matches_our_model(tmp_path, variant, overrides):
    config, decoder, out, _ = exported(tmp_path, variant, overrides=overrides)
    hf, weights = read_export(out)
    gated = variant != "baseline"
    H, D = config.model.n_heads, config.model.head_dim
    width = (D if variant.startswith("sdpa_elementwise") else 1) if gated else 0
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (H * D + H * width,
                                                                       config.model.d_model)
    # Tied: left out, as save_pretrained does (HF re-ties it on load); untied: written.
    assert ("lm_head.weight" in weights) == (not config.model.tie_embeddings)
    x = tokens(config.model.vocab_size)
    with torch.no_grad():
        ours = decoder(x)
        diff = (reference_logits(hf, weights, x) - ours).abs().max().item()
    print(f"{variant}: reference forward vs ours, max |logit diff| = {diff:.3g}")
    assert diff < 1e-4

    if gated:  # the test can tell layouts apart: [all queries | all gates] is wrong with GQA
        rows = q_proj_rows(config.model)
        assert not torch.equal(rows, torch.arange(len(rows)))
        naive = dict(weights)
        for layer in range(config.model.n_layers):
            name = f"model.layers.{layer}.self_attn.q_proj.weight"
            naive[name] = weights[name][torch.argsort(rows)]
        with torch.no_grad():
            wrong = (reference_logits(hf, naive, x) - ours).abs().max().item()
        assert wrong > 1e-2


# --- refusals, checkpoints, tokenizer ----------------------------------------------------

@pytest.mark.parametrize("variant", ["value_headwise_sigmoid_mul", "sdpa_elementwise_silu_mul",
                                     "sdpa_elementwise_headshared_sigmoid_mul",
                                     "baseline_sandwich_norm", "switchhead_v_1top1"])
def test_unsupported_variant_is_refused_before_writing(tmp_path, variant):
    config = resolve(variant, "tiny")
    write_checkpoint(tmp_path / "last.ckpt", config, Decoder(config.model), 5)
    with pytest.raises(LabError, match="supported: baseline, sdpa_headwise_sigmoid_mul, "
                                       "sdpa_elementwise_sigmoid_mul"):
        export(str(tmp_path / "last.ckpt"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# What the reference Qwen3 can express (the behaviour the allow-list keeps): the plain block
# with the two G1 gates, and the parameter-matched baselines that only change head counts or
# the FFN's width. Every other registered variant is refused.
EXPRESSIBLE = {"baseline", "baseline_kv8", "baseline_q48", "baseline_ffn_g1params",
               "baseline_ffn_kv8params", "sdpa_elementwise_sigmoid_mul",
               "sdpa_headwise_sigmoid_mul"}


@pytest.mark.parametrize("slug", list(VARIANTS))
def test_every_registered_variant_exports_to_the_reference_forward_or_is_refused(tmp_path, slug):
    """export's allow-list (lab/export.py EXPORTED_FIELDS, NEUTRAL_FIELDS) over the whole
    registry: an export computes our logits in the reference code's forward (re-implemented
    above from config.json alone), a refusal names the fields and writes nothing."""
    config = resolve(slug, "moe-tiny" if VARIANTS[slug].needs == "moe" else "tiny")
    decoder = trained_like_decoder(config)
    write_checkpoint(tmp_path / "last.ckpt", config, decoder, 5)
    out = tmp_path / "hf"
    if slug not in EXPRESSIBLE:
        with pytest.raises(LabError, match=rf"^export: variant {slug} is not expressible in the "
                                           r"reference Qwen3 layout \(.+=.+\); supported: "):
            export(str(tmp_path / "last.ckpt"), out)
        assert not out.exists()
        return
    export(str(tmp_path / "last.ckpt"), out)
    hf, weights = read_export(out)
    x = tokens(config.model.vocab_size)
    with torch.no_grad():
        diff = (reference_logits(hf, weights, x) - decoder(x)).abs().max().item()
    assert diff < 1e-4, (slug, diff)


def test_missing_checkpoint_and_bad_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "store"))
    assert main(["export", "0123abcd", "--out", str(tmp_path / "hf")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    config = resolve("baseline", "tiny")
    write_checkpoint(tmp_path / "last.ckpt", config, Decoder(config.model), 5)
    assert main(["export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "hf")]) == 2
    assert "--format: 'gguf' is not one of hf" in capsys.readouterr().err


def test_text_corpus_ships_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    from lab.data.corpus import prepare

    text = tmp_path / "corpus.txt"
    text.write_text("<|endoftext|>".join(f"document {i}: the gate opens and the sink drains {i % 7}."
                                for i in range(200)))
    store = prepare(str(text), vocab_size=300, out=tmp_path / "cache").store
    config = resolve("sdpa_headwise_sigmoid_mul", "tiny", data=str(store.path),
                     overrides=[f"model.vocab_size={store.vocab_size}"])
    write_checkpoint(tmp_path / "last.ckpt", config, Decoder(config.model), 3)
    result = export(str(tmp_path / "last.ckpt"), tmp_path / "hf", dtype="bfloat16")
    out = tmp_path / "hf"
    assert result.tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == store.vocab_size
    hf = json.loads((out / "config.json").read_text())
    assert hf["eos_token_id"] == store.eos_id and hf["torch_dtype"] == "bfloat16"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    _, weights = read_export(out)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())


def test_cli_exports_a_trained_run_and_names_the_step(tmp_path, monkeypatch, capsys):
    """End to end on a real Lightning checkpoint: train a few steps, export by run id."""
    from lab.training.run import train_run

    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", data="synthetic", tokens=6 * 4 * 128,
                     overrides=["train.batch_size=4", "train.val_every=4", "train.val_batches=1"])
    result = train_run(config, experiment="export-test", quiet=True)
    out = tmp_path / "hf"
    assert main(["export", result.run_id, "--format", "hf", "--out", str(out)]) == 0
    message = capsys.readouterr().out
    # AtomicCheckpoint writes last.ckpt at the end of training, so the export is of step 6.
    assert "from the final checkpoint" in message
    assert "no tokenizer (synthetic corpus)" in message
    assert not (out / "tokenizer.json").exists()
    assert "No tokenizer" in (out / "README.md").read_text()
    loaded = load_hf(out)
    assert loaded.cfg.gate is not None and loaded.cfg.gate.granularity == "elementwise"
    assert main(["export", result.run_id, "--out", str(out)]) == 2  # not empty, no --force
    assert main(["export", result.run_id, "--out", str(out), "--force"]) == 0
    # The weights are readable as the other files are (safetensors alone leaves them 0600).
    assert (out / "model.safetensors").stat().st_mode & 0o777 == \
        (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    prefixed = tmp_path / "by-prefix"
    assert main(["export", result.run_id[:8], "--out", str(prefixed)]) == 0
    assert (prefixed / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_unique_prefix_names_a_run_and_an_ambiguous_one_lists_the_matches(tmp_path,
                                                                              monkeypatch):
    from lab.errors import LabError
    from lab.records import checkpoint_dir, checkpoint_path

    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    ids = ["2e5652dd" + "0" * 24, "2e56ffff" + "1" * 24, "9a" + "2" * 30]
    for run_id in ids:
        checkpoint_dir(run_id).mkdir(parents=True)
        (checkpoint_dir(run_id) / "last.ckpt").write_bytes(b"")
    checkpoint_dir("2e5600000000").mkdir()  # a run without a checkpoint is no match
    assert checkpoint_path("2e5652dd", "analyze") == checkpoint_dir(ids[0]) / "last.ckpt"
    assert checkpoint_path("9A", "export") == checkpoint_dir(ids[2]) / "last.ckpt"
    with pytest.raises(LabError, match=f"^export: run id prefix '2e56' matches 2 runs with a "
                                       f"checkpoint: {ids[0]}, {ids[1]}; give more characters$"):
        checkpoint_path("2e56", "export")
    with pytest.raises(LabError, match="^analyze: no checkpoint at .*/ffff/last.ckpt"):
        checkpoint_path("ffff", "analyze")


def test_checkpoint_path_takes_a_file_a_folder_or_a_run_id_and_names_the_command(tmp_path, monkeypatch):
    from lab.errors import LabError
    from lab.records import checkpoint_dir, checkpoint_path

    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    run_folder = checkpoint_dir("abc123")
    run_folder.mkdir(parents=True)
    (run_folder / "last.ckpt").write_bytes(b"")
    assert checkpoint_path(str(run_folder / "last.ckpt"), "export") == run_folder / "last.ckpt"
    assert checkpoint_path(str(run_folder), "export") == run_folder / "last.ckpt"
    assert checkpoint_path("abc123", "analyze") == run_folder / "last.ckpt"
    with pytest.raises(LabError, match="^analyze: no checkpoint at"):
        checkpoint_path("nope", "analyze")
