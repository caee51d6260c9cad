"""lab/ui.py's parts, without MLflow's server or a browser: the address a browser is given,
the port check, the server's command line, the links printed per experiment, the wait for
the server and the stop of its whole process group. (`gatelab ui` itself, served and
signalled, in Chromium: tests/integration/test_ui.py; its port errors through the CLI:
tests/integration/test_cli_terminal.py.)"""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import records, ui
from lab.errors import LabError


@pytest.mark.parametrize("host, url", [
    ("0.0.0.0", "http://127.0.0.1:5000"),     # a wildcard bind is reached on loopback
    ("::", "http://127.0.0.1:5000"),
    ("", "http://127.0.0.1:5000"),
    ("127.0.0.1", "http://127.0.0.1:5000"),
    ("localhost", "http://localhost:5000"),
    ("::1", "http://[::1]:5000"),             # an IPv6 address in brackets (RFC 3986)
])
def test_browser_url_is_what_a_browser_can_open(host, url):
    assert ui.browser_url(host, 5000) == url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_free_port_passes_the_check():
    ui.check_port("127.0.0.1", free_port())


def test_a_host_that_does_not_resolve_is_one_line():
    with pytest.raises(LabError, match=r"^--host: cannot resolve 'no-such-host\.invalid' \("):
        ui.check_port("no-such-host.invalid", free_port())


@pytest.mark.parametrize("verbose", [False, True])
def test_the_server_command_serves_the_store_with_its_artifacts_on_one_worker(store, verbose):
    command = ui.server_command(store, "127.0.0.1", 5123, verbose)
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    options = dict(zip(command[4::2], command[5::2]))
    assert options["--backend-store-uri"] == store
    assert options["--default-artifact-root"] == (records.store_dir() / "artifacts").as_uri()
    assert (options["--host"], options["--port"], options["--workers"]) == ("127.0.0.1", "5123",
                                                                            "1")
    # Quiet by default: no line per HTTP request; --verbose shows uvicorn's own log.
    assert options.get("--uvicorn-opts") == (None if verbose else
                                             "--log-level warning --no-access-log")


def test_links_list_experiments_with_runs_newest_first_and_a_grids_report(store):
    client = records.client(store)
    plain = client.create_experiment("plain")
    client.create_run(plain)
    time.sleep(0.01)  # MLflow's times are in milliseconds: newest first needs them apart
    client.create_experiment("empty")  # no runs: no link
    time.sleep(0.01)
    grid = client.create_experiment("grid")
    parent = records.find_or_create_grid_parent(client, grid, "grid")
    base = "http://127.0.0.1:5000"
    assert ui.experiment_links(store, base) == [
        f"  grid: {records.runs_page_url(base, grid)}",
        f"    report: {records.run_page_url(base, grid, parent)}",
        f"  plain: {records.runs_page_url(base, plain)}"]
    assert ui.experiment_links(store, base, limit=1) == ui.experiment_links(store, base)[:2]


def test_no_experiment_with_runs_is_no_link(store):
    records.client(store).create_experiment("empty")
    assert ui.experiment_links(store, "http://127.0.0.1:5000") == []


def sleeper() -> subprocess.Popen:
    """A live process standing in for the server (the wait only polls it)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_wait_returns_once_health_answers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    process = sleeper()
    try:
        started = time.monotonic()
        ui.wait_until_serving(f"http://127.0.0.1:{server.server_port}", process, None)
        assert time.monotonic() - started < 5
    finally:
        process.kill()
        process.wait()
        server.shutdown()
        server.server_close()


def test_a_server_that_exits_first_is_one_line_with_its_logs_last_line(tmp_path):
    log = tmp_path / "ui.log"
    log.write_text("starting\nError: the backend store is locked\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(LabError) as refused:
        ui.wait_until_serving(f"http://127.0.0.1:{free_port()}", process, log)
    assert str(refused.value) == ("ui: the MLflow server exited with code 3 before serving: "
                                  f"Error: the backend store is locked (log: {log})")
    with pytest.raises(LabError) as refused:  # --verbose: the output went to the terminal
        ui.wait_until_serving(f"http://127.0.0.1:{free_port()}", process, None)
    assert str(refused.value) == "ui: the MLflow server exited with code 3 before serving"


def test_a_server_that_never_answers_is_given_up_after_the_start_timeout(monkeypatch, tmp_path):
    monkeypatch.setattr(ui, "START_TIMEOUT_S", 1.0)
    url = f"http://127.0.0.1:{free_port()}"
    process = sleeper()
    try:
        with pytest.raises(LabError) as refused:
            ui.wait_until_serving(url, process, tmp_path / "ui.log")
    finally:
        process.kill()
        process.wait()
    assert str(refused.value) == (f"ui: the MLflow server did not answer on {url} within 1 s "
                                  f"(log: {tmp_path / 'ui.log'})")


# A group leader whose child ignores SIGTERM (as uvicorn's worker outlived `mlflow server`):
# the child says its PID once the signal is ignored.
GROUP = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, signal, time; "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(os.getpid(), flush=True); "
                  "time.sleep(60)"])
time.sleep(60)
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_ends_the_whole_group_sigkilling_what_outlives_sigterm(monkeypatch):
    monkeypatch.setattr(ui, "STOP_TIMEOUT_S", 0.5)
    server = subprocess.Popen([sys.executable, "-c", GROUP], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(server.stdout.readline())
    started = time.monotonic()
    ui.stop(server)
    assert server.returncode == -signal.SIGTERM  # the leader went at SIGTERM
    assert not running(child)                     # its child only at SIGKILL, after the wait
    assert time.monotonic() - started >= 0.5
    server.stdout.close()


def test_stop_returns_at_once_when_sigterm_ends_the_group():
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              start_new_session=True)
    started = time.monotonic()
    ui.stop(server)
    assert server.returncode == -signal.SIGTERM
    assert time.monotonic() - started < ui.STOP_TIMEOUT_S / 2


def test_stop_of_a_server_that_exited_on_its_own_reaps_it_without_waiting():
    """serve() stops the server in `finally` also when it ended by itself: an empty group
    costs no SIGTERM-to-SIGKILL wait, and the leader's own exit code is kept."""
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"],
                              start_new_session=True)
    while not Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].startswith(" Z"):
        time.sleep(0.01)  # exited, not yet reaped
    started = time.monotonic()
    ui.stop(server)
    assert server.returncode == 4 and time.monotonic() - started < ui.STOP_TIMEOUT_S / 2
