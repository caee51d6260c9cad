"""lab/training/step.py: the training step without Lightning that the Lightning module and the
bench's bare loop share: AdamW's weight-decay groups by name, the step's loss, the training
windows, the Inductor cache and which runs replay CUDA graphs."""

import pytest
import torch

from lab.config import resolve
from lab.model.decoder import Decoder
from lab.model.gates import GateSpec
from lab.model.variants import VARIANTS, custom_variant


def test_adamw_decays_matrices_only_and_skips_frozen_parameters():
    from lab.training.step import adamw

    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", ["train.weight_decay=0.1", "train.lr=0.01"])
    model = Decoder(config.model)
    model.norm.weight.requires_grad_(False)
    decayed, undecayed = adamw(model.named_parameters(), config, fused=False).param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert decayed["lr"] == 0.01 and decayed["eps"] == config.train.eps
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert model.embed.weight in decayed["params"]  # the tied embedding / LM head
    assert all(p.ndim == 1 and p is not model.norm.weight for p in undecayed["params"])
    assert len(undecayed["params"]) == sum(1 for p in model.parameters() if p.ndim == 1) - 1


def decay_by_name(config) -> dict[str, bool]:
    """Every trainable parameter's name -> whether `adamw` put it in the decayed group."""
    from lab.training.step import adamw

    model = Decoder(config.model)
    decayed, undecayed = adamw(model.named_parameters(), config, fused=False).param_groups
    groups = {id(p): True for p in decayed["params"]} | {id(p): False for p in undecayed["params"]}
    assert len(groups) == len(decayed["params"]) + len(undecayed["params"])  # one group each
    return {name: groups[id(p)] for name, p in model.named_parameters()}


def gate_parameters(variant) -> dict[str, bool]:
    """Block 0's gate parameters by name -> decayed?, written out from the variant's definition:
    the gate logit weights W_theta are rows of the fused in_proj (a matrix: decayed), the gate
    bias and the input-independent b are not decayed, Switch Head routers and experts are
    matrices (decayed)."""
    gate, expected = variant.gate, {}
    if gate is not None and gate.input_dependent:
        expected["blocks.0.attn.in_proj.weight"] = True
        if gate.bias:
            expected["blocks.0.attn.gate_bias"] = False
    if gate is not None and not gate.input_dependent:
        expected["blocks.0.attn.gate_constant"] = False
    if "switch_head" in variant.model:
        low_rank = "switch_head_added_fraction" in variant.model
        for projection in ("k", "v") if variant.model["switch_head"].startswith("kv") else ("v",):
            experts = ("experts_down.weight", "experts_up") if low_rank else ("experts_proj.weight",)
            for name in ("router.weight", *experts):
                expected[f"blocks.0.attn.{projection}_experts.{name}"] = True
    return expected


GATED = [slug for slug, v in VARIANTS.items() if gate_parameters(v)]


def test_every_gate_and_switch_head_variant_has_its_gate_parameters_pinned():
    with_gate = {slug for slug, v in VARIANTS.items() if v.gate is not None
                 or "switch_head" in v.model}
    assert set(GATED) == with_gate and len(GATED) == 20  # 15 gates, 5 Switch Heads


@pytest.mark.parametrize("slug", GATED)
def test_adamw_puts_each_gate_parameter_in_its_group_by_name(slug):
    variant = VARIANTS[slug]
    config = resolve(slug, "moe-tiny" if variant.needs == "moe" else "tiny")
    groups = decay_by_name(config)
    for layer in range(config.model.n_layers):
        for name, decayed in gate_parameters(variant).items():
            assert groups[name.replace("blocks.0.", f"blocks.{layer}.")] is decayed, name


@pytest.mark.parametrize("slug", list(VARIANTS))
def test_adamw_skips_decay_for_norm_gains_biases_and_b_only(slug):
    """Every parameter of every variant: the undecayed ones are exactly the RMSNorm gains
    (found by module type, not by name) and the gates' bias-like vectors."""
    variant = VARIANTS[slug]
    config = resolve(slug, "moe-tiny" if variant.needs == "moe" else "tiny")
    model = Decoder(config.model)
    norms = {f"{module_name}.weight" for module_name, module in model.named_modules()
             if isinstance(module, torch.nn.RMSNorm)}
    gate_vectors = {name for name in dict(model.named_parameters())
                    if name.endswith((".gate_bias", ".gate_constant"))}
    assert {name for name, decayed in decay_by_name(config).items() if not decayed} == \
        norms | gate_vectors


