"""KernelMap helpers: transposed maps (scatter and submanifold symmetry) and offset-grouped pairs."""

import pytest
import torch

from d3s2.ops.conv import KernelMap, down_kernel_map, kernel_map_pairs, submanifold_kernel_map, transpose_kernel_map

from .dense import random_sparse


def test_submanifold_transpose_is_offset_reversal():
    x = random_sparse([40, 0, 1, 25], 6, 1)
    kmap = submanifold_kernel_map(x.coords, x.resolution)
    assert torch.equal(transpose_kernel_map(kmap, x.num_voxels), kmap.flip(1))
    km = KernelMap.submanifold(kmap)
    assert km.symmetric and "T" not in km._cache  # built on first use only
    assert km.T.T is km and torch.equal(km.T.map, kmap.flip(1)) and km.T.symmetric


def test_down_transpose_points_each_child_to_its_parent():
    x = random_sparse([50, 7], 8, 1)
    out_coords, kmap = down_kernel_map(x.coords, x.resolution)
    t = transpose_kernel_map(kmap, x.num_voxels)
    assert ((t >= 0).sum(1) == 1).all()  # each child has exactly one parent, at exactly one offset
    q, k = (t >= 0).nonzero(as_tuple=True)
    parent = out_coords[t[q, k].long()]
    child = x.coords[q]
    assert torch.equal(parent[:, 0], child[:, 0])
    assert torch.equal(parent[:, 1:] * 2 + (child[:, 1:] % 2), child[:, 1:])
    assert torch.equal((child[:, 1] % 2) + 2 * (child[:, 2] % 2) + 4 * (child[:, 3] % 2), k.int())


def test_transpose_rejects_ambiguous_map():
    with pytest.raises(ValueError, match="at most once"):
        transpose_kernel_map(torch.tensor([[0], [0]], dtype=torch.int32), 1)


def test_pairs_grouped_by_offset():
    x = random_sparse([30, 4], 5, 1)
    kmap = submanifold_kernel_map(x.coords, x.resolution)
    in_rows, out_rows, offsets = kernel_map_pairs(kmap)
    assert offsets[-1] == (kmap >= 0).sum()
    for k in range(27):
        lo, hi = offsets[k].item(), offsets[k + 1].item()
        assert torch.equal(kmap[out_rows[lo:hi].long(), k], in_rows[lo:hi])
        assert (out_rows[lo:hi].diff() > 0).all()


def test_kernel_map_validates():
    with pytest.raises(ValueError, match="int32"):
        KernelMap(torch.zeros(3, 27, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="symmetric"):
        KernelMap(torch.zeros(3, 27, dtype=torch.int32), 4, symmetric=True)
