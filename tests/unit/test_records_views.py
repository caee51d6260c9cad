"""lab/records/views.py: experiments are marked as model-training ones and carry the
comparison view (in the format MLflow's UI reads; tests/integration/test_ui.py opens it in Chromium and
sees its grouping); lab/records/lookup.py's experiment_id gives both to every experiment the
lab opens, and the current view to one that holds an older one."""

import base64
import json
import zlib

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
    columns = ["tags.`seed`", "tags.`lr`", "metrics.`val/ppl`", "metrics.`test/ppl`",
               "metrics.`spikes/count`", "metrics.`gate/mean`"]
    assert state["selectedColumns"] == columns
    assert state["columnOrder"] == ["attributes.`Run Name`", *columns]
    assert state["columnWidths"] == {"attributes.`Run Name`": views.NAME_WIDTH_PX}
    assert state["runsHiddenMode"] == "SHOW_ALL"
    assert state["searchFilter"] == ""  # every run; the grouping sets the parent aside
    assert state["groupBy"] == {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": "variant"}]}
    assert state["useGroupedValuesInCharts"] is True
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


def test_an_experiment_with_an_older_view_gets_the_current_one_when_the_lab_opens_it(store):
    """A store made before the view changed (the runs filtered by config_hash, no grouping)
    shows the current view once a grid or train opens the experiment again."""
    client = records.client(store)
    experiment = records.experiment_id(client, "grid", store)
    older = dict(views.comparison_view_state(), searchFilter="tags.config_hash LIKE '%'",
                 groupBy=None)
    packed = base64.b64encode(zlib.compress(json.dumps(older).encode())).decode()
    client.set_experiment_tag(experiment, views.VIEW_TAG_PREFIX + views.COMPARISON_VIEW,
                              json.dumps({"name": "gatelab: the runs side by side",
                                          "state": "deflate;" + packed}))
    assert views.read_comparison_view(client.get_experiment(experiment).tags) == older
    records.experiment_id(client, "grid", store)
    assert view_state(client.get_experiment(experiment)) == views.comparison_view_state()
    assert views.read_comparison_view({}) is None
    assert views.read_comparison_view({views.VIEW_TAG_PREFIX + views.COMPARISON_VIEW: "{}"}) is None


def test_the_runs_page_link_selects_model_training_and_the_view():
    assert views.runs_page_url("http://127.0.0.1:5000", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=gatelab-runs")
    assert views.runs_page_url("http://h:1", "7", view=None, charts=True) == (
        "http://h:1/#/experiments/7/runs?workflowType=machine_learning&compareRunsMode=CHART")
    assert views.experiments_page_url("http://h:1") == (
        "http://h:1/#/experiments?workflowType=machine_learning")
    assert views.run_page_url("http://h:1", "7", "abc") == (
        "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning")
