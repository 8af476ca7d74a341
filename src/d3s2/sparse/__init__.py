"""Sparse voxel tensors and the layers that operate on them. Import as ``from d3s2 import sparse as sp``."""

from .conv import SparseConv3d, SparseDownConv3d
from .layers import SparseGELU, SparseGroupNorm, SparseLayerNorm, SparseLinear, SparseSiLU
from .serialize import BlockSort, block_sort, sort_by_blocks, window_partition
from .spatial import (
    SparseDownsample,
    SparseSubdivide,
    downsample_structure,
    sparse_downsample,
    sparse_subdivide,
)
from .tensor import SparseTensor

__all__ = [
    "SparseTensor", "BlockSort", "block_sort", "window_partition", "sort_by_blocks",
    "SparseConv3d", "SparseDownConv3d", "SparseDownsample", "SparseSubdivide", "sparse_downsample",
    "downsample_structure", "sparse_subdivide", "SparseLinear", "SparseLayerNorm", "SparseGroupNorm",
    "SparseSiLU", "SparseGELU",
]
