"""lab/training/module.py: the LightningModule's own choices; and the training step it shares
with the bench's bare loop (lab/training/step.py: optimizer, compile, CUDA graphs, windows,
loss)."""

import pytest
import torch

from lab.config import resolve
from lab.model.decoder import Decoder
from lab.model.gates import GateSpec
from lab.model.variants import VARIANTS, custom_variant
from lab.training.module import LanguageModel


def test_setup_compiles_the_model_once_in_the_configured_mode(monkeypatch):
    config = resolve("baseline", "tiny", ["train.compile=true", "train.compile_mode=reduce-overhead"])
    module = LanguageModel(config)
    modes = []
    monkeypatch.setattr(module.model, "compile", lambda **kwargs: modes.append(kwargs["mode"]))
    module.setup("fit")
    module.setup("validate")
    assert modes == ["reduce-overhead"]


@pytest.mark.slow
def test_each_run_in_one_process_gets_compiled_not_the_recompile_limits_eager_fallback(
        monkeypatch):
    """A grid worker trains many models in one process. Without a fresh Dynamo cache per run,
    the graphs of earlier runs count against the recompile limit and later models train
    eagerly (0.46M instead of 1.1M tokens/s on an H200). Dynamo with its eager backend here:
    the limit applies the same, with no Inductor compile."""
    from torch._dynamo.utils import counters

    from lab.training import module as module_file

    monkeypatch.setattr(module_file, "compile_model",
                        lambda model, mode: model.compile(backend="eager"))
    torch.compiler.reset()
    tokens = torch.randint(0, 64, (1, 16))
    with torch._dynamo.config.patch(recompile_limit=2):
        for variant in ["baseline", "sdpa_elementwise_sigmoid_mul", "sdpa_headwise_sigmoid_mul",
                        "value_elementwise_sigmoid_mul"]:
            run = LanguageModel(resolve(variant, "tiny", ["train.compile=true"]))
            run.setup("fit")
            counters.clear()
            run.model(tokens)
            assert counters["stats"]["unique_graphs"] >= 1, f"{variant} ran eagerly"
    torch.compiler.reset()


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


def test_lightning_module_groups_by_its_prefixed_names_too():
    """`configure_optimizers` passes `model.`-prefixed names; b still lands undecayed."""
    module = LanguageModel(resolve("sdpa_input_independent_sigmoid_mul", "tiny"))
    decayed, undecayed = module.configure_optimizers()["optimizer"].param_groups
    b = module.model.blocks[0].attn.gate_constant
    assert any(p is b for p in undecayed["params"]) and not any(p is b for p in decayed["params"])


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


