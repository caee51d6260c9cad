"""lab/training/callbacks.py: the run's logged throughput is training time only, as measured,
against the GPU's peak as the lab's table or Lightning's gives it."""

import time

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from gridkit import store  # noqa: F401  (fixture)
from lab.model.flops import peak_tflops
from lab.training.callbacks import device_peak_tflops


class StepClock(L.Callback):
    """An independent stopwatch: the end of every optimizer step, and each validation."""

    def __init__(self):
        self.step_ends, self.validations = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_ends.append((trainer.global_step, time.perf_counter()))

    def on_validation_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.validations.append(time.perf_counter() - self._started)


class SlowValidation(L.Callback):
    """Validation that takes far longer than training, as a large validation set does."""

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            time.sleep(0.25)


def test_logged_tokens_per_s_is_steps_times_tokens_over_measured_step_time(store):  # noqa: F811
    from lab.config import resolve
    from lab.training.run import train_run

    config = resolve("baseline", "tiny", {"model.context": 32, "train.batch_size": 8,
                                          "train.log_every": 5, "train.val_every": 10},
                     data="synthetic", tokens=40 * 8 * 32)
    clock = StepClock()
    result = train_run(config, store, "throughput", quiet=True, callbacks=[clock, SlowValidation()])
    (first_step, start), (last_step, end) = clock.step_ends[0], clock.step_ends[-1]
    # every in-fit validation falls between the first and the last step but the one at the end
    assert len(clock.validations) == 4
    training_seconds = end - start - sum(clock.validations[:3])
    expected = (last_step - first_step) * 8 * 32 / training_seconds
    logged = result.metrics["throughput/tokens_per_s_mean"]
    assert abs(logged / expected - 1) < 0.05, (logged, expected)
    # the per-interval series is logged too, and none of it counts a validation's sleep
    history = MlflowClient(store).get_metric_history(result.run_id, "throughput/tokens_per_s")
    assert history and min(m.value for m in history) > 0.5 * expected
    assert result.metrics["time/first_step_s"] > 0
    learning_rates = MlflowClient(store).get_metric_history(result.run_id, "lr")
    assert len(learning_rates) == 8 and all(0 < m.value <= config.train.lr for m in learning_rates)


@pytest.mark.parametrize("name, peak, from_lightning", [
    ("NVIDIA H100 80GB HBM3", 989.4, True),
    ("NVIDIA H100 PCIe", 756.0, True),
    ("NVIDIA A100-SXM4-80GB", 312.0, True),
    ("NVIDIA L4", 121.0, True),
    ("NVIDIA H200", 989.4, False),       # Lightning has no entry for this name
    ("NVIDIA H100 NVL", 989.4, False),   # Lightning's is the with-sparsity figure
    ("NVIDIA L40S", 362.0, False),       # Lightning reads it as an L4
    ("Some Future GPU", None, False),
])
def test_the_gpus_peak_is_the_labs_entry_else_lightnings(monkeypatch, name, peak, from_lightning):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops() == peak
    assert (peak_tflops(name) is None) == (from_lightning or peak is None)


def test_no_gpu_no_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_peak_tflops() is None
