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
