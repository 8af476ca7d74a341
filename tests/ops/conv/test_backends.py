"""Every conv backend equals dense F.conv3d at the active sites: forward and feats/weight/bias gradients.

The triton backend runs here under the Triton interpreter (TRITON_INTERPRET=1, set per test so no other test
sees it) on tiny fp32/fp16 shapes; the interpreter mishandles bf16, which the GPU tests cover.
"""

import pytest
import torch

from d3s2 import sparse as sp
from d3s2.ops import BackendUnavailableError, use_backend
from d3s2.ops.conv import BACKENDS, sparse_conv

from .dense import conv_case, dense_reference, random_sparse, sparse_run

# (counts per sample, resolution, C_in, C_out, stride): ragged batches with an empty and a single-voxel sample.
CASES = [
    ([30, 0, 1, 17], 6, 3, 5, 1),
    ([1], 4, 4, 6, 1),
    ([40, 0, 9], 8, 2, 4, 2),
    ([24, 3], 8, 20, 18, 1),  # with SMALL_TILES: several row, C_in and C_out tiles
]
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}


@pytest.fixture
def interpret(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu tests cover the triton backend")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check(case, backend, dtype, tol):
    counts, res, c_in, c_out, stride = case
    x = random_sparse(counts, res, c_in)
    kmap, out_coords, weight, bias = conv_case(x, c_out, stride=stride)
    grad_out = torch.randn(out_coords.shape[0], c_out, dtype=torch.float64)
    ref, ref_grads = dense_reference(x, out_coords, weight, bias, grad_out, stride=stride)
    out, grads = sparse_run(x, kmap, weight, bias, grad_out, dtype, backend)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for name, g, r in zip(("feats", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol, msg=lambda m, n=name: f"d_{n}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_dense(case):
    _check(case, "torch", torch.float64, 1e-10)


@pytest.mark.parametrize("case", CASES)
def test_triton_backend_matches_dense_fp32(interpret, monkeypatch, case):
    from d3s2.ops.conv import triton as conv_triton

    # Small tiles make the interpreter walk every loop and mask path on a small input.
    monkeypatch.setattr(conv_triton, "fwd_config", lambda c_in, c_out: SMALL_TILES)
    _check(case, "triton", torch.float32, 2e-5)


def test_triton_backend_matches_dense_fp16(interpret):
    _check(CASES[0], "triton", torch.float16, 1e-2)


def test_triton_weight_grad_split_is_exact(interpret, monkeypatch):
    """Force several split chunks per offset: the fixed-order reduction equals the single-chunk result."""
    from d3s2.ops.conv import triton as conv_triton

    x = random_sparse([60, 5], 6, 8)
    kmap, out_coords, weight, _ = conv_case(x, 8, stride=1)
    feats = x.feats.float()
    grad = torch.randn(out_coords.shape[0], 8)
    one = conv_triton.sparse_conv_wgrad(feats, grad, kmap)
    monkeypatch.setattr(conv_triton, "_sm_count", lambda device: 1000)
    monkeypatch.setattr(conv_triton, "wgrad_config", lambda ci, co: {
        "BLOCK_P": 16, "BLOCK_I": 16, "BLOCK_O": 16, "num_warps": 4, "num_stages": 1})
    split = conv_triton.sparse_conv_wgrad(feats, grad, kmap)
    torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)


def test_layers_use_cached_kernel_map_with_triton(interpret):
    from d3s2.ops.conv import triton as conv_triton

    x = random_sparse([20, 3], 5, 4)
    conv = sp.SparseConv3d(4, 4)
    with use_backend("conv", "triton"):
        y1 = conv(x)
        y2 = conv(x.replace((x.feats * 2).requires_grad_()))
        y2.feats.sum().backward()
    kmap = x.get_cache("kernel_map_subm3")
    # the schedule and the transposed map were built once and kept with the structure
    assert ("triton_tiles", conv_triton.fwd_config(4, 4)["BLOCK_M"]) in kmap._cache and "T" in kmap._cache
    torch.testing.assert_close(y2.feats - conv.bias, 2 * (y1.feats - conv.bias), atol=1e-5, rtol=1e-5)


def test_auto_backend_on_cpu_is_torch_and_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    feats = torch.randn(3, 2)
    assert BACKENDS.resolve(None, feats) == "torch"
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        sparse_conv(feats, torch.zeros(3, 1, dtype=torch.int32), torch.randn(1, 2, 2), backend="triton")
