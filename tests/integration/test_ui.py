"""`gatelab ui` (lab/ui.py) as a researcher meets it after `make demo`: in headless Chromium.

The fixture runs what `gatelab demo` runs, smaller: `gatelab grid ablations/smoke.yaml`
with two of its variants and two seeds, then `gatelab report smoke`, in fresh processes on
a temporary store. `gatelab ui` serves it, and Playwright drives Debian's Chromium
(`executable_path`; no browser download) to the links the command prints: the
model-training layout on each, the cells grouped by variant and named in full, the
loss-curve charts, a cell's page, and the report's summary on the grid's parent run.
Screenshots are kept in test-artifacts/.

On the demo's own store, after `make demo`:
    GATELAB_UI_STORE=mlruns .venv/bin/python -m pytest tests/integration/test_ui.py
(GATELAB_UI_SCREENSHOTS=docs/img also writes the README's pictures there).

The browser test skips with its reason where Playwright or Chromium is missing (.ci/run
installs Chromium with apt-get where it can); the SIGINT/SIGTERM tests need neither.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Every test here serves `gatelab ui` or reads the smoke grid its fixture trains in
# subprocesses (minutes on a 2-core machine): out of the `-m "not slow"` loop.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
GRID = "smoke"
CELLS = ("baseline", "sdpa_elementwise_sigmoid_mul")
SERVER_START_TIMEOUT_S = 150  # mlflow server imports and checks the schema: slow on a busy CPU
BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--disable-sync", "--metrics-recording-only", "--mute-audio"]
# What the GenAI layout shows and the model-training layout does not, and the reverse.
GENAI_ONLY = ("Judges", "Training runs", "Evaluation runs")
TRAINING_ONLY = "Model registry"


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


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def lab(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_grid(new_store) -> dict:
    """The environment of a store holding the smoke grid and its report (GATELAB_UI_STORE:
    an existing one, e.g. the demo's), and the grid's and the report's terminal output."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",
                                                           "GATELAB_VERBOSITY")}
    if os.environ.get("GATELAB_UI_STORE"):
        env["GATELAB_STORE"] = str(Path(os.environ["GATELAB_UI_STORE"]).resolve())
        return dict(env=env, grid=None, report=None)
    store = new_store("ui", migrated=False)  # created by the grid, as `gatelab demo` does
    env.update(store.env)
    grid = lab(["grid", "ablations/smoke.yaml", "--variants", ",".join(CELLS), "--seeds", "0,1",
                "--tokens", "3e4", "--cpu-workers", "2", "--cpu-threads", "1"], env)
    assert grid.returncode == 0, grid.stdout + grid.stderr
    report = lab(["report", GRID, "--out", str(store.root.parent / "reports" / GRID)], env)
    assert report.returncode == 0, report.stdout + report.stderr
    return dict(env=env, grid=grid, report=report)


