"""lab/reports/analyze.py: `gatelab analyze` on a checkpoint, named by its run or by its
file: the analysis of the checkpoint's weights with the command's windows and long-context
factors, logged to the run where the store holds it and written to a folder where asked or
where there is no run; its one-line refusals; the summary it prints. (The metrics
themselves: tests/unit/test_analysis.py, which also runs the command after a real training run.)"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lab import records
from lab.analysis.metrics import Analysis, analyze
from lab.config import resolve
from lab.errors import LabError
from lab.model.decoder import Decoder
from lab.reports.analyze import analyze_target, summary
from lab.training.corpus import open_data

# A small context keeps the analysis to a second; the synthetic corpus is the shared cache's.
OVERRIDES = {"model.context": "16", "train.batch_size": "4"}
STEP = 7


def checkpoint(path: Path, overrides: dict | None = None) -> tuple:
    """A checkpoint as the lab's training leaves it (a Lightning checkpoint of
    lab/training/module.py's LanguageModel: the Decoder's tensors under `model.`, the global
    step, the RunConfig) of a gated tiny model with seeded random weights; (config, model)."""
    config = resolve("sdpa_elementwise_sigmoid_mul", "tiny", {**OVERRIDES, **(overrides or {})},
                     tokens=4096)
    torch.manual_seed(0)
    model = Decoder(config.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "global_step": STEP, "hyper_parameters": {"config": config.to_dict()}}, path)
    return config, model


def reference(config, model, windows: int, factors: tuple[int, ...]) -> Analysis:
    """The analysis computed directly on the same weights and data."""
    return analyze(model, open_data(config)[0], config, windows=windows, factors=factors)


def test_a_checkpoint_file_is_analyzed_with_the_commands_windows_into_the_out_folder(
        store, tmp_path):
    config, model = checkpoint(tmp_path / "from-elsewhere" / "last.ckpt")
    run_id, result, files = analyze_target(str(tmp_path / "from-elsewhere" / "last.ckpt"),
                                           windows=2, long_context="2", out="out")
    assert run_id is None and not result.skipped
    expected = reference(config, model, windows=2, factors=(2,)).metrics
    assert result.metrics == pytest.approx(expected, nan_ok=True)
    assert "long/ppl_2x_yarn" in result.metrics and not [
        name for name in result.metrics if name.startswith("long/ppl_4x")]  # only --long-context
    assert files[0] == str(Path("out") / "analysis.json")
    written = json.loads((tmp_path / "out" / "analysis.json").read_text())["metrics"]
    assert written.keys() == result.metrics.keys()
    assert all(math.isclose(written[k], v) or math.isnan(v) for k, v in result.metrics.items())
    assert all(Path(f).is_file() and Path(f).parent == Path("out") for f in files)
    assert any(f.endswith(".png") for f in files)


def test_without_a_run_or_out_the_folder_is_named_after_the_checkpoint(store, tmp_path):
    checkpoint(tmp_path / "step7.ckpt")
    run_id, _, files = analyze_target(str(tmp_path / "step7.ckpt"), windows=1, long_context="")
    assert run_id is None
    assert (tmp_path / "analysis-step7" / "analysis.json").is_file()
    assert files[0] == str(Path("analysis-step7") / "analysis.json")


def test_a_run_of_the_store_gets_the_metrics_at_its_checkpoints_step(store, tmp_path):
    client = records.client(store)
    run = client.create_run(client.create_experiment("analyzed")).info.run_id
    config, model = checkpoint(records.checkpoint_dir(run) / "last.ckpt")
    run_id, result, files = analyze_target(run[:8], windows=2, long_context="")
    assert run_id == run
    assert files and all(f.startswith("analysis/") for f in files)
    logged = {a.path for a in client.list_artifacts(run, "analysis")}
    assert set(files) <= logged and "analysis/analysis.json" in logged
    expected = reference(config, model, windows=2, factors=()).metrics
    name = "sink/first_token_attn"
    history = client.get_metric_history(run, name)
    assert [m.step for m in history] == [STEP]
    assert history[0].value == pytest.approx(expected[name])
    assert not list(tmp_path.glob("analysis-*"))  # no folder unless --out


def test_a_run_and_out_together_get_both(store, tmp_path):
    client = records.client(store)
    run = client.create_run(client.create_experiment("both")).info.run_id
    checkpoint(records.checkpoint_dir(run) / "last.ckpt")
    _, _, files = analyze_target(run, windows=1, long_context="", out=str(tmp_path / "copy"))
    assert "analysis/analysis.json" in files and str(tmp_path / "copy" / "analysis.json") in files


def test_another_stores_checkpoint_named_by_its_path_is_analyzed_without_a_run(store,
                                                                              tmp_path):
    other = tmp_path / "elsewhere" / "checkpoints" / ("ab" * 16) / "last.ckpt"
    checkpoint(other)
    run_id, _, files = analyze_target(str(other), windows=1, long_context="")
    assert run_id is None and files[0] == str(Path("analysis-last") / "analysis.json")


def test_a_run_id_the_store_lacks_is_one_line_naming_the_store(store):
    missing = "cd" * 16
    checkpoint(records.checkpoint_dir(missing) / "last.ckpt")
    with pytest.raises(LabError) as refused:
        analyze_target(missing, windows=1, long_context="")
    assert str(refused.value) == (f"analyze: run {missing} is not in the tracking store {store} "
                                  "(pass --tracking-uri, or the checkpoint path with --out)")


def test_data_of_another_vocabulary_is_refused_before_any_analysis(store, tmp_path):
    checkpoint(tmp_path / "last.ckpt", {"model.vocab_size": "256", "data.vocab_size": "512"})
    with pytest.raises(LabError) as refused:
        analyze_target(str(tmp_path / "last.ckpt"), windows=1, long_context="", out="out")
    assert str(refused.value) == ("analyze: the data 'synthetic' has vocabulary 512, the "
                                  "checkpoint 256")
    assert not (tmp_path / "out").exists()


def test_a_bad_option_is_refused_before_the_checkpoint_is_read(store, tmp_path):
    with pytest.raises(LabError, match=r"^analyze --windows: must be a non-negative integer, "
                                       r"got -1$"):
        analyze_target(str(tmp_path / "absent.ckpt"), windows=-1)
    checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(LabError, match=r"^train\.long_context_factors"):
        analyze_target(str(tmp_path / "last.ckpt"), windows=1, long_context="two", out="out")


def test_the_summary_prints_the_headline_numbers_sorted_without_the_per_layer_ones():
    result = Analysis(metrics={"sink/first_token_attn": 0.123456, "act/max_mean": 12345.678,
                               "layers/sink/first_token_attn/layer_0": 0.5, "gate/mean": 0.25})
    assert summary(result).splitlines() == [
        f"{'act/max_mean':36s} 1.235e+04", f"{'gate/mean':36s} 0.25",
        f"{'sink/first_token_attn':36s} 0.1235"]
    assert summary(dataclasses.replace(result, skipped="non-finite weights")) == \
        "analysis skipped: non-finite weights"
