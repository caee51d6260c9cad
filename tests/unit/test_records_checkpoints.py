"""lab/records/checkpoints.py: a checkpoint read back into its config, the Decoder's weights
and its step; a file that is none is one error naming the command, and one that would run
code when loaded is refused before any of it runs; a run id prefix names a run's checkpoint
as a git prefix names a commit. (Paths by run id, folder or file: tests/unit/test_export.py;
analyze, export and resume refusing a poisoned checkpoint end to end: tests/integration/test_reliability.py.)"""

from pathlib import Path

import pytest
import torch

from lab.config import resolve
from lab.errors import LabError
from lab.records.checkpoints import load_checkpoint, read_checkpoint, run_id_from_prefix


def test_read_checkpoint_gives_the_config_the_decoder_state_and_the_step(tmp_path):
    config = resolve("sdpa_headwise_sigmoid_mul", "tiny", data="synthetic")
    weight = torch.arange(6.0).view(2, 3)
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"config": config.to_dict()}, "global_step": 7,
                "state_dict": {"model.embed.weight": weight, "model.blocks.0.attn.in_proj.weight":
                               weight + 1, "monitor.something": weight}}, path)
    read_config, state, step = read_checkpoint(path, "export")
    assert read_config == config and step == 7
    assert set(state) == {"embed.weight", "blocks.0.attn.in_proj.weight"}  # the Decoder's only
    assert torch.equal(state["blocks.0.attn.in_proj.weight"], weight + 1)


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_a_file_that_is_no_lab_checkpoint_is_one_error_naming_the_command(tmp_path, content):
    path = tmp_path / "other.ckpt"
    if content is None:  # a real torch file, without the lab's keys
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(LabError, match=rf"^analyze: {path} is not a gatelab training checkpoint"):
        read_checkpoint(path, "analyze")


def test_a_run_id_prefix_is_normalised_and_what_is_no_prefix_passes_through(tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    assert run_id_from_prefix("abc", "export") == "abc"  # no checkpoints at all yet
    full = "ab" * 16
    (tmp_path / "mlruns" / "checkpoints" / full).mkdir(parents=True)
    (tmp_path / "mlruns" / "checkpoints" / full / "last.ckpt").write_bytes(b"")
    assert run_id_from_prefix("  ABAB ", "export") == full  # case and spaces do not matter
    assert run_id_from_prefix(full, "export") == full     # 32 digits are an id already
    assert run_id_from_prefix("my-run", "export") == "my-run"  # not hex: not a prefix


def test_an_ambiguous_prefix_lists_ten_matches_and_counts_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("GATELAB_STORE", str(tmp_path / "mlruns"))
    ids = [f"c{i:031x}" for i in range(12)]
    for run_id in ids:
        (tmp_path / "mlruns" / "checkpoints" / run_id).mkdir(parents=True)
        (tmp_path / "mlruns" / "checkpoints" / run_id / "last.ckpt").write_bytes(b"")
    with pytest.raises(LabError) as error:
        run_id_from_prefix("c", "export")
    assert str(error.value) == (f"export: run id prefix 'c' matches 12 runs with a checkpoint: "
                                f"{', '.join(ids[:10])} and 2 more; give more characters")


class TouchOnLoad:
    """Unpickled by a full unpickler, this would create a file: code run by loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused_before_any_of_it_runs(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "extra": TouchOnLoad(marker)}, path)
    with pytest.raises(LabError, match=rf"^resume: {path} refused: loading it would create ") \
            as refused:
        load_checkpoint(path, "resume")
    assert {"pathlib.Path", "builtins.getattr"} <= set(
        str(refused.value).split(" would create ")[1].split(", not only")[0].split(", "))
    assert not marker.exists()
    torch.save({"global_step": 3, "weights": torch.ones(2)}, path)
    assert load_checkpoint(path, "resume")["global_step"] == 3
