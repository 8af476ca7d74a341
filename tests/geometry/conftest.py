"""Geometry tests run single-threaded: small torch kernels on a shared 2-core machine are faster that way."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
