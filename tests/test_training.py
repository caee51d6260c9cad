"""lab/training.py: the LightningModule's own choices."""

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
