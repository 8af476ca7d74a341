import pytest
import torch

from d3s2 import sparse as sp
from tests.sparse.test_tensor import _random_sparse


@pytest.mark.parametrize("block", [2, 4])
def test_block_sort_groups_blocks_contiguously(block):
    x = _random_sparse([40, 1, 0, 25], resolution=8)
    s = sp.block_sort(x, block)
    c = x.coords[s.perm].long()
    key = torch.cat([c[:, :1], c[:, 1:] // block], 1)
    # each block's tokens are one contiguous run and match block_coords
    for j in range(s.num_blocks):
        lo, hi = s.block_offsets[j].item(), s.block_offsets[j + 1].item()
        assert (key[lo:hi] == s.block_coords[j].long()).all()
        assert (s.block_ids[lo:hi] == j).all()
    # blocks in (batch, bx, by, bz) order, batch order kept
    assert (c[1:, 0] >= c[:-1, 0]).all()
    assert s.cu_seqblocks.tolist()[0] == 0 and s.cu_seqblocks[-1] == s.num_blocks
    assert (s.perm[s.inverse] == torch.arange(x.num_voxels)).all()


def test_block_sort_in_block_order_is_xyz():
    coords = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.int32)
    x = sp.SparseTensor(torch.zeros(4, 1), coords, resolution=4)
    s = sp.block_sort(x, 2)
    assert s.perm.tolist() == [3, 2, 1, 0]


def test_window_partition_shift():
    x = _random_sparse([60], resolution=8)
    s = sp.window_partition(x, 4, shift=2)
    c = x.coords[s.perm].long()
    w = (c[:, 1:] + 2) // 4
    for j in range(s.num_blocks):
        lo, hi = s.block_offsets[j].item(), s.block_offsets[j + 1].item()
        assert (w[lo:hi] == w[lo]).all()
    assert sp.window_partition(x, 4, shift=2) is s  # cached


def test_sort_by_blocks_is_idempotent():
    x = _random_sparse([30, 12], resolution=8)
    y = sp.sort_by_blocks(x, 4)
    s = sp.block_sort(y, 4)
    assert (s.perm == torch.arange(y.num_voxels)).all()
    fresh = sp.SparseTensor(y.feats, y.coords, resolution=8)
    assert (sp.block_sort(fresh, 4).perm == torch.arange(y.num_voxels)).all()
