"""Where the lab path synchronises the host with the GPU during training steps.

Trains the lab default path (lab.training.run.train_run) for a few dozen steps with
torch.cuda.set_sync_debug_mode("warn") switched on after the first steps, and prints each
distinct synchronising call site once, with the Python frames that led to it (library frames
included, the innermost few). A sync per step stops the host from queueing work ahead of the
GPU: the step then costs host time plus GPU time instead of the larger of the two.

    python3 benchmarks/sync_points.py [preset] [steps]
"""

import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.bench import bench_config  # noqa: E402
from lab.training.run import train_run  # noqa: E402

sites: Counter = Counter()
stacks: dict = {}


def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message).lower():
        return
    frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
    key = tuple((f.filename, f.lineno) for f in frames[-6:])
    sites[key] += 1
    stacks[key] = frames[-8:]


class SyncWatch(L.Callback):
    """Turns the watch on after `after` steps (compilation and the first step excluded)."""

    def __init__(self, after: int):
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.after:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "small"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    warnings.simplefilter("always")
    warnings.showwarning = record
    config = bench_config("baseline", preset, steps, 5, "synthetic", [])
    uri = f"sqlite:///{tempfile.mkdtemp()}/sync.db"
    train_run(config, uri, experiment="sync", quiet=True, callbacks=[SyncWatch(5)])
    watched = steps
    print(f"{preset}: {watched} watched steps; synchronising call sites (count, stack):")
    for key, count in sites.most_common():
        print(f"\n{count} times ({count / watched:.2f} per step):")
        for frame in stacks[key]:
            print(f"    {frame.filename}:{frame.lineno} {frame.name}: {frame.line}")
    if not sites:
        print("none")


if __name__ == "__main__":
    main()
