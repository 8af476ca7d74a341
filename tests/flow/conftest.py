import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many tiny ops; on a loaded 2-core machine two intra-op threads make them ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