def test_gate_bias_is_not_decayed_and_b_is_decayed_only_when_asked():
    biased = custom_variant(GateSpec(granularity="headwise", bias=True))
    groups = decay_by_name(resolve(biased, "tiny"))
    assert groups["blocks.1.attn.gate_bias"] is False and groups["blocks.1.attn.in_proj.weight"]
    slug = "sdpa_input_independent_sigmoid_mul"
    assert decay_by_name(resolve(slug, "tiny"))["blocks.0.attn.gate_constant"] is False
    decayed = decay_by_name(resolve(slug, "tiny", ["train.gate_constant_decay=true"]))
    assert decayed["blocks.0.attn.gate_constant"] is True
    # The choice changes nothing else.
    assert {k: v for k, v in decayed.items() if "gate_constant" not in k} == \
        {k: v for k, v in decay_by_name(resolve(slug, "tiny")).items() if "gate_constant" not in k}


def test_decay_of_b_actually_moves_it_towards_zero():
    """AdamW with lr x wd on b alone (no gradient): decayed b shrinks, undecayed b stays."""
    from lab.training.step import adamw

    for decay, shrinks in [("false", False), ("true", True)]:
        config = resolve("sdpa_input_independent_sigmoid_mul", "tiny",
                         [f"train.gate_constant_decay={decay}", "train.weight_decay=0.5",
                          "train.lr=0.1"])
        model = Decoder(config.model)
        b = model.blocks[0].attn.gate_constant
        with torch.no_grad():
            b.fill_(2.0)
        optimizer = adamw(model.named_parameters(), config, fused=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        assert (b.detach() < 2.0).all() if shrinks else torch.equal(b.detach(), torch.full_like(b, 2.0))


def test_gate_constant_decay_is_checked_before_training():
    from lab.errors import LabError

    with pytest.raises(LabError, match="train.gate_constant_decay: expected true or false"):
        resolve("sdpa_input_independent_sigmoid_mul", "tiny", ["train.gate_constant_decay=maybe"])
    with pytest.raises(LabError, match="train.gate_constant_decay: expected true or false"):
        resolve("sdpa_input_independent_sigmoid_mul", "tiny", {"train.gate_constant_decay": 0.1})


def test_step_loss_adds_the_moe_router_losses_to_the_lm_loss():
    from lab.training.step import step_loss

    config = resolve("baseline", "moe-tiny")
    model = Decoder(config.model)
    tokens = torch.randint(0, config.model.vocab_size, (2, 17))
    loss, lm_loss, aux_losses = step_loss(model, tokens[:, :-1], tokens[:, 1:])
    assert aux_losses  # the router's balance and z losses
    torch.testing.assert_close(loss, lm_loss + sum(aux_losses.values()))
    torch.testing.assert_close(lm_loss, model(tokens[:, :-1], targets=tokens[:, 1:]))


def test_train_sampler_draws_the_runs_windows_with_bos_prefix(tmp_path, monkeypatch):
    from lab.training.corpus import open_data
    from lab.training.step import train_sampler

    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    store, config = open_data(resolve("baseline", "tiny", ["data.bos_prefix=true"]))
    inputs, _ = train_sampler(store, config).batch(0)
    assert inputs.shape == (config.train.micro_batch, config.model.context)
    assert (inputs[:, 0] == store.eos_id).all()  # end-of-text serves as BOS


def test_compiling_uses_the_labs_inductor_cache_unless_one_is_set(monkeypatch, tmp_path):
    """Every cell of a grid, its check and the next grid share Inductor's on-disk caches in
    the lab's cache folder (lab/training/step.py use_compile_cache)."""
    import os

    from lab.training import step

    monkeypatch.delenv(step.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    model = Decoder(resolve("baseline", "tiny").model)
    monkeypatch.setattr(model, "compile", lambda **kwargs: None)
    step.compile_model(model, "default")
    assert os.environ[step.COMPILE_CACHE_ENV] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv(step.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    step.compile_model(model, "default")
    assert os.environ[step.COMPILE_CACHE_ENV] == str(tmp_path / "mine")


def test_the_labs_inductor_cache_replaces_the_one_torch_sets_on_import(tmp_path):
    """Importing torch._dynamo (Lightning does) sets TORCHINDUCTOR_CACHE_DIR to
    torch's temporary default; the lab's folder replaces it, and a folder the user named
    before the lab was imported is kept even where it is torch's default. Until 2026-12-06 a
    grid that trained in its own process compiled into the temporary folder. Fresh
    interpreters: the variable is read at import."""
    import os
    import subprocess
    import sys

    script = ("import os, lab, torch._dynamo\n"
              "before = os.environ.get('TORCHINDUCTOR_CACHE_DIR')\n"
              "from lab.training.step import use_compile_cache\n"
              "print(before, use_compile_cache(), os.environ['TORCHINDUCTOR_CACHE_DIR'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["GATELAB_CACHE"] = str(tmp_path / "cache")

    def run(extra: dict) -> list[str]:
        return subprocess.run([sys.executable, "-c", script], env={**env, **extra}, check=True,
                              capture_output=True, text=True).stdout.split()

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    ours = str(tmp_path / "cache" / "inductor")
    assert run({}) == [default_cache_dir(), ours, ours]
    named = {"TORCHINDUCTOR_CACHE_DIR": default_cache_dir()}
    assert run(named) == [default_cache_dir()] * 3


@pytest.mark.parametrize("mode, compile, cuda, expected", [
    ("reduce-overhead", "auto", True, True), ("max-autotune", True, True, True),
    ("default", "auto", True, False), ("max-autotune-no-cudagraphs", "auto", True, False),
    ("reduce-overhead", "auto", False, False), ("reduce-overhead", False, True, False)])
def test_which_runs_replay_cuda_graphs(mode, compile, cuda, expected):
    from lab.training.step import uses_cudagraphs

    config = resolve("baseline", "tiny", [f"train.compile_mode={mode}", f"train.compile={compile}"])
    assert uses_cudagraphs(config.train, cuda) is expected


def _eager_compiled(model: Decoder) -> Decoder:
    """`model.compile` through Dynamo with its eager backend: traced and guarded as in
    training, without Inductor's C++ build on the CPU."""
    model.compile = lambda mode: torch.nn.Module.compile(model, backend="eager")
    return model


def test_a_training_compile_resets_dynamo_only_for_another_shape(monkeypatch):
    """compile_for_training clears Dynamo's caches for a model of another compile shape
    (the recompile limit), keeps them for the same one (another seed or LR), and always
    clears them under CUDA graphs."""
    from lab.training import step

    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setattr(step, "_compiled_last", None)

    def compiled(variant: str, *overrides: str, seed: int = 0) -> bool:
        config = resolve(variant, "tiny", list(overrides), seed=seed)
        model = Decoder(config.model)
        model.compile = lambda **kwargs: None
        return step.compile_for_training(model, config)

    assert [compiled("baseline"), compiled("baseline", "train.lr=1e-2", seed=1),
            compiled("sdpa_elementwise_sigmoid_mul"),
            compiled("sdpa_elementwise_sigmoid_mul", "train.micro_batch_size=2"),
            compiled("sdpa_elementwise_sigmoid_mul", "train.compile_mode=max-autotune-no-cudagraphs"),
            compiled("baseline", "train.compile_mode=reduce-overhead"),
            compiled("baseline", "train.compile_mode=reduce-overhead")] == \
        [False, True, False, False, False, False, False]
    assert len(resets) == 6


def test_a_kept_compile_trains_the_new_models_weights_without_tracing_again(monkeypatch):
    """The next seed of the same variant reuses the graph Dynamo traced for the last one
    (nothing traced again) and computes with its own weights: its compiled loss is its eager
    loss, not the earlier model's."""
    from torch._dynamo.utils import counters

    from lab.training import step

    monkeypatch.setattr(step, "_compiled_last", None)
    losses = []
    for seed in (0, 1):
        config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", seed=seed)
        tokens = torch.randint(0, config.model.vocab_size, (2, 32),
                               generator=torch.Generator().manual_seed(0))
        torch.manual_seed(seed)
        model = _eager_compiled(Decoder(config.model))
        eager = model.forward(tokens, targets=tokens)  # `forward` called directly stays eager
        assert step.compile_for_training(model, config) == (seed == 1)
        counters.clear()
        compiled = model(tokens, targets=tokens)
        assert counters["stats"]["unique_graphs"] == (1 if seed == 0 else 0)
        torch.testing.assert_close(compiled, eager)
        losses.append(compiled.item())
    assert losses[0] != losses[1]
    torch.compiler.reset()