def test_compiled_runs_evaluate_through_the_training_call_with_the_same_loss():
    """A compiled run evaluates with the training step's call (mean loss, grad mode on) so
    that it reuses that graph; the summed loss it records must equal the plain sum."""
    import torch

    from lab.training.module import LanguageModel

    config = resolve("baseline", "tiny")
    module = LanguageModel(config)
    windows = torch.randint(0, config.model.vocab_size, (4, config.model.context + 1),
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module._eval_step(windows, "val")
        plain = module._eval_sums.pop("val")
        module._compiled = True  # the path only; no compilation needed to check the numbers
        module._eval_step(windows, "val")
        via_training = module._eval_sums.pop("val")
    assert via_training[1] == plain[1] == 4 * config.model.context
    assert torch.allclose(via_training[0], plain[0], rtol=1e-5)
    assert not via_training[0].requires_grad


def test_evaluation_batches_are_whole_micro_batches(tmp_path, monkeypatch):
    """A shorter last batch would make a compiled model recompile inside validation (10-14 s
    at `small`, benchmarks/README.md); the remainder is left out when a whole batch exists."""
    from lab.data.windows import eval_windows
    from lab.training.corpus import open_data
    from lab.training.module import TokenDataModule

    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    store, config = open_data(resolve("baseline", "tiny", ["train.micro_batch_size=4",
                                                           "train.batch_size=4"]))
    context = config.model.context
    available = len(eval_windows(store, "valid", context, 10 ** 6))
    wanted = 4 * (available // 4) + 4  # more windows than the split has: a remainder is left
    config = resolve("baseline", "tiny", ["train.micro_batch_size=4", "train.batch_size=4",
                                          f"train.val_batches={wanted // 4}"])
    sizes = [len(b) for b in TokenDataModule(store, config).val_dataloader()]
    assert available % 4, "the split should leave a remainder for this test to mean anything"
    assert sizes and set(sizes) == {4} and sum(sizes) == 4 * (available // 4)


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


@pytest.mark.parametrize("mode, compile, cuda, expected", [
    ("reduce-overhead", "auto", True, True), ("max-autotune", True, True, True),
    ("default", "auto", True, False), ("max-autotune-no-cudagraphs", "auto", True, False),
    ("reduce-overhead", "auto", False, False), ("reduce-overhead", False, True, False)])
def test_which_runs_replay_cuda_graphs(mode, compile, cuda, expected):
    from lab.training.step import uses_cudagraphs

    config = resolve("baseline", "tiny", [f"train.compile_mode={mode}", f"train.compile={compile}"])
    assert uses_cudagraphs(config.train, cuda) is expected


def test_under_cuda_graphs_each_step_is_marked_and_the_kept_loss_is_a_copy(monkeypatch):
    """CUDA Graph Trees overwrite a graph's outputs at the next replay, and the evaluation's
    forward without backward would otherwise leave a backward pending: every training and
    evaluation step marks a new step, and the loss LossMonitor keeps is a copy. (The marks
    and copies themselves, on the CPU; the GPU test below trains grid cells with them.)"""
    from lab.training import module as module_file

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model_output = {}

    def step_loss(model, inputs, targets):
        lm_loss = model(inputs, targets=targets)
        model_output["lm_loss"] = lm_loss
        return lm_loss, lm_loss, {}

    monkeypatch.setattr(module_file, "step_loss", step_loss)
    module = LanguageModel(resolve("baseline", "tiny"))
    windows = torch.randint(0, 512, (2, 129))
    batch = (windows[:, :-1], windows[:, 1:])
    kept = module.training_step(batch, 0)["lm_loss"]
    assert marks == [] and kept.data_ptr() == model_output["lm_loss"].data_ptr()
    module._cudagraphs = module._compiled = True  # as setup leaves a run that replays graphs
    kept = module.training_step(batch, 0)["lm_loss"]
    assert marks == [1] and kept.data_ptr() != model_output["lm_loss"].data_ptr()
    assert kept == model_output["lm_loss"].detach()
    module._eval_step(windows, "val")
    assert marks == [1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs")
def test_grid_cells_train_with_cuda_graphs_and_the_labs_callbacks(store):
    """`train.compile_mode=reduce-overhead` in real grid cells, with every callback that runs
    inside training (validation through the training graph, checkpoints, the periodic probe
    analysis, the loss monitor keeping losses across steps): the cells finish and learn
    what the default mode's cells learn, to bf16 rounding."""
    from gridkit import tiny_grid
    from lab.experiments.grid.run import GridOptions, run_grid
    from lab.experiments.schema import grid_from_dict

    every = {"train.analysis_every": 8, "train.checkpoint_every": 8, "train.compile": True}
    ppl = {}
    for mode in ("default", "reduce-overhead"):
        spec = grid_from_dict(tiny_grid(f"graphs-{mode}", ["baseline", "sdpa_headwise_sigmoid_mul"],
                                        **every, **{"train.compile_mode": mode}))
        summary = run_grid(spec, GridOptions(gpus="0", runs_per_gpu=1, check=False, quiet=True))
        assert [o.status for o in summary.outcomes] == ["FINISHED", "FINISHED"]
        ppl[mode] = [o.val_ppl for o in summary.outcomes]
    assert ppl["reduce-overhead"] == pytest.approx(ppl["default"], rel=0.03)
