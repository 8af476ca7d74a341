"""Per-voxel layers on SparseTensor: linear, normalisations, activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tensor import SparseTensor


class SparseLinear(nn.Linear):
    """``nn.Linear`` applied to every voxel's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseGroupNorm(nn.Module):
    """GroupNorm with statistics per sample and channel group, over that sample's voxels only.

    Matches ``nn.GroupNorm`` applied to each sample's ``[1, C, n_b]`` feature matrix.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        n, c, g = x.num_voxels, x.num_channels, self.num_groups
        if c != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got {c}")
        acc = torch.promote_types(x.dtype, torch.float32)
        f = x.feats.to(acc).view(n, g, c // g)
        bidx = x.batch_index
        count = (x.batch_counts.to(acc) * (c // g)).clamp_(min=1)[:, None]  # [B, 1]
        mean = torch.zeros(x.batch_size, g, dtype=acc, device=x.device).index_add_(0, bidx, f.sum(2)) / count
        # index_select, not mean[bidx]: advanced indexing backpropagates through a sort-based index_put that took
        # 3/4 of a VAE training step on the GPU (millions of voxels into B rows).
        centred = f - mean.index_select(0, bidx)[:, :, None]
        var = torch.zeros(x.batch_size, g, dtype=acc, device=x.device).index_add_(
            0, bidx, centred.pow(2).sum(2)) / count
        out = (centred * torch.rsqrt(var.index_select(0, bidx)[:, :, None] + self.eps)).view(n, c)
        if self.weight is not None:
            out = out * self.weight.to(acc) + self.bias.to(acc)
        return x.replace(out.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class SparseSiLU(nn.SiLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(F.silu(x.feats))


class SparseGELU(nn.GELU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))
