"""Changes of resolution: mean-pool downsampling and subdivision (each voxel into its 8 children)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.conv import downsample_coords
from ..ops.conv.reference import offsets_on
from .tensor import SparseTensor

# Cache key of a subdivided tensor holding its parent structure (see sparse_subdivide).
SUBDIVIDED_FROM = "subdivided_from"


def sparse_downsample(x: SparseTensor, factor: int) -> SparseTensor:
    """Mean-pool voxels into cells of ``factor³``; output resolution ``R // factor``.

    The structure (parent coords and the child → parent map) is cached on ``x``.
    """
    if factor < 1 or x.resolution % factor:
        raise ValueError(f"expected a factor >= 1 dividing the resolution {x.resolution}, got {factor}")
    parents, inverse, counts = x.cached(f"down_{factor}", lambda: downsample_structure(x, factor))
    # Sum in fp32 at least: a few hundred bf16 children lose precision otherwise.
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    sums = torch.zeros(parents.shape[0], x.num_channels, dtype=acc_dtype, device=x.device)
    sums.index_add_(0, inverse, x.feats.to(acc_dtype))
    feats = (sums / counts[:, None].to(acc_dtype)).to(x.dtype)
    return SparseTensor(feats, parents, resolution=x.resolution // factor, batch_size=x.batch_size,
                        validate=False)


def downsample_structure(x: SparseTensor, factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int32 ``[M, 4]`` parent coords, int64 ``[N]`` parent row of each voxel, float32 ``[M]`` children per
    parent): what :func:`sparse_downsample` caches on ``x`` under ``down_{factor}``."""
    parents, inverse = downsample_coords(x.coords, factor, x.resolution)
    # index_add_ of ones, not bincount: the output size is known, so no host sync (exact in float32).
    counts = torch.zeros(parents.shape[0], dtype=torch.float32, device=x.device).index_add_(
        0, inverse, torch.ones(inverse.shape[0], dtype=torch.float32, device=x.device))
    return parents, inverse, counts


def sparse_subdivide(x: SparseTensor) -> SparseTensor:
    """Every voxel becomes its 8 children at resolution ``2R``, features copied.

    Children of one parent are contiguous, offsets in order ``lx + 2·ly + 4·lz``; batch order is kept.
    """
    off = offsets_on(2, x.device)
    coords = x.coords.repeat_interleave(8, dim=0)  # [8N, 4]
    coords[:, 1:] = coords[:, 1:] * 2 + off.repeat(x.num_voxels, 1)
    feats = x.feats.repeat_interleave(8, dim=0)  # [8N, C]
    out = SparseTensor(feats, coords, resolution=x.resolution * 2, batch_size=x.batch_size, validate=False)
    # The parent structure (featureless, same cache): the children's kernel map derives from the parents'.
    out.set_cache(SUBDIVIDED_FROM, SparseTensor(x.feats.new_zeros(x.num_voxels, 0), x.coords, resolution=x.resolution,
                                                batch_size=x.batch_size, validate=False, _cache=x._cache))
    return out


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
