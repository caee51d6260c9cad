"""`gatelab ui` (lab/cli.py cmd_ui), looked at as a person does: in headless Chromium.

A small grid is trained into a temporary store (a parent run with two child runs, each
with val/ppl, one with a PNG plot), `python -m lab ui` serves it, and Playwright drives
Debian's Chromium (`executable_path`; no browser download) through the experiment list,
the runs table, a child run's metrics and its plot. The runs table's screenshot is kept
in test-artifacts/. Skips with its reason where Playwright or Chromium is missing
(.ci/run installs Chromium with apt-get where it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
EXPERIMENT = "grid-smoke-ui"
CHILD_VARIANTS = ("baseline", "sdpa_elementwise_sigmoid_mul")
SERVER_START_TIMEOUT_S = 150  # mlflow server imports and checks the schema: slow on a busy CPU
BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--disable-sync", "--metrics-recording-only", "--mute-audio"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("GATELAB_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return ("no Chromium at /usr/bin/chromium (Debian: apt-get install chromium; "
                "or set GATELAB_CHROMIUM)")
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_TIMEOUT_S:
        if server.poll() is not None:
            pytest.fail(f"gatelab ui exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"gatelab ui not serving after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def plot_loss_curve(mlflow_client, run_id: str, directory: Path) -> Path:
    """A real plot of the run's training loss (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = mlflow_client.get_metric_history(run_id, "train/loss")
    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.plot([m.step for m in history], [m.value for m in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    fig.tight_layout()
    path = directory / "loss_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def served_grid(tmp_path_factory):
    """A finished smoke grid in a temporary store, and `python -m lab ui` serving it."""
    if reason := skip_reason():
        print(f"\nSKIP test_ui: {reason}", file=sys.stderr)
        pytest.skip(reason)
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    from lab import tracking
    from lab.config import resolve
    from lab.run import train_run

    root = tmp_path_factory.mktemp("ui")
    timings: dict[str, float] = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GATELAB_STORE", str(root / "mlruns"))
        env.setenv("GATELAB_CACHE", str(root / "cache"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking.tracking_uri()
        mlflow_client = tracking.client(uri)
        # The schema exists before the server starts, so the two never both create it.
        experiment_id = tracking.experiment_id(mlflow_client, EXPERIMENT, uri)

        port, log = free_port(), root / "ui.log"
        url = f"http://127.0.0.1:{port}"
        with log.open("w") as out:
            server = subprocess.Popen([sys.executable, "-m", "lab", "ui", "--port", str(port)],
                                      cwd=REPO, env=dict(os.environ), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = time.monotonic()  # the runs train while the server starts
            parent = mlflow_client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: "smoke grid"})
            parent_id = parent.info.run_id
            children = {}
            for variant in CHILD_VARIANTS:
                config = resolve(variant, "tiny", data="synthetic", tokens=6 * 4 * 128,
                                 overrides=["train.batch_size=4", "train.val_every=3",
                                            "train.val_batches=1", "train.log_every=1"])
                result = train_run(config, uri, experiment=EXPERIMENT, parent_run_id=parent_id,
                                   quiet=True)
                children[variant] = result.run_id
            mlflow_client.set_terminated(parent_id)
            gated = children["sdpa_elementwise_sigmoid_mul"]
            mlflow_client.log_artifact(gated, str(plot_loss_curve(mlflow_client, gated, root)), "plots")
            timings["train_s"] = time.monotonic() - started
            timings["server_s"] = wait_until_serving(url, server, log)
            yield dict(url=url, experiment_id=experiment_id, children=children, parent=parent_id,
                       client=mlflow_client, timings=timings)
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the ui and the mlflow server it started
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_runs_table_child_metrics_and_plot_are_visible(served_grid):
    from playwright.sync_api import sync_playwright

    grid = served_grid
    url, experiment_id = grid["url"], grid["experiment_id"]
    gated = grid["children"]["sdpa_elementwise_sigmoid_mul"]
    gated_run = grid["client"].get_run(gated)
    val_ppl = gated_run.data.metrics["val/ppl"]
    gated_name = gated_run.data.tags["mlflow.runName"]
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 560})
            page.set_default_timeout(60_000)

            # The experiment list shows the grid's experiment.
            page.goto(f"{url}/#/experiments", wait_until="domcontentloaded")
            page.get_by_text(EXPERIMENT, exact=True).first.wait_for()

            # Its runs table: the parent, expanded to its children, with a val/ppl column.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs", wait_until="domcontentloaded")
            page.get_by_text("smoke grid", exact=True).first.wait_for()
            training_mode = page.get_by_role("button", name="Model training")
            if training_mode.count():  # MLflow 3 opens in its GenAI layout
                training_mode.first.click()
            assistant_close = page.get_by_label("Close")
            if assistant_close.count():
                assistant_close.first.click()
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            page.get_by_text(gated_name, exact=True).first.wait_for()
            page.get_by_role("button", name="Columns").click()
            columns = page.get_by_test_id("column-selector-tree")
            # Off: three empty attribute columns, to make room; on: the two metrics.
            for column in ("Dataset", "Source", "Models", "val/ppl", "test/ppl"):
                columns.get_by_text(column, exact=True).first.click()
            page.keyboard.press("Escape")
            grid_cells = page.locator("div[role=grid]")
            grid_cells.get_by_text(str(val_ppl)[:5]).first.wait_for()
            assert grid_cells.get_by_text("val/ppl", exact=True).first.is_visible()
            page.wait_for_timeout(500)  # let the table settle before the picture
            page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))

            # A child run's page lists val/ppl with its value.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{gated}", wait_until="domcontentloaded")
            page.get_by_text("val/ppl", exact=True).first.wait_for()
            page.get_by_text(str(val_ppl)[:5]).first.wait_for()

            # Its plot artifact renders as an image.
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{gated}/artifacts",
                      wait_until="domcontentloaded")
            page.get_by_text("plots", exact=True).first.click()
            page.get_by_text("loss_curve.png", exact=True).first.click()
            image = page.locator('img[alt="plots/loss_curve.png"]')
            image.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=image.element_handle())
            assert image.evaluate("img => img.naturalWidth") == 320  # 4 in x 80 dpi
            page.screenshot(path=str(ARTIFACTS / "mlflow-artifact.png"))
        finally:
            browser.close()
    timings = grid["timings"]
    print(f"\nui test: training {timings['train_s']:.1f} s, server ready after "
          f"{timings['server_s']:.1f} s more, browser checks {time.monotonic() - started:.1f} s")
