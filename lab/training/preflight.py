"""What must hold before a run of a config starts on this machine, checked in one place
before anything is recorded: the run's `train.devices` GPUs are visible, and its loss
kernel (`train.fused_loss`, lab/model/loss.py) runs on the device it will train on.

`gatelab train` (lab/training/run.py), `gatelab check` (lab/check.py) and `gatelab bench`
(lab/bench.py) call `preflight` first; each failure is a LabError, one `error:` line.
"""

from __future__ import annotations

import torch

from lab.config import RunConfig
from lab.errors import LabError
from lab.model.loss import require as require_loss_kernel


def check_devices(devices: int) -> None:
    """train.devices GPUs must be visible here: without CUDA the Trainer would quietly train
    on one CPU process instead (train_run)."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices > max(1, available):
        where = f"{available} CUDA device(s) are visible" if available else \
            "no CUDA device is visible (a CPU run uses 1)"
        raise LabError(f"train.devices: {devices} devices per run, but {where}; allowed: "
                       f"1..{max(1, available)}")


def preflight(config: RunConfig, device: str) -> None:
    """`config` can run here on `device` ("cuda" or "cpu"): its devices are visible and its
    loss kernel runs there."""
    check_devices(config.train.devices)
    require_loss_kernel(config.train.fused_loss, device == "cuda")
