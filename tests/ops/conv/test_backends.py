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


@pytest.mark.parametrize("stride", [1, 2])
def test_triton_weight_grad_chunked_is_exact(interpret, monkeypatch, stride):
    """Several row chunks and C_in tiles: weight and fused bias gradients equal the one-chunk and torch results."""
    from d3s2.ops.conv import triton as conv_triton

    x = random_sparse([20, 0, 5], 6, 20)
    kmap, out_coords, weight, _ = conv_case(x, 6, stride=stride)
    feats = x.feats.float()
    grad = torch.randn(out_coords.shape[0], 6)
    one_w, one_b = conv_triton.sparse_conv_wgrad(feats, grad, kmap, bias=True)
    w_req = weight.float().requires_grad_()
    ref_w = torch.autograd.grad(sparse_conv(feats, kmap, w_req, backend="torch"), w_req, grad)[0]
    monkeypatch.setattr(conv_triton, "wgrad_config", lambda ci, co: {
        "BLOCK_P": 16, "BLOCK_I": 16, "BLOCK_O": 16, "num_warps": 4, "num_stages": 1, "CHUNK_ROWS": 16})
    assert conv_triton._wgrad_split(out_coords.shape[0], kmap.num_offsets, 20, 6,
                                    conv_triton.wgrad_config(20, 6), 1)[0] >= 2
    chunk_w, chunk_b = conv_triton.sparse_conv_wgrad(feats, grad, kmap, bias=True)
    for w in (one_w, chunk_w):
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    for b in (one_b, chunk_b):
        torch.testing.assert_close(b, grad.sum(0), atol=1e-5, rtol=1e-5)
    assert conv_triton.sparse_conv_wgrad(feats, grad, kmap)[1] is None


def test_wgrad_split_covers_the_rows():
    pytest.importorskip("triton")
    from d3s2.ops.conv import triton as conv_triton

    split, rows = conv_triton._wgrad_split(57, 27, 2, 2, {"BLOCK_P": 4, "BLOCK_I": 16, "BLOCK_O": 16,
                                                          "CHUNK_ROWS": 10}, 1)
    assert (split, rows) == (6, 10) and (split - 1) * rows < 57 <= split * rows


def test_triton_bias_grad_without_weight_grad(interpret):
    x = random_sparse([30, 4], 6, 3)
    kmap, out_coords, weight, bias = conv_case(x, 5, stride=1)
    b = bias.float().requires_grad_()
    grad = torch.randn(out_coords.shape[0], 5)
    out = sparse_conv(x.feats.float(), kmap, weight.float(), b, backend="triton")
    torch.testing.assert_close(torch.autograd.grad(out, b, grad)[0], grad.sum(0), atol=1e-5, rtol=1e-5)


def test_layers_use_cached_kernel_map_with_triton(interpret):
    from d3s2.ops.conv import triton as conv_triton

    x = random_sparse([20, 3], 5, 4)
    conv = sp.SparseConv3d(4, 4)
    with use_backend("conv", "triton"):
        y1 = conv(x)
        y2 = conv(x.replace((x.feats * 2).requires_grad_()))
        y2.feats.sum().backward()
    kmap = x.get_cache("kernel_map_subm3")
    # the schedule was built once and kept with the structure; the weight gradient reads the map itself (no pair
    # lists) and the input gradient of a submanifold map runs on the map itself, so no transposed map is built
    assert ("triton_tiles", conv_triton.fwd_config(4, 4)["BLOCK_M"]) in kmap._cache and "pairs" not in kmap._cache
    assert kmap.symmetric and "T" not in kmap._cache
    torch.testing.assert_close(y2.feats - conv.bias, 2 * (y1.feats - conv.bias), atol=1e-5, rtol=1e-5)


def test_auto_backend_on_cpu_is_torch_and_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(BACKENDS.env_var, raising=False)
    feats = torch.randn(3, 2)
    assert BACKENDS.resolve(None, feats) == "torch"
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        sparse_conv(feats, torch.zeros(3, 1, dtype=torch.int32), torch.randn(1, 2, 2), backend="triton")
