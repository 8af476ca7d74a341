"""VAE tests run tiny tensors on CPU with the torch reference ops.

- One intra-op thread: OpenMP synchronisation costs far more than it saves at these sizes (measured 5-10x
  slower with 2 threads on a busy 2-core machine).
- Backends pinned to ``torch``: other test modules set ``TRITON_INTERPRET=1`` process-wide, after which ``auto``
  would pick the (very slow) interpreted Triton kernels on CPU.
"""

import pytest
import torch

from d3s2.ops._backend import use_backend


@pytest.fixture(autouse=True)
def _one_thread_torch_ops():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_backend("conv", "torch"), use_backend("block_attn", "torch"):
        yield
    torch.set_num_threads(threads)
