"""lab/check.py: `gatelab check` passes on the lab's fast path, catches a planted wrong
kernel, and guards the grid; on a GPU, every variant at `small`."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lab import check
from lab.check import HEADER, CheckRow, check_before_training, format_row, relative_error
from lab.cli import main
from lab.errors import LabError


def test_relative_error_is_normwise_and_refuses_non_finite():
    reference = torch.tensor([3.0, 4.0])
    assert relative_error(reference, reference) == 0
    assert relative_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert relative_error(torch.tensor([math.nan, 4.0]), reference) == math.inf


def test_check_passes_on_the_cpu_fast_path_and_says_no_accelerator(capsys):
    assert main(["check", "--preset", "tiny", "--variants", "baseline,sdpa_headwise_sigmoid_mul"]) == 0
    out = capsys.readouterr().out
    assert "no accelerator was checked" in out and "check passed" in out
    assert "sdpa_headwise_sigmoid_mul" in out and "flash-cpu" in out


@pytest.mark.parametrize("planted", ["scaled", "noisy", "nan"])
def test_a_planted_wrong_kernel_fails_the_check(monkeypatch, capsys, planted):
    real_sdpa = F.scaled_dot_product_attention

    def wrong_sdpa(*args, **kwargs):
        out = real_sdpa(*args, **kwargs)
        if planted == "scaled":
            return out * 1.05
        if planted == "noisy":
            return out + 0.02 * torch.randn_like(out)
        return out.masked_fill(torch.rand_like(out) < 0.01, math.nan)

    monkeypatch.setattr(F, "scaled_dot_product_attention", wrong_sdpa)
    assert main(["check", "--preset", "tiny", "--variants", "sdpa_headwise_sigmoid_mul"]) == 1
    captured = capsys.readouterr()
    failure = [line for line in captured.err.splitlines() if line.startswith("check failed: ")]
    assert failure, captured.err
    # names the variant, the mode, the backend and the tensor
    assert "sdpa_headwise_sigmoid_mul eager (SDPA backend flash-cpu): logits relative error" in failure[0]
    assert "FAIL" in captured.out


def test_the_fast_side_uses_the_loss_kernel_training_uses(monkeypatch, capsys):
    """`--set train.fused_loss=liger`: the fast model computes its loss by that kernel and the
    reference by PyTorch's, so a wrong fused loss fails the check. Planted here as a loss
    5% too large in place of Liger's (which needs CUDA)."""
    from lab.model import loss as loss_module

    def wrong_fused(hidden, weight, targets, reduction, accum_dtype):
        return 1.05 * F.cross_entropy((hidden @ weight.T).float(), targets, reduction=reduction)

    monkeypatch.setattr(loss_module, "_liger", lambda: wrong_fused)
    monkeypatch.setattr("lab.check.preflight", lambda config, device: None)
    assert main(["check", "--preset", "tiny", "--variants", "baseline",
                 "--set", "train.fused_loss=liger"]) == 1
    failure = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("check failed: ")]
    assert failure and "baseline eager (SDPA backend flash-cpu, loss liger): loss relative " \
        "error" in failure[0]
    # On this machine, unplanted: refused before anything is checked.
    monkeypatch.undo()
    assert main(["check", "--preset", "tiny", "--variants", "baseline",
                 "--set", "train.fused_loss=liger"]) == 2
    assert "train.fused_loss=liger: " in capsys.readouterr().err


def test_the_reference_never_calls_sdpa(monkeypatch):
    """The reference side must not go through F.scaled_dot_product_attention at all, or a
    wrong fused kernel could hide on both sides."""
    from lab.check import _reference
    from lab.config import resolve
    from lab.model.decoder import Decoder

    def refuse(*args, **kwargs):
        raise AssertionError("the reference called SDPA")

    model = Decoder(resolve("baseline", "tiny").model)
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    windows = torch.randint(0, 512, (2, 17))
    _reference(model, windows[:, :-1], windows[:, 1:])  # raises if SDPA is reached


