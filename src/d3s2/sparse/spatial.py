"""Changes of resolution: mean-pool downsampling and subdivision (each voxel into its 8 children)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.conv import downsample_coords
from ..ops.conv.reference import OFFSETS_2
from .tensor import SparseTensor


def sparse_downsample(x: SparseTensor, factor: int) -> SparseTensor:
    """Mean-pool voxels into cells of ``factor³``; output resolution ``R // factor``.

    The structure (parent coords and the child → parent map) is cached on ``x``.
    """
    if factor < 1 or x.resolution % factor:
        raise ValueError(f"expected a factor >= 1 dividing the resolution {x.resolution}, got {factor}")
    parents, inverse = x.cached(f"down_{factor}", lambda: downsample_coords(x.coords, factor))
    counts = torch.bincount(inverse, minlength=parents.shape[0]).clamp_(min=1)
    # Sum in fp32 at least: a few hundred bf16 children lose precision otherwise.
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    sums = torch.zeros(parents.shape[0], x.num_channels, dtype=acc_dtype, device=x.device)
    sums.index_add_(0, inverse, x.feats.to(acc_dtype))
    feats = (sums / counts[:, None].to(acc_dtype)).to(x.dtype)
    return SparseTensor(feats, parents, resolution=x.resolution // factor, batch_size=x.batch_size,
                        validate=False)


def sparse_subdivide(x: SparseTensor) -> SparseTensor:
    """Every voxel becomes its 8 children at resolution ``2R``, features copied.

    Children of one parent are contiguous, offsets in order ``lx + 2·ly + 4·lz``; batch order is kept.
    """
    off = OFFSETS_2.to(x.device)
    coords = x.coords.repeat_interleave(8, dim=0)  # [8N, 4]
    coords[:, 1:] = coords[:, 1:] * 2 + off.repeat(x.num_voxels, 1)
    feats = x.feats.repeat_interleave(8, dim=0)  # [8N, C]
    return SparseTensor(feats, coords, resolution=x.resolution * 2, batch_size=x.batch_size, validate=False)


class SparseDownsample(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_downsample(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class SparseSubdivide(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_subdivide(x)
