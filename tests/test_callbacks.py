"""lab/training/callbacks.py: the run's logged throughput is training time only, as measured."""

import time

import lightning as L
from mlflow.tracking import MlflowClient

from gridkit import store  # noqa: F401  (fixture)


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
