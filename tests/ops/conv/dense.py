"""Shared checks: a sparse conv equals dense ``F.conv3d`` on the scattered grid, forward and every gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d3s2 import sparse as sp
from d3s2.ops.conv import KernelMap, down_kernel_map, sparse_conv, submanifold_kernel_map
from d3s2.ops.conv.convert import to_conv3d


def random_sparse(counts: list[int], resolution: int, channels: int, seed: int = 0,
                  device: str = "cpu") -> sp.SparseTensor:
    """Ragged batch: sample b has counts[b] distinct random voxels (0 = empty sample)."""
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in counts:
        flat = torch.randperm(resolution**3, generator=g)[:n].sort().values
        r = resolution
        coords.append(torch.stack([flat // r**2, (flat // r) % r, flat % r], 1).to(device))
        feats.append(torch.randn(n, channels, generator=g).to(device))
    return sp.SparseTensor.from_samples(coords, feats, resolution=resolution)


def conv_case(x: sp.SparseTensor, c_out: int, *, stride: int, seed: int = 0):
    """(KernelMap, output coords, fp64 weight [K, C_in, C_out], fp64 bias) for a submanifold (1) or down (2) conv."""
    g = torch.Generator().manual_seed(seed + 1)
    if stride == 1:
        kmap = KernelMap.submanifold(submanifold_kernel_map(x.coords, x.resolution))
        out_coords = x.coords
    else:
        out_coords, raw = down_kernel_map(x.coords, x.resolution)
        kmap = KernelMap(raw, x.num_voxels)
    k = kmap.num_offsets
    weight = (torch.randn(k, x.num_channels, c_out, generator=g) / (k * x.num_channels) ** 0.5).double()
    bias = torch.randn(c_out, generator=g).double()
    return kmap, out_coords, weight.to(x.device), bias.to(x.device)


def dense_reference(x: sp.SparseTensor, out_coords, weight, bias, grad_out, *, stride: int):
    """fp64 output at the active sites and gradients (feats, weight, bias) through dense F.conv3d."""
    feats = x.feats.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_()
    dense = x.replace(feats).dense()
    out = F.conv3d(dense, to_conv3d(w), b, stride=stride, padding=1 if stride == 1 else 0)
    c = out_coords.long()
    active = out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]  # [M, C_out]
    grads = torch.autograd.grad(active, [feats, w, b], grad_out.double())
    return active.detach(), grads


def sparse_run(x: sp.SparseTensor, kmap: KernelMap, weight, bias, grad_out, dtype, backend: str):
    """Output and gradients (feats, weight, bias) of :func:`sparse_conv` in ``dtype`` with ``backend``."""
    feats = x.feats.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_()
    out = sparse_conv(feats, kmap, w, b, backend=backend)
    grads = torch.autograd.grad(out, [feats, w, b], grad_out.to(dtype))
    return out.detach(), grads
