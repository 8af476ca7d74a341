"""GPU tests of the triton conv backend at full size: fp16/bf16 errors at most twice the torch reference's own.

Like flash-attention's tests: the kernel and the torch reference run in the same low precision and both are
compared with an fp64 reference; the kernel's max error must be ≤ 2× the reference's (plus a tiny floor).
"""

import pytest
import torch

from d3s2 import sparse as sp
from d3s2.ops.conv import BACKENDS, KernelMap, down_kernel_map, sparse_conv, submanifold_kernel_map

from .dense import conv_case, dense_reference, random_sparse, sparse_run
from .test_backends import CASES

pytestmark = pytest.mark.gpu


def _shell_batch(resolution: int, channels: int) -> sp.SparseTensor:
    """Ragged batch of two sphere shells (3 voxels thick), an empty sample and a single voxel, on CUDA."""
    r = torch.arange(resolution, device="cuda", dtype=torch.float32)
    x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    samples = []
    for radius in (0.42 * resolution, 0.3 * resolution):
        d = ((x - resolution / 2) ** 2 + (y - resolution / 2) ** 2 + (z - resolution / 2) ** 2).sqrt()
        samples.append(((d - radius).abs() < 1.5).nonzero().int())
    samples.insert(1, torch.zeros(0, 3, dtype=torch.int32, device="cuda"))
    samples.append(torch.tensor([[3, 4, 5]], dtype=torch.int32, device="cuda"))
    feats = [torch.randn(len(c), channels, device="cuda") for c in samples]
    return sp.SparseTensor.from_samples(samples, feats, resolution=resolution)


def _run(feats, kmap, weight, bias, grad, dtype, backend):
    f = feats.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = bias.to(dtype).requires_grad_()
    out = sparse_conv(f, kmap, w, b, backend=backend)
    return [out.detach().double(), *(g.double() for g in torch.autograd.grad(out, [f, w, b], grad.to(dtype)))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,stride", [(32, 32, 1), (64, 128, 1), (128, 64, 1), (96, 96, 2)])
def test_triton_error_within_twice_torch(dtype, c_in, c_out, stride):
    x = _shell_batch(64, c_in)
    if stride == 1:
        kmap = KernelMap.submanifold(submanifold_kernel_map(x.coords, x.resolution))
    else:
        kmap = KernelMap(down_kernel_map(x.coords, x.resolution)[1], x.num_voxels)
    k = kmap.num_offsets
    weight = torch.randn(k, c_in, c_out, device="cuda", dtype=torch.float64) / (k * c_in) ** 0.5
    bias = torch.randn(c_out, device="cuda", dtype=torch.float64)
    grad = torch.randn(kmap.num_outputs, c_out, device="cuda", dtype=torch.float64)
    ref = _run(x.feats.double(), kmap, weight, bias, grad, torch.float64, "torch")
    low = [t.to(dtype).double() for t in (x.feats, weight, bias, grad)]  # both runs see the same rounded inputs
    pt = _run(low[0], kmap, low[1], low[2], low[3], dtype, "torch")
    tri = _run(low[0], kmap, low[1], low[2], low[3], dtype, "triton")
    for name, r, p, t in zip(("out", "d_feats", "d_weight", "d_bias"), ref, pt, tri):
        err_pt = (p - r).abs().max().item()
        err_tri = (t - r).abs().max().item()
        floor = 1e-6 * r.abs().max().item()
        assert err_tri <= 2 * err_pt + floor, f"{name}: triton {err_tri:.3g} vs torch {err_pt:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_dense_fp32_on_gpu(case):
    counts, res, c_in, c_out, stride = case
    x = random_sparse(counts, res, c_in, device="cuda")
    kmap, out_coords, weight, bias = conv_case(x, c_out, stride=stride)
    grad_out = torch.randn(out_coords.shape[0], c_out, dtype=torch.float64, device="cuda")
    ref, ref_grads = dense_reference(x, out_coords, weight, bias, grad_out, stride=stride)
    out, grads = sparse_run(x, kmap, weight, bias, grad_out, torch.float32, "triton")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=2e-5)


def test_weight_and_bias_grads_are_deterministic_and_auto_picks_triton():
    x = _shell_batch(96, 32)
    kmap = KernelMap.submanifold(submanifold_kernel_map(x.coords, x.resolution))
    assert BACKENDS.resolve(None, x.feats.half()) == "triton"
    w = torch.randn(27, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(x.num_voxels, 32, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out = sparse_conv(x.feats.bfloat16(), kmap, w, b)
        grads.append(torch.autograd.grad(out, [w, b], grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
