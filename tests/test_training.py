"""lab/training.py: the LightningModule's own choices."""

import torch

from lab.config import resolve
from lab.model import Decoder
from lab.training import LanguageModel


def test_setup_compiles_the_model_once_in_the_configured_mode(monkeypatch):
    config = resolve("baseline", "tiny", ["train.compile=true", "train.compile_mode=reduce-overhead"])
    module = LanguageModel(config)
    modes = []
    monkeypatch.setattr(module.model, "compile", lambda **kwargs: modes.append(kwargs["mode"]))
    module.setup("fit")
    module.setup("validate")
    assert modes == ["reduce-overhead"]


def test_adamw_decays_matrices_only_and_skips_frozen_parameters():
    from lab.training import adamw

    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", ["train.weight_decay=0.1", "train.lr=0.01"])
    model = Decoder(config.model)
    model.norm.weight.requires_grad_(False)
    decayed, undecayed = adamw(model.parameters(), config, fused=False).param_groups
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert decayed["lr"] == 0.01 and decayed["eps"] == config.train.eps
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert model.embed.weight in decayed["params"]  # the tied embedding / LM head
    assert all(p.ndim == 1 and p is not model.norm.weight for p in undecayed["params"])
    assert len(undecayed["params"]) == sum(1 for p in model.parameters() if p.ndim == 1) - 1


def test_step_loss_adds_the_moe_router_losses_to_the_lm_loss():
    from lab.training import step_loss

    config = resolve("baseline", "moe-tiny")
    model = Decoder(config.model)
    tokens = torch.randint(0, config.model.vocab_size, (2, 17))
    loss, lm_loss, aux_losses = step_loss(model, tokens[:, :-1], tokens[:, 1:])
    assert aux_losses  # the router's balance and z losses
    torch.testing.assert_close(loss, lm_loss + sum(aux_losses.values()))
    torch.testing.assert_close(lm_loss, model(tokens[:, :-1], targets=tokens[:, 1:]))


def test_train_sampler_draws_the_runs_windows_with_bos_prefix(tmp_path, monkeypatch):
    from lab.run import open_data
    from lab.training import train_sampler

    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))
    store, config = open_data(resolve("baseline", "tiny", ["data.bos_prefix=true"]))
    inputs, _ = train_sampler(store, config).batch(0)
    assert inputs.shape == (config.train.micro_batch, config.model.context)
    assert (inputs[:, 0] == store.eos_id).all()  # end-of-text serves as BOS
