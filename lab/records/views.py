"""What MLflow's UI shows of an experiment the lab records: its kind (model training) and
the comparison view its runs page opens on, and the address of that page."""

from __future__ import annotations

import base64
import json
import time
import zlib


# MLflow's experiment kind, an experiment tag its UI reads (the key and values are the UI's
# own constants, mlflow/server/js: "genai_development", "custom_model_development"). Every
# experiment the lab creates is a model-training one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# --- the MLflow UI ----------------------------------------------------------------------
#
# MLflow 3.17's UI shows an experiment in its GenAI layout or its model-training layout by a
# browser-wide switch (stored in the browser, default GenAI; the URL parameter
# `workflowType=machine_learning` selects model training for that page), not by the
# experiment's kind tag. A runs page opens on a saved view when its URL carries
# `viewStateShareKey=<key>`: the view is the experiment tag `mlflow.sharedViewState.<key>`,
# JSON {name, createdAt, updatedAt, state}, `state` being "deflate;" + base64 of the
# zlib-compressed JSON of the page's search and table settings, the form the UI's own
# "Views > Save as new view" writes (tests/test_ui.py opens it in Chromium).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARISON_VIEW = "gatelab-runs"
COMPARISON_COLUMNS = ("val/ppl", "test/ppl", "spikes/count", "gate/mean")
# The view's first chart section (MLflow adds its generated ones, one per metric prefix,
# after it), with cards in the fields of the UI's chart cards (RunsChartsCardConfig).
COMPARISON_SECTION = {"uuid": "gatelab-comparison", "name": "gatelab: loss and perplexity",
                      "display": True, "isReordered": False, "deleted": False,
                      "isGenerated": False}
COMPARISON_CHARTS = (("LINE", "train/loss"), ("LINE", "val/loss"), ("BAR", "val/ppl"),
                     ("BAR", "test/ppl"))
CHART_RUNS = 1000  # runs a chart draws (MLflow's default, 10, left a grid's 11th run out)


def _chart(kind: str, metric: str) -> dict:
    card = {"uuid": f"gatelab-{metric.replace('/', '-')}", "type": kind, "metricKey": metric,
            "displayName": metric, "runsCountToCompare": CHART_RUNS,
            "metricSectionId": COMPARISON_SECTION["uuid"], "deleted": False, "isGenerated": False}
    if kind == "LINE":
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear", range={},
                    xAxisKey="step", selectedXAxisMetricKey="", yAxisKey="metric",
                    yAxisExpressions=[], ignoreOutliers=False, useGlobalXaxisKey=True,
                    useGlobalLineSmoothing=True)
    return card


def comparison_view_state() -> dict:
    """A grid's runs page as a researcher compares it: the runs that carry a config_hash tag
    (the cells; their parent, which would fold them away, is left out) by name, the
    COMPARISON_COLUMNS metrics as columns, every run in the charts, and a first chart
    section with every run's training and validation loss and its PPLs."""
    metrics = [f"metrics.`{name}`" for name in COMPARISON_COLUMNS]
    return {"searchFilter": "tags.config_hash LIKE '%'", "orderByKey": "tags.`mlflow.runName`",
            "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active",
            "datasetsFilter": [], "modelVersionFilter": "All Runs", "selectedColumns": metrics,
            "columnOrder": metrics, "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
            "viewMaximized": False, "runListHidden": False,
            "isAccordionReordered": True,  # keeps the lab's section first
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
            "groupsExpanded": {}, "compareRunSections": [COMPARISON_SECTION],
            "compareRunCharts": [_chart(kind, metric) for kind, metric in COMPARISON_CHARTS],
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                      "selectedXAxisMetricKey": ""}}


def write_comparison_view(mlflow_client, experiment_id: str) -> None:
    """Save `comparison_view_state` as the experiment's view COMPARISON_VIEW (replaced)."""
    state = json.dumps(comparison_view_state(), separators=(",", ":")).encode()
    now = int(time.time() * 1000)
    value = {"name": "gatelab: the runs side by side", "createdAt": now, "updatedAt": now,
             "state": "deflate;" + base64.b64encode(zlib.compress(state)).decode("ascii")}
    mlflow_client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + COMPARISON_VIEW,
                                     json.dumps(value, separators=(",", ":")))


def runs_page_url(base_url: str, experiment_id: str, view: str | None = COMPARISON_VIEW,
                  charts: bool = False) -> str:
    """The experiment's runs page in the model-training layout, on `view`, as the table or
    (`charts`) the chart view."""
    url = f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "") + (
        "&compareRunsMode=CHART" if charts else "")