def test_bad_check_options_are_one_line_errors(capsys):
    assert main(["check", "--preset", "tiny", "--variants", "no_such_variant"]) == 2
    assert main(["check", "--preset", "tiny", "--modes", "fast"]) == 2
    assert main(["check", "--preset", "tiny", "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def as_if_on_a_gpu(monkeypatch, tmp_path, device="NVIDIA H100 80GB HBM3; torch 2.11.0"):
    """check_before_training as on a GPU machine (`device` its accelerator_identity), with
    the lab's cache (where passes are kept) under tmp_path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check, "accelerator_identity", lambda: device)
    monkeypatch.setenv("GATELAB_CACHE", str(tmp_path / "cache"))


def test_grid_guard_refuses_to_start_when_the_check_fails(monkeypatch, tmp_path):
    """On a GPU machine the grid and the sweep run `gatelab check` in a child process first;
    its failure becomes one LabError line naming what failed."""
    as_if_on_a_gpu(monkeypatch, tmp_path)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return SimpleNamespace(returncode=1, stdout="", stderr=(
            "check failed: sdpa_headwise_sigmoid_mul eager (SDPA backend cudnn): gradient of "
            "blocks.0.attn.in_proj.weight relative error 0.83 > tolerance 0.1\n"))

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(LabError, match=r"check failed, nothing started: sdpa_headwise_sigmoid_mul "
                                       r"eager \(SDPA backend cudnn\).*--no-check"):
        check_before_training("small", ["baseline", "sdpa_headwise_sigmoid_mul"],
                              ["train.compile_mode=default"], quiet=True)
    assert calls[0][1:] == ["-m", "lab", "check", "--preset", "small", "--variants",
                            "baseline,sdpa_headwise_sigmoid_mul", "--set", "train.compile_mode=default"]
    assert not list((tmp_path / "cache").glob("checks/*")), "a failed check keeps no pass"


def check_output(variants) -> str:
    """What `gatelab check` prints on success: the header, a row per variant and mode."""
    rows = [format_row(CheckRow(v, mode, "cudnn", 1e-3, 1e-4, 1e-2, "embed.weight", 1.0))
            for v in variants for mode in ("eager", "compiled")]
    return "\n".join([HEADER, *rows, "check passed: every variant's fast path is within "
                      "tolerance of the reference"]) + "\n"


def recording_check(monkeypatch) -> list[list[str]]:
    """subprocess.run replaced by a passing `gatelab check`; returns the variants of each call."""
    calls = []

    def fake_run(command, **kwargs):
        variants = command[command.index("--variants") + 1].split(",")
        calls.append(variants)
        return SimpleNamespace(returncode=0, stdout=check_output(variants), stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


def test_a_pass_is_kept_and_not_repeated_for_the_same_code_and_device(monkeypatch, tmp_path):
    as_if_on_a_gpu(monkeypatch, tmp_path)
    calls = recording_check(monkeypatch)
    lines = []
    first = check_before_training("small", ["baseline", "sdpa_headwise_sigmoid_mul"], [],
                                  log=lines.append)
    assert calls == [["baseline", "sdpa_headwise_sigmoid_mul"]]
    assert "sdpa_headwise_sigmoid_mul compiled" in " ".join(first.split())
    # A second grid on the same machine and code: no check, the pass's rows in the table.
    lines.clear()
    again = check_before_training("small", ["sdpa_headwise_sigmoid_mul", "baseline"], [],
                                  log=lines.append)
    assert len(calls) == 1
    assert any("2 variant(s) passed before" in line and "--check forces it" in line
               for line in lines)
    assert sum(line.split()[:1] == ["baseline"] for line in again.splitlines()) == 2
    # Only a variant not passed yet is checked; --check (force) checks them all again.
    check_before_training("small", ["baseline", "value_headwise_sigmoid_mul"], [], quiet=True)
    assert calls[-1] == ["value_headwise_sigmoid_mul"]
    check_before_training("small", ["baseline"], [], quiet=True, force=True)
    assert calls[-1] == ["baseline"]


@pytest.mark.parametrize("changed", ["code", "device", "preset", "overrides"])
def test_a_pass_does_not_hold_for_other_code_device_preset_or_overrides(monkeypatch, tmp_path,
                                                                         changed):
    as_if_on_a_gpu(monkeypatch, tmp_path)
    calls = recording_check(monkeypatch)
    check_before_training("small", ["baseline"], ["train.lr=1e-3"], quiet=True)
    preset, overrides = "small", ["train.lr=1e-3"]
    if changed == "code":
        monkeypatch.setattr(check, "code_hash", lambda: "0123456789abcdef")
    elif changed == "device":
        monkeypatch.setattr(check, "accelerator_identity", lambda: "NVIDIA H200; torch 2.11.0")
    elif changed == "preset":
        preset = "base"
    else:
        overrides = ["train.lr=2e-3"]
    check_before_training(preset, ["baseline"], overrides, quiet=True)
    assert calls == [["baseline"], ["baseline"]]


def test_the_code_hash_reads_the_model_and_training_code(monkeypatch, tmp_path):
    """The hash covers lab/model/*.py and lab/training/*.py (and the check itself): an edit
    to any of them is a new hash, so a pass from before the edit no longer counts."""
    root = Path(check.__file__).resolve().parent
    package = tmp_path / "lab"
    for pattern in check.CHECKED_CODE:
        for path in root.glob(pattern):
            target = package / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    monkeypatch.setattr(check, "__file__", str(package / "check.py"))
    before = check.code_hash()
    assert before == check.code_hash()
    with open(package / "model" / "gates.py", "a") as edited:
        edited.write("\n# an edit\n")
    assert check.code_hash() != before


def test_grid_guard_does_nothing_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no check without CUDA"))
    check_before_training("small", ["baseline"], [], quiet=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the GPU fast path")
def test_every_variant_passes_on_the_gpu_at_small():
    result = subprocess.run([sys.executable, "-m", "lab", "check", "--preset", "small",
                             "--variants", "all"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed" in result.stdout and "no accelerator" not in result.stdout


@pytest.mark.parametrize("flags, check_option", [([], True), (["--check"], "force"),
                                                  (["--no-check"], False)])
def test_grid_and_sweep_pass_check_and_no_check_on(monkeypatch, flags, check_option):
    from lab.experiments.grid import run as grid
    from lab.experiments.sweep import run as sweep

    seen = {}

    def run_grid(spec, options):
        seen["grid"] = options.check
        return SimpleNamespace(failed=[])

    def run_sweep(*args, **kwargs):
        seen["sweep"] = kwargs["check"]
        return {}

    monkeypatch.setattr(grid, "run_grid", run_grid)
    monkeypatch.setattr(grid, "describe_summary", lambda summary: "")
    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    monkeypatch.setattr("lab.reports.sweep_report.format_summary", lambda summaries: "")
    root = Path(__file__).resolve().parents[2]
    main(["grid", str(root / "ablations" / "smoke.yaml"), *flags])
    main(["sweep", str(root / "sweeps" / "lr.yaml"), *flags])
    assert seen == {"grid": check_option, "sweep": check_option}
