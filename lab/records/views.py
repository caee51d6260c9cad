"""What MLflow's UI shows of an experiment the lab records: its kind (model training) and
the comparison view its runs page opens on, and the address of that page."""

from __future__ import annotations

import base64
import json
import time
import zlib

from lab.records.cells import LR_TAG, SEED_TAG, VARIANT_TAG


# MLflow's experiment kind, an experiment tag (the key and values are the UI's own constants,
# mlflow/server/js: "genai_development", "custom_model_development"). Every experiment the
# lab creates is a model-training one; MLflow 3.17's UI does not choose its layout by it
# (MODEL_TRAINING below), but the tag says what the experiment is to other readers.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# --- the MLflow UI ----------------------------------------------------------------------
#
# Which layout a page shows: MODEL_TRAINING below. A runs page opens on a saved view when its
# URL carries `viewStateShareKey=<key>`: the view is the experiment tag
# `mlflow.sharedViewState.<key>`, JSON {name, createdAt, updatedAt, state}, `state` being
# "deflate;" + base64 of the zlib-compressed JSON of the page's search and table settings,
# the form the UI's own "Views > Save as new view" writes (tests/integration/test_ui.py opens it in
# Chromium).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARISON_VIEW = "gatelab-runs"
COMPARISON_COLUMNS = ("val/ppl", "test/ppl", "spikes/count", "gate/mean")
# The view's first chart section (MLflow adds its generated ones, one per metric prefix,
# after it), with cards in the fields of the UI's chart cards (RunsChartsCardConfig).
# Two charts a row, 480 px high (MLflow's defaults: 3 and 360): room to tell apart the
# curves of variants that lie close.
COMPARISON_SECTION = {"uuid": "gatelab-comparison", "name": "gatelab: loss and perplexity",
                      "display": True, "isReordered": False, "deleted": False,
                      "isGenerated": False, "columns": 2, "cardHeight": 480}
COMPARISON_CHARTS = (("LINE", "train/loss"), ("LINE", "val/loss"), ("BAR", "val/ppl"),
                     ("BAR", "test/ppl"))
# Per line chart: MLflow's smoothing slider (0-100), and whether its y range leaves out
# outliers. The training loss is logged every few steps, noisy, and far higher in the first
# steps than after; the validation loss (a mean over val_batches) is smooth and may have a
# point or two a run (the demo's), which MLflow's outlier cut would leave out altogether.
LINE_SMOOTHNESS = {"train/loss": 60, "val/loss": 0}
IGNORE_OUTLIERS = {"train/loss": True, "val/loss": False}
CHART_RUNS = 1000  # runs a chart draws (MLflow's default, 10, left a grid's 11th run out)
COMPARISON_TAGS = (SEED_TAG, LR_TAG)   # lab/records/runs.py run_tags
GROUP_TAG = VARIANT_TAG
# The run-name column's id in MLflow's runs table, and a width that shows the longest cell
# name of the paper's variants with its LR and seed whole (in the UI's 13 px font).
NAME_COLUMN = "attributes.`Run Name`"
NAME_WIDTH_PX = 420


def _chart(kind: str, metric: str) -> dict:
    card = {"uuid": f"gatelab-{metric.replace('/', '-')}", "type": kind, "metricKey": metric,
            "displayName": metric, "runsCountToCompare": CHART_RUNS,
            "metricSectionId": COMPARISON_SECTION["uuid"], "deleted": False, "isGenerated": False}
    if kind == "LINE":
        card.update(lineSmoothness=LINE_SMOOTHNESS[metric], useGlobalLineSmoothing=False,
                    xAxisScaleType="linear", scaleType="linear", range={}, xAxisKey="step",
                    selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[],
                    ignoreOutliers=IGNORE_OUTLIERS[metric], useGlobalXaxisKey=True)
    return card


def comparison_view_state() -> dict:
    """A grid's runs page as a researcher compares it: no search filter; the runs grouped by
    their `variant` tag (MLflow's run grouping: a row per variant with the mean of its
    seeds, its seeds' runs below it; the charts draw a group's mean with the band of its
    seeds, and a run without the tag, the grid's parent, falls in MLflow's collapsed
    "Additional runs" group, which the charts leave out); the runs by name, so seeds follow
    each other; the seed and LR as columns beside COMPARISON_COLUMNS, the name column wide
    enough for a whole cell name; and a first chart section with the training and
    validation loss and the PPLs."""
    metrics = [f"metrics.`{name}`" for name in COMPARISON_COLUMNS]
    tags = [f"tags.`{name}`" for name in COMPARISON_TAGS]
    columns = tags + metrics
    return {"searchFilter": "", "orderByKey": "tags.`mlflow.runName`",
            "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active",
            "datasetsFilter": [], "modelVersionFilter": "All Runs", "selectedColumns": columns,
            "columnOrder": [NAME_COLUMN, *columns], "columnWidths": {NAME_COLUMN: NAME_WIDTH_PX},
            "runsHiddenMode": "SHOW_ALL", "viewMaximized": False, "runListHidden": False,
            "isAccordionReordered": True,  # keeps the lab's section first
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
            "groupBy": {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": GROUP_TAG}]},
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


def read_comparison_view(tags: dict[str, str]) -> dict | None:
    """The page state of the experiment's view COMPARISON_VIEW (write_comparison_view's
    form), or None where it has none or one that does not decode."""
    try:
        value = json.loads(tags[VIEW_TAG_PREFIX + COMPARISON_VIEW])
        packed = base64.b64decode(value["state"].removeprefix("deflate;"))
        return json.loads(zlib.decompress(packed))
    except (KeyError, TypeError, ValueError, AttributeError, zlib.error):
        return None


# MLflow 3.17 shows every page in its GenAI layout or its model-training layout by one
# switch per browser (localStorage `mlflow.workflowType_v1`, default GenAI), not by the
# experiment's kind tag (its bundle reads the tag only where the switch is off, and the switch
# is always on) and not by any server setting. A page's `workflowType` URL parameter overrides
# the switch for that page, so every address the lab prints carries it; pages reached by
# clicking follow the switch.
MODEL_TRAINING = "workflowType=machine_learning"


def experiments_page_url(base_url: str) -> str:
    """The list of experiments in the model-training layout: the lab's front page (MLflow's
    own home page, `/`, is its GenAI welcome in both layouts)."""
    return f"{base_url}/#/experiments?{MODEL_TRAINING}"


def run_page_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the model-training layout."""
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def runs_page_url(base_url: str, experiment_id: str, view: str | None = COMPARISON_VIEW,
                  charts: bool = False) -> str:
    """The experiment's runs page in the model-training layout, on `view`, as the table or
    (`charts`) the chart view."""
    url = f"{base_url}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}"
    return url + (f"&viewStateShareKey={view}" if view else "") + (
        "&compareRunsMode=CHART" if charts else "")

