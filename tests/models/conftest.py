"""Model tests run tiny tensors: one intra-op thread avoids OpenMP synchronisation, which costs far more than it
saves at these sizes (measured 5-10x slower with 2 threads on a busy 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
