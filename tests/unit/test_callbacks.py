"""lab/training/callbacks.py: the loss history one optimizer step at a time, divergence stops
the run, a checkpoint is never written of diverged weights, the run's logged throughput is
training time only, as measured, against the GPU's peak as the lab's table or Lightning's
gives it."""

import math
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab.config import resolve
from lab.model.flops import peak_tflops
from lab.training.callbacks import AtomicCheckpoint, LossMonitor, device_peak_tflops


class FakeTrainer(SimpleNamespace):
    """What LossMonitor and AtomicCheckpoint read of the Trainer, and the metrics it logged."""

    def __init__(self, **fields):
        logged = []
        super().__init__(global_step=0, lr_scheduler_configs=[], is_global_zero=True,
                         should_stop=False, logged=logged,
                         logger=SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m))),
                         **fields)


def feed(monitor: LossMonitor, trainer: FakeTrainer, step_losses: list[list[float]]) -> None:
    """One optimizer step per entry, its micro-batches' losses as the training step returns them."""
    module = SimpleNamespace(grad_norm=torch.tensor(1.5))
    for micro_losses in step_losses:
        trainer.global_step += 1
        for loss in micro_losses:
            monitor.on_train_batch_end(trainer, module, {"lm_loss": torch.tensor(loss)}, None, 0)


def monitor_for(**train) -> LossMonitor:
    config = resolve("baseline", "tiny", {f"train.{k}": v for k, v in train.items()})
    return LossMonitor(config, accumulate=2)


def test_the_loss_history_is_one_mean_per_optimizer_step_flushed_every_log_every_steps():
    monitor, trainer = monitor_for(log_every=2), FakeTrainer()
    monitor.on_train_start(trainer, None)
    feed(monitor, trainer, [[4.0, 6.0], [3.0, 3.0], [2.0, 4.0]])
    assert monitor.steps == [1, 2] and monitor.losses == [5.0, 3.0]  # the third still pending
    assert [(step, m["train/loss"], m["train/grad_norm"]) for step, m in trainer.logged] == \
        [(2, 3.0, 1.5)]
    # The checkpoint carries the pending step too, and a resumed monitor has the whole history.
    resumed = monitor_for(log_every=2)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.steps == [1, 2, 3] and resumed.losses == [5.0, 3.0, 3.0]
    assert resumed.grad_norms == [1.5, 1.5, 1.5]


def test_a_non_finite_loss_or_patience_steps_above_the_ceiling_stop_the_run():
    monitor, trainer = monitor_for(log_every=1), FakeTrainer()
    monitor.on_train_start(trainer, None)
    feed(monitor, trainer, [[3.0, 3.0], [math.nan, 1.0]])
    assert monitor.diverged_step == 2 and trainer.should_stop
    assert all(math.isfinite(v) for _, m in trainer.logged for v in m.values())  # NaN not logged

    monitor = monitor_for(log_every=1, divergence_loss_ceiling=5.0, divergence_patience=3)
    trainer = FakeTrainer()
    monitor.on_train_start(trainer, None)
    feed(monitor, trainer, [[6.0, 6.0], [7.0, 7.0], [4.0, 4.0], [6.0, 6.0], [6.0, 6.0]])
    assert monitor.diverged_step is None and not trainer.should_stop  # step 3 broke the streak
    feed(monitor, trainer, [[9.0, 9.0]])
    assert monitor.diverged_step == 6 and trainer.should_stop


@pytest.mark.parametrize("diverged, weight, written", [(False, 1.0, True), (True, 1.0, False),
                                                      (False, math.inf, False)])
def test_no_checkpoint_is_written_of_a_diverged_run_or_non_finite_weights(tmp_path, diverged,
                                                                          weight, written):
    monitor = monitor_for()
    monitor.diverged_step = 3 if diverged else None
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight.fill_(weight)
    trainer = FakeTrainer(lightning_module=module,
                          save_checkpoint=lambda path, weights_only: path.write_bytes(b"state"))
    AtomicCheckpoint(tmp_path, every=1, loss_monitor=monitor).save(trainer)
    # written whole under its final name (the temporary file renamed), or nothing at all
    assert sorted(p.name for p in tmp_path.iterdir()) == (["last.ckpt"] if written else [])


def test_the_interval_is_logged_in_the_background_and_waited_for_before_a_checkpoint(tmp_path):
    """Where the logger writes in the background (lab/training/run.py RunLogger), the monitor
    uses it, and a checkpoint, the end of training and a stop each wait for those writes
    first: a resume never starts after metrics that are not in the store."""
    events = []
    logger = SimpleNamespace(
        log_metrics=lambda m, step: events.append(("blocking", step)),
        log_metrics_in_background=lambda m, step: events.append(("background", step)),
        wait_for_writes=lambda: events.append(("waited", None)))
    module = torch.nn.Linear(2, 2)
    trainer = FakeTrainer(lightning_module=module,
                          save_checkpoint=lambda path, weights_only: (
                              events.append(("checkpoint", None)), path.write_bytes(b"state")))
    trainer.logger = logger
    monitor = monitor_for(log_every=1)
    monitor.on_train_start(trainer, None)
    feed(monitor, trainer, [[4.0, 6.0]])
    AtomicCheckpoint(tmp_path, every=1, loss_monitor=monitor).save(trainer)
    monitor.on_exception(trainer, None, KeyboardInterrupt())
    feed(monitor, trainer, [[3.0, 3.0]])
    monitor.on_train_end(trainer, None)
    assert events == [("background", 1), ("waited", None), ("checkpoint", None),
                      ("waited", None), ("background", 2), ("waited", None)]
    # a logger that can stop its writer is asked to at the end of training (and it waits)
    logger.end_background_writes = lambda: events.append(("ended", None))
    feed(monitor, trainer, [[2.0, 2.0]])
    monitor.on_train_end(trainer, None)
    assert events[-2:] == [("background", 3), ("ended", None)]


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


def test_logged_tokens_per_s_is_steps_times_tokens_over_measured_step_time(store):
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
