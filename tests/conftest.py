"""Shared test settings.

One intra-op thread: the tests use tiny models, where thread start-up costs more than it
saves, and on a small shared CI machine extra threads oversubscribe the cores (measured:
20 tiny training steps take 1 s on one thread and 15 s on two, with the cores busy).
"""

import pytest
import torch


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
