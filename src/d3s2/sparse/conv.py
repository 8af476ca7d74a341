"""Sparse convolution layers (SparseTensor in, SparseTensor out). Numerics live in :mod:`d3s2.ops.conv`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import conv as conv_op
from .spatial import SUBDIVIDED_FROM
from .tensor import SparseTensor


def _init_conv(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # Same scale as nn.Conv3d's default (kaiming-uniform with a=sqrt(5)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


def submanifold_map(x: SparseTensor) -> torch.Tensor:
    """int32 ``[N, 27]`` submanifold 3³ kernel map of ``x``'s voxels, cached on ``x`` (key ``kmap_subm3``).

    A tensor made by :func:`~d3s2.sparse.sparse_subdivide` derives it from its parents' map by a gather
    (:func:`~d3s2.ops.conv.subdivided_kernel_map`, same result as hashing its coords, far fewer launches).
    """
    def build() -> torch.Tensor:
        parent = x.get_cache(SUBDIVIDED_FROM)
        if parent is not None:
            return conv_op.subdivided_kernel_map(submanifold_map(parent))
        return conv_op.submanifold_kernel_map(x.coords, x.resolution, 3)
    return x.cached("kmap_subm3", build)


class SparseConv3d(nn.Module):
    """Submanifold convolution: output voxels = input voxels; kernel 3 (27 offsets) or 1.

    ``weight`` is ``[K, C_in, C_out]`` in the torchsparse offset order documented in
    :mod:`d3s2.ops.conv.reference`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"expected kernel_size 1 or 3, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        k = kernel_size**3
        self.weight = nn.Parameter(torch.empty(k, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv(self.weight, self.bias, k * in_channels)

    def forward(self, x: SparseTensor, *, backend: str | None = None) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.num_channels}")
        if self.kernel_size == 1:
            out = x.feats @ self.weight[0].to(x.dtype)
            return x.replace(out + self.bias.to(x.dtype) if self.bias is not None else out)
        # The KernelMap wrapper caches what backends derive from the map (transpose, pairs, tile schedules).
        kmap = x.cached("kernel_map_subm3", lambda: conv_op.KernelMap.submanifold(submanifold_map(x)))
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return x.replace(conv_op.sparse_conv(x.feats, kmap, w, b, backend=backend))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class SparseDownConv3d(nn.Module):
    """Strided convolution, kernel 2, stride 2: each occupied parent cell sums its (up to 8) children.

    ``weight`` is ``[8, C_in, C_out]``, offset ``k = lx + 2·ly + 4·lz``.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(8, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv(self.weight, self.bias, 8 * in_channels)

    def forward(self, x: SparseTensor, *, backend: str | None = None) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.num_channels}")
        out_coords, raw = x.cached("kmap_down2", lambda: conv_op.down_kernel_map(x.coords, x.resolution))
        kmap = x.cached("kernel_map_down2", lambda: conv_op.KernelMap(raw, x.num_voxels))
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        feats = conv_op.sparse_conv(x.feats, kmap, w, b, backend=backend)
        return SparseTensor(feats, out_coords, resolution=max(x.resolution // 2, 1), batch_size=x.batch_size,
                            validate=False)
