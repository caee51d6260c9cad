"""`gatelab ui`: MLflow's server on the lab's store, and the links that open each experiment
on its comparison view (lab/records/views.py).

`mlflow server` starts uvicorn as a child of its own; stopping only the process that was
started left that child serving the port. So the server runs as its own process group
(its own session: a Ctrl-C in the terminal reaches `gatelab ui` alone), and `gatelab ui`,
on SIGINT, SIGTERM or its own exit, ends that whole group: SIGTERM, then SIGKILL for what
is left after STOP_TIMEOUT_S.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lab import records
from lab.errors import LabError
from lab.progress import verbosity

STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 300.0   # the server imports MLflow and checks the schema: slow on a busy CPU
LINKS = 10                # experiments listed with their link, newest first
# What no address can do in MLflow 3.17 (lab/records/views.py MODEL_TRAINING: the printed
# links carry the layout, clicks follow the browser's switch), and two panels no server
# setting turns off: the Assistant, opened on a browser's first visit from the server's
# host (mlflow/server/assistant), and the usage-data note on MLflow's home page, shown until
# it is dismissed in that browser.
FIRST_VISIT = ("First visit from a browser: pick \"Model training\" at the top left once (MLflow "
               "keeps it per browser for the pages you click to; the links above carry it), "
               "and close the Assistant panel with its X.")


def check_port(host: str, port: int) -> None:
    """A port the server can bind: in range and free (as uvicorn binds it, SO_REUSEADDR)."""
    if not 1 <= port <= 65535:
        raise LabError(f"--port: must be between 1 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise LabError(f"--host: cannot resolve {host!r} ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise LabError(f"--port: {host}:{port} is not free ({err.strerror}); another "
                           "`gatelab ui` may be running: stop it, or pass --port N") from None


def browser_url(host: str, port: int) -> str:
    """The address to type into a browser (a wildcard bind is reached on loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def server_command(uri: str, host: str, port: int, verbose: bool) -> list[str]:
    artifacts = (records.store_dir() / "artifacts").as_uri()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--default-artifact-root", artifacts, "--host", host, "--port", str(port),
               "--workers", "1"]
    if not verbose:  # no line per HTTP request
        command += ["--uvicorn-opts", "--log-level warning --no-access-log"]
    return command


def experiment_links(uri: str, base_url: str, limit: int = LINKS) -> list[str]:
    """`name: link` for the store's experiments that hold runs, newest first, each followed
    by `  report: link` to its grid's parent run where it is a grid."""
    mlflow_client = records.client(uri)
    found = mlflow_client.search_experiments(max_results=100, order_by=["last_update_time DESC"])
    lines, shown = [], 0
    for experiment in found:
        if not mlflow_client.search_runs([experiment.experiment_id], max_results=1):
            continue
        lines.append(f"  {experiment.name}: "
                     f"{records.runs_page_url(base_url, experiment.experiment_id)}")
        parent = records.find_grid_parent(mlflow_client, experiment.experiment_id)
        if parent:
            lines.append("    report: "
                         + records.run_page_url(base_url, experiment.experiment_id, parent))
        shown += 1
        if shown == limit:
            break
    return lines


def wait_until_serving(url: str, server: subprocess.Popen, log: Path | None) -> None:
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        if server.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
            raise LabError(f"ui: the MLflow server exited with code {server.returncode} before "
                           f"serving{': ' + tail[0] if tail else ''}"
                           + (f" (log: {log})" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise LabError(f"ui: the MLflow server did not answer on {url} within "
                   f"{START_TIMEOUT_S:.0f} s" + (f" (log: {log})" if log else ""))


def stop(server: subprocess.Popen) -> None:
    """End the server's whole process group: SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _group_alive(server):
            time.sleep(0.1)
        if not _group_alive(server):
            break
    server.wait()


def _group_alive(server: subprocess.Popen) -> bool:
    server.poll()  # reaps the leader once it exits, so it does not count as alive
    try:
        os.killpg(server.pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(host: str, port: int, uri: str | None = None) -> int:
    """Serve the store until SIGINT or SIGTERM; every process of the server is gone when
    this returns."""
    check_port(host, port)
    uri = records.tracking_uri(uri)
    records.open_store(uri)  # created or upgraded whole here, not by the server in place
    verbose = verbosity() == "verbose"
    base_url = browser_url(host, port)
    log = None if verbose else records.store_dir() / "ui.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # a light server
    if not verbose:
        env.update(MLFLOW_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Both signals set here, SIGINT too: a process started in the background by a
    # non-interactive shell (`gatelab ui &` in a script) inherits SIGINT ignored, and Python
    # then keeps it ignored, so `kill -INT` would leave the server running.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        output = open(log, "w") if log else None
        try:
            server = subprocess.Popen(server_command(uri, host, port, verbose), env=env,
                                      stdout=output, stderr=subprocess.STDOUT if output else None,
                                      start_new_session=True)
        finally:
            if output:
                output.close()
        if verbosity() != "quiet":
            print(f"MLflow UI starting on {base_url} (store: {uri})...", flush=True)
        wait_until_serving(base_url, server, log)
        print(f"MLflow UI on {base_url}; Ctrl-C stops it.\n"
              f"  experiments: {records.experiments_page_url(base_url)}\n"
              "Each experiment's runs side by side, grouped by variant (a grid's report on "
              "its parent run):", flush=True)
        print("\n".join(experiment_links(uri, base_url)) or "  (no runs yet)", flush=True)
        if verbosity() != "quiet":
            print(FIRST_VISIT, flush=True)
        server.wait()
        return 0 if server.returncode in (0, -signal.SIGTERM) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:  # a second Ctrl-C must not leave the group half stopped
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            stop(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
