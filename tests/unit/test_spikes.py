"""lab/training/spikes.py: the loss-spike detector against a curve with planted spikes, the
spike metrics and artifact a run logs, and the largest gradient norm after warmup."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lab.training.spikes import detect_spikes, grad_norm_max_after_warmup


def planted_curve() -> np.ndarray:
    steps = np.arange(1000)
    rng = np.random.default_rng(0)
    curve = 2.0 + 3.0 * np.exp(-steps / 2000) + rng.normal(0, 0.01, size=steps.size)
    curve[200] += 1.0                 # a clear spike
    curve[400:403] += [0.3, 0.5, 0.3]  # a three-step spike, peak in the middle
    curve[600] += 0.4                 # two spikes 10 steps apart: one event
    curve[610] += 0.6
    curve[800] += 0.05                # below the 0.1-nat floor: not a spike
    return curve


def test_planted_spikes_are_found_merged_and_measured():
    curve = planted_curve()
    events = detect_spikes(curve)
    assert [(e.start_step, e.peak_step, e.end_step) for e in events] == [
        (200, 200, 200), (400, 401, 402), (600, 610, 610)]
    assert [e.max_excess for e in events] == pytest.approx([1.0, 0.5, 0.6], abs=0.05)


def test_noise_alone_and_a_short_history_give_no_spikes():
    curve = planted_curve()
    clean = curve.copy()
    clean[[200, 400, 401, 402, 600, 610, 800]] = curve[[199, 399, 399, 399, 599, 609, 799]]
    assert detect_spikes(clean) == []
    assert detect_spikes(curve[:50]) == []


def test_a_non_finite_loss_is_a_spike_of_infinite_excess():
    curve = planted_curve()[:300]
    curve[250] = np.nan
    events = detect_spikes(curve, steps=np.arange(300) * 10)
    assert events[-1].peak_step == 2500 and events[-1].max_excess == float("inf")


@pytest.mark.slow
def test_a_run_logs_its_spikes_as_metrics_and_artifact(store):
    """With a hair-trigger detector every rise over the rolling median is an event: the
    metrics and spikes.json must agree with the detector run on loss_history.json."""
    from mlflow.tracking import MlflowClient

    from lab.config import resolve
    from lab.training.run import train_run

    config = resolve("baseline", "tiny", {"model.context": 32, "train.batch_size": 8,
                     "train.spike_window": 3, "train.spike_k": 0.0, "train.spike_floor": 1e-4,
                     "train.spike_merge": 0}, data="synthetic", tokens=8192)
    result = train_run(config, store, "spiky", quiet=True)
    client = MlflowClient(store)
    history = json.loads(open(client.download_artifacts(result.run_id, "loss_history.json")).read())
    logged = json.loads(open(client.download_artifacts(result.run_id, "spikes.json")).read())
    expected = detect_spikes(history["loss"], history["step"], 3, 0.0, 1e-4, 0)
    assert len(expected) > 0
    assert [e["peak_step"] for e in logged] == [e.peak_step for e in expected]
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["spikes/count"] == len(expected)
    assert metrics["spikes/max_excess"] == pytest.approx(max(e.max_excess for e in expected))


def test_the_largest_gradient_norm_after_warmup_leaves_out_the_initialisations():
    # The first steps' norms at the initialisation (5, 4) are the whole run's largest; the
    # excursion after warmup (3 steps here) is 2.5; a non-finite norm counts for nothing.
    steps = list(range(1, 9))
    norms = [5.0, 4.0, 0.6, 0.5, 2.5, float("nan"), 0.4, float("inf")]
    assert grad_norm_max_after_warmup(steps, norms, warmup_steps=3) == 2.5
    assert grad_norm_max_after_warmup(steps, norms, warmup_steps=0) == 5.0
    assert math.isnan(grad_norm_max_after_warmup(steps, norms, warmup_steps=8))
