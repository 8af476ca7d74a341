import pytest
import torch


@pytest.fixture(autouse=True)
def _cpu_reference_ops(monkeypatch):
    # Some test modules set TRITON_INTERPRET=1 for the whole session; 'auto' would then pick the interpreted
    # Triton kernels (minutes at the published widths). These tests check layouts, not kernels.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # Many small ops: on a loaded 2-core machine a second intra-op thread mostly adds overhead.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