class UI:
    """`python -m lab ui` on a free port, in its own session (so a stray server could still
    be ended as a group), its stdout read until it prints its links."""

    def __init__(self, env: dict, sigint_ignored: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # sigint_ignored: as a non-interactive shell starts `gatelab ui &` (SIGINT inherited
        # as ignored, which Python keeps).
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.process = subprocess.Popen([sys.executable, "-m", "lab", "ui", "--port",
                                         str(self.port)], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=ignore)
        self.lines: list[str] = []
        started = time.monotonic()
        # Up to the note that follows the links (lab/ui.py serve).
        while not (self.lines and self.lines[-1].startswith("First visit")):
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                self.close()
                pytest.fail(f"gatelab ui exited with {self.process.returncode}:\n"
                            + "".join(self.lines))
            self.lines.append(line)
            assert time.monotonic() - started < SERVER_START_TIMEOUT_S, "".join(self.lines)

    def link(self, experiment: str) -> str:
        for line in self.lines:
            if line.strip().startswith(f"{experiment}: "):
                return line.strip().split(": ", 1)[1]
        pytest.fail(f"gatelab ui printed no link for {experiment}:\n" + "".join(self.lines))

    def descendants(self) -> set[int]:
        """Every process below `gatelab ui` (the mlflow server and its uvicorn), from /proc."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = set(), [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.add(child)
                todo.append(child)
        return found

    def close(self) -> None:
        """Stop it as a user does (SIGTERM); whatever outlives that is killed."""
        left = self.descendants()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for pid in left:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_gatelab_ui_ends_its_server_and_frees_the_port(smoke_grid, sig):
    # SIGINT to a UI that inherited it ignored: it must stop all the same.
    ui = UI(smoke_grid["env"], sigint_ignored=sig == signal.SIGINT)
    try:
        with urllib.request.urlopen(f"{ui.url}/health", timeout=10) as response:
            assert response.status == 200
        server = ui.descendants()
        assert len(server) >= 2, "expected mlflow server and its uvicorn"
        os.kill(ui.process.pid, sig)  # the command's own PID, as a user or a scheduler does
        assert ui.process.wait(timeout=90) == 0
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in server if alive(pid)]
        assert port_is_free(ui.port)
    finally:
        ui.close()


def test_grid_and_report_print_the_labs_lines_only(smoke_grid):
    if smoke_grid["grid"] is None:
        pytest.skip("GATELAB_UI_STORE: the grid ran elsewhere")
    grid = smoke_grid["grid"]
    assert grid.stderr == ""  # no banners, tips, deprecation or weights_only notices
    patterns = (rf"grid {GRID}: 4 cell\(s\) to run",
                r"  \[[1-4]/4\] [a-z_]+/lr=0\.003/seed=[01]: val/ppl \d+\.\d{3} in \d+ s  "
                r"\(\d+s elapsed, ETA \d+s\)",
                r"    \[[a-z_]+/lr=0\.003/seed=[01]\] step \d+/\d+  loss .*",
                rf"grid {GRID}: 4/4 cells FINISHED \(4 run now, 0 already finished\)",
                r"  time in 4 cell\(s\), [\d,]+ s summed: .*train steps \d+% .*; the grid: "
                r"\w+ wall, \d+ s start, \d+ s check")
    lines = grid.stdout.splitlines()
    assert all(any(re.fullmatch(p, line) for p in patterns) for line in lines), lines
    assert len([line for line in lines if line.startswith("  [")]) == 4
    printed = smoke_grid["report"].stdout.splitlines()  # the short table: a variant a line
    assert all(any(line.split()[:1] == [variant] for line in printed) for variant in CELLS)


def test_the_printed_links_open_the_model_training_layout_with_seeds_grouped_by_variant(
        smoke_grid):
    """Every page `gatelab ui` prints a link to (the experiments, a grid's runs, its report
    run), a cell's run page and the chart view, in a fresh browser: the model-training
    layout, the cells grouped by variant with each seed's run named in full, no search
    filter; the screenshots are the README's (GATELAB_UI_SCREENSHOTS=docs/img)."""
    if reason := skip_reason():
        print(f"\nSKIP test_ui: {reason}", file=sys.stderr)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from lab import records
    from lab.records import child_runs, find_grid_parent, views

    with pytest.MonkeyPatch.context() as env:
        env.setenv("GATELAB_STORE", smoke_grid["env"]["GATELAB_STORE"])
        # MLflow exports an earlier in-process run's tracking URI to the environment
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        mlflow_client = records.client(records.tracking_uri())
    experiment = mlflow_client.get_experiment_by_name(GRID).experiment_id
    parent = find_grid_parent(mlflow_client, experiment)
    cells = {r.data.tags["mlflow.runName"]: r for r in child_runs(mlflow_client, experiment, parent)
             if r.info.status == "FINISHED"}
    variants = sorted({r.data.tags["variant"] for r in cells.values()})
    gated = next(r for name, r in sorted(cells.items()) if name.startswith(CELLS[1]))
    shots = Path(os.environ.get("GATELAB_UI_SCREENSHOTS") or ARTIFACTS)
    shots.mkdir(parents=True, exist_ok=True)
    ui = UI(smoke_grid["env"])
    started = time.monotonic()
    try:
        link = ui.link(GRID)
        assert link == records.runs_page_url(ui.url, experiment)
        assert ui.link("experiments") == records.experiments_page_url(ui.url)
        assert ui.link("report") == records.run_page_url(ui.url, experiment, parent)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(),
                                                 args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 800})
                page.set_default_timeout(60_000)

                # The front page the lab prints: the experiments, not MLflow's GenAI welcome.
                page.goto(ui.link("experiments"), wait_until="domcontentloaded")
                page.get_by_role("link", name=GRID, exact=True).first.wait_for()
                close_assistant(page)
                assert_model_training(page)
                page.screenshot(path=str(shots / "mlflow-root.png"))

                # The grid's link: a group per variant, each seed's run whole, no filter.
                page.goto(link, wait_until="domcontentloaded")
                table = page.locator("div[role=grid]")
                table.get_by_text(gated.info.run_name, exact=True).first.wait_for()
                close_assistant(page)
                assert_model_training(page)
                assert page.get_by_placeholder(re.compile("metrics")).first.input_value() == ""
                for variant in variants:
                    assert table.get_by_text(f"Group: {variant}", exact=True).first.is_visible()
                for name in cells:
                    assert_whole(table.get_by_text(name, exact=True).first, name)
                for column in ("seed", "lr", *views.COMPARISON_COLUMNS):
                    assert table.get_by_text(column, exact=True).first.is_visible(), column
                page.wait_for_timeout(500)  # let the table settle before the picture
                page.screenshot(path=str(shots / "mlflow-runs.png"))

                # The chart view: the lab's section first, a line per variant with its seeds.
                page.set_viewport_size({"width": 1400, "height": 1100})
                page.goto(records.runs_page_url(ui.url, experiment, charts=True),
                          wait_until="domcontentloaded")
                page.get_by_text(views.COMPARISON_SECTION["name"]).first.wait_for()
                close_assistant(page)
                page.get_by_text("train/loss", exact=True).first.wait_for()
                page.wait_for_timeout(1500)  # the charts draw their lines
                page.screenshot(path=str(shots / "mlflow-charts.png"))
                page.set_viewport_size({"width": 1400, "height": 800})

                # A cell's page and its charts, by the address the lab builds (no click).
                cell_page = records.run_page_url(ui.url, experiment, gated.info.run_id)
                page.goto(cell_page, wait_until="domcontentloaded")
                page.get_by_text(gated.info.run_name, exact=True).first.wait_for()
                assert_model_training(page)
                page.get_by_text("val/ppl", exact=True).first.wait_for()
                page.screenshot(path=str(shots / "mlflow-run.png"))
                page.get_by_text("Model metrics", exact=True).first.click()
                # its training-loss chart (MLflow draws one section per metric prefix)
                page.get_by_placeholder("Search metric charts").fill("train/loss")
                page.get_by_text(re.compile(r"seed=0 \(train/loss\)")).first.wait_for()
                page.wait_for_timeout(1500)
                assert_model_training(page)
                page.screenshot(path=str(shots / "mlflow-run-charts.png"))

                # The printed report link: the grid's parent run, the report's summary.
                page.goto(ui.link("report"), wait_until="domcontentloaded")
                page.get_by_text("Δ vs baseline").first.wait_for()
                page.get_by_text(CELLS[1], exact=True).first.wait_for()
                assert_model_training(page)

                # What no link can do: a page reached without the parameter follows the
                # browser's switch, GenAI until "Model training" is picked once (lab/ui.py).
                plain = f"{ui.url}/#/experiments/{experiment}/runs/{parent}"
                page.goto(plain, wait_until="domcontentloaded")
                page.get_by_text("Δ vs baseline").first.wait_for()
                assert page.get_by_text(GENAI_ONLY[0], exact=True).count()
                page.get_by_role("button", name="Model training", exact=True).first.click()
                page.wait_for_function("() => localStorage.getItem('mlflow.workflowType_v1')"
                                       " === '\"machine_learning\"'")
                page.goto(plain, wait_until="domcontentloaded")
                page.get_by_text("Δ vs baseline").first.wait_for()
                assert_model_training(page)
                page.goto(f"{plain}/artifacts", wait_until="domcontentloaded")
                page.get_by_text("report", exact=True).first.click()
                page.get_by_text("loss_curves.png", exact=True).first.click()
                image = page.locator('img[alt="report/loss_curves.png"]')
                image.wait_for()
                page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                       arg=image.element_handle())
                assert image.evaluate("img => img.naturalWidth") == 1200  # 10 in x 120 dpi
            finally:
                browser.close()
    finally:
        ui.close()
    print(f"\nui test: browser checks {time.monotonic() - started:.1f} s")


def assert_model_training(page) -> None:
    assert page.get_by_text(TRAINING_ONLY, exact=True).first.is_visible()
    assert not [t for t in GENAI_ONLY if page.get_by_text(t, exact=True).count()]


def assert_whole(element, text: str) -> None:
    """The element shows `text` uncut: visible, its text not wider than its box, and its box
    inside its table cell (MLflow cuts a name that does not fit with an ellipsis)."""
    assert element.is_visible(), text
    fits = element.evaluate("""e => {
        const cell = e.closest('[role=gridcell]') || e.parentElement;
        const box = e.getBoundingClientRect(), room = cell.getBoundingClientRect();
        return e.scrollWidth <= e.clientWidth + 1 && box.right <= room.right + 1;
    }""")
    assert fits, f"{text!r} is cut in the runs table"


def close_assistant(page) -> None:
    """MLflow opens its Assistant panel on a browser's first visit from this host."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
