"""Shared test set-up: seeded RNGs, default dtype restored, `gpu` tests skipped without CUDA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

# One thread: tiny-op tests are faster without intra-op threading, and results are reproducible.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore_dtype():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
