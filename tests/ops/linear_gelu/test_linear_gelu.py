"""Linear + GELU(tanh): the cuBLASLt epilogue backend against the reference (GPU), and its CPU refusal."""

from __future__ import annotations

import pytest
import torch

from d3s2.ops import BackendUnavailableError
from d3s2.ops.linear_gelu import linear_gelu, linear_gelu_ref


def test_torch_backend_is_the_mlp_expression_and_cublaslt_refuses_cpu():
    x, w, b = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(approximate="tanh"))
    with torch.no_grad():
        mlp[0].weight.copy_(w)
        mlp[0].bias.copy_(b)
        assert torch.equal(linear_gelu(x, w, b), mlp(x))
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        linear_gelu(x, w, b, backend="cublaslt")
    with pytest.raises(ValueError, match="expected x"):
        linear_gelu(x, w[:, :4], b)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8192, 12180, 37])
def test_cublaslt_epilogue_matches_reference_bf16(m):
    """DiT MLP shapes (C 1024 → 4096), bf16: within twice the torch path's error against float64."""
    g = torch.Generator().manual_seed(m)  # a CPU generator: unaffected by CUDA-graph captures in other tests
    x = torch.randn(m, 1024, generator=g).cuda().bfloat16()
    w = (torch.randn(4096, 1024, generator=g) * 0.03).cuda().bfloat16()
    b = (torch.randn(4096, generator=g) * 0.1).cuda().bfloat16()
    with torch.no_grad():
        got = linear_gelu(x, w, b, backend="cublaslt")
        pt = linear_gelu(x, w, b, backend="torch")
    ref = linear_gelu_ref(x.double(), w.double(), b.double())
    err, base = ((o.double() - ref).abs().max().item() for o in (got, pt))
    assert got.dtype == torch.bfloat16 and got.shape == (m, 4096)
    assert err <= 2 * base + 1e-3, (err, base)
