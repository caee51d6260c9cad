"""lab/training/module.py: the LightningModule's own choices (its setup's compile, its
optimizer over prefixed names, evaluation through the training call, CUDA-graph step marks);
the step it shares with the bench is tests/unit/test_step.py's."""

import pytest
import torch

from lab.config import resolve
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

    from lab.training import step

    monkeypatch.setattr(step, "compile_model", lambda model, mode: model.compile(backend="eager"))
    monkeypatch.setattr(step, "_compiled_last", None)
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


def test_lightning_module_groups_by_its_prefixed_names_too():
    """`configure_optimizers` passes `model.`-prefixed names; b still lands undecayed."""
    module = LanguageModel(resolve("sdpa_input_independent_sigmoid_mul", "tiny"))
    decayed, undecayed = module.configure_optimizers()["optimizer"].param_groups
    b = module.model.blocks[0].attn.gate_constant
    assert any(p is b for p in undecayed["params"]) and not any(p is b for p in decayed["params"])


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


def test_the_graph_deciding_trainer_options_follow_the_config():
    """train_run's Trainer and the grid's compile-ahead take these from one place
    (lab/training/module.py graph_trainer_options): a compiled run evaluates under grad mode
    through its training graph, so not in inference mode."""
    from lab.training.module import graph_trainer_options

    eager = resolve("baseline", "tiny", ["train.batch_size=16", "train.micro_batch_size=8"])
    assert graph_trainer_options(eager, cuda=False) == {
        "precision": "32-true", "accumulate_grad_batches": 2,
        "deterministic": eager.train.deterministic, "inference_mode": True}
    compiled = resolve("baseline", "tiny", ["train.compile=true"])
    options = graph_trainer_options(compiled, cuda=True)
    assert options["precision"] == "bf16-mixed" and options["inference_mode"] is False
