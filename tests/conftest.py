"""Shared test settings and fixtures.

One intra-op thread: the tests use tiny models, where thread start-up costs more than it
saves, and on a small shared CI machine extra threads oversubscribe the cores (measured:
20 tiny training steps take 1 s on one thread and 15 s on two, with the cores busy).

The one MLflow store fixture, `store`, and `new_store` for a store a module's or a
session's fixture shares (the helpers behind both: storekit.py).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from storekit import Store, make_store, shared_dir


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def normal_verbosity(monkeypatch):
    """Each test starts at the normal output level: `main([... "--quiet"])` sets the level in
    the environment (for worker processes), where it would outlast the test."""
    from lab.progress import VERBOSITY_ENV

    monkeypatch.delenv(VERBOSITY_ENV, raising=False)


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch):
    """Every test's data cache is the tests' shared one unless the test names another: the
    default, cache/ of the working directory, was the checkout's for tests that plan a grid
    without a store (tests/integration/test_grid.py's first ones wrote a synthetic corpus there)."""
    monkeypatch.setenv("GATELAB_CACHE", str(shared_dir() / "cache"))


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh store, tmp_path/mlruns (a copy of a migrated empty database), that
    GATELAB_STORE names for this test and the processes it starts, with the shared data
    cache, tmp_path the working directory; returns its URI. A child process's environment:
    os.environ (MLflow exports an in-process run's URI as MLFLOW_TRACKING_URI: a test that
    forks after one drops it)."""
    made = make_store(tmp_path / "mlruns")
    for key, value in made.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return made.uri


@pytest.fixture(scope="session")
def new_store(tmp_path_factory) -> Callable[..., Store]:
    """`new_store(name, migrated=True)`: a store in a new temporary folder named after
    `name`, for a fixture wider than one test (a module's grid) or a command that must
    create the store itself (`migrated=False`). Nothing in os.environ changes: pass the
    returned Store's `.env` to the processes that use it."""
    def new(name: str = "store", migrated: bool = True) -> Store:
        return make_store(tmp_path_factory.mktemp(name) / "mlruns", migrated)

    return new
