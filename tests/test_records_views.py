"""lab/records/views.py: experiments are marked as model-training ones and carry the
comparison view (in the format MLflow's UI reads; tests/test_ui.py opens it in Chromium),
whose search filter MLflow evaluates as meant; lab/records/lookup.py's experiment_id gives
both to every experiment the lab opens."""

import base64
import json
import zlib

from gridkit import store  # noqa: F401  (fixture)
from lab import records
from lab.records import views


def view_state(experiment) -> dict:
    tag = json.loads(experiment.tags[views.VIEW_TAG_PREFIX + views.COMPARISON_VIEW])
    assert tag["name"] == "gatelab: the runs side by side"
    assert tag["state"].startswith("deflate;")
    return json.loads(zlib.decompress(base64.b64decode(tag["state"][len("deflate;"):])))


def test_a_new_experiment_is_model_training_and_carries_the_comparison_view(store):
    client = records.client(store)
    experiment = client.get_experiment(records.experiment_id(client, "fresh", store))
    assert experiment.tags[views.EXPERIMENT_KIND_TAG] == "custom_model_development"
    state = view_state(experiment)
    assert state == views.comparison_view_state()
    assert state["selectedColumns"] == state["columnOrder"] == [
        "metrics.`val/ppl`", "metrics.`test/ppl`", "metrics.`spikes/count`", "metrics.`gate/mean`"]
    assert state["runsHiddenMode"] == "SHOW_ALL"
    charts = state["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in charts] == list(views.COMPARISON_CHARTS)
    assert all(c["runsCountToCompare"] >= 1000 and
               c["metricSectionId"] == state["compareRunSections"][0]["uuid"] for c in charts)


def test_an_older_experiment_gets_the_kind_and_the_view_when_the_lab_opens_it(store):
    client = records.client(store)
    old = client.create_experiment("old")  # as the lab made them before
    assert records.experiment_id(client, "old", store) == old
    experiment = client.get_experiment(old)
    assert experiment.tags[views.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert view_state(experiment) == views.comparison_view_state()
    client.set_experiment_tag(old, views.EXPERIMENT_KIND_TAG, "genai_development")
    records.experiment_id(client, "old", store)  # a kind someone chose is left alone
    assert client.get_experiment(old).tags[views.EXPERIMENT_KIND_TAG] == "genai_development"


def test_the_views_filter_keeps_the_cells_and_drops_their_parent(store):
    """The filter runs in MLflow's search (as the UI sends it): a grid's parent, which has no
    config_hash, would fold its children away in the table."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = records.client(store)
    experiment = records.experiment_id(client, "grid", store)
    parent = client.create_run(experiment).info.run_id
    cells = {client.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent,
                                                 "config_hash": f"h{i}"}).info.run_id
             for i in range(11)}
    found = client.search_runs([experiment], views.comparison_view_state()["searchFilter"],
                               max_results=100)
    assert {r.info.run_id for r in found} == cells


def test_the_runs_page_link_selects_model_training_and_the_view():
    assert views.runs_page_url("http://127.0.0.1:5000", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=gatelab-runs")
    assert views.runs_page_url("http://h:1", "7", view=None, charts=True) == (
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART")
