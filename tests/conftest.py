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


@pytest.fixture(scope="session")
def tiny_encoded(tmp_path_factory):
    """``(build, vae, latents)``: tests/assets/0ad_tiny.npz built at 32³ with 2 renders of 32², a random tiny SS-VAE
    export (configs/debug/tiny_vae.yaml) and the folder ``d3s2 data encode`` writes with it (built on first use)."""
    from tests.models.dit._data import build_encoded

    return build_encoded(tmp_path_factory.mktemp("tiny_encoded"))
