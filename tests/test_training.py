"""lab/training.py: the LightningModule's own choices."""

from lab.config import resolve
from lab.training import LanguageModel


def test_setup_compiles_the_model_once_in_the_configured_mode(monkeypatch):
    config = resolve("baseline", "tiny", ["train.compile=true", "train.compile_mode=reduce-overhead"])
    module = LanguageModel(config)
    modes = []
    monkeypatch.setattr(module.model, "compile", lambda **kwargs: modes.append(kwargs["mode"]))
    module.setup("fit")
    module.setup("validate")
    assert modes == ["reduce-overhead"]
