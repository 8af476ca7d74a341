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


def _loop_kernel_map(coords: torch.Tensor) -> torch.Tensor:
    """The submanifold map by a Python dict over voxels (independent of the sort-and-search implementation)."""
    from d3s2.ops.conv.reference import OFFSETS_3

    rows = {tuple(c): i for i, c in enumerate(coords.tolist())}
    return torch.tensor([[rows.get((c[0], c[1] + dx, c[2] + dy, c[3] + dz), -1) for dx, dy, dz in OFFSETS_3.tolist()]
                         for c in coords.tolist()], dtype=torch.int32).reshape(-1, 27)


def test_submanifold_map_matches_a_dict_lookup():
    x = random_sparse([30, 0, 17], 5, 1)
    assert torch.equal(submanifold_kernel_map(x.coords, x.resolution), _loop_kernel_map(x.coords))


def test_subdivided_map_equals_the_hashed_map_of_the_children():
    from d3s2 import sparse as sp
    from d3s2.ops.conv import subdivided_kernel_map
    from d3s2.sparse.conv import submanifold_map

    x = random_sparse([25, 0, 40], 4, 1)
    child = sp.sparse_subdivide(sp.sparse_subdivide(x))  # two levels: the derivation chains
    expected = submanifold_kernel_map(child.coords, child.resolution)
    assert torch.equal(submanifold_map(child), expected)
    assert torch.equal(subdivided_kernel_map(submanifold_kernel_map(x.coords, x.resolution)),
                       submanifold_kernel_map(sp.sparse_subdivide(x).coords, 2 * x.resolution))


def test_down_map_and_downsample_keys_match_unique_rows():
    from d3s2.ops.conv import downsample_coords

    x = random_sparse([50, 0, 9], 8, 1)
    by_rows = downsample_coords(x.coords, 2)
    by_keys = downsample_coords(x.coords, 2, x.resolution)
    assert torch.equal(by_rows[0], by_keys[0]) and torch.equal(by_rows[1], by_keys[1])
    out_coords, kmap = down_kernel_map(x.coords, x.resolution)
    rows = {tuple(c): i for i, c in enumerate(x.coords.tolist())}
    for p, c in enumerate(out_coords.tolist()):
        for k, (lx, ly, lz) in enumerate([(a, b, d) for d in (0, 1) for b in (0, 1) for a in (0, 1)]):
            assert kmap[p, k] == rows.get((c[0], 2 * c[1] + lx, 2 * c[2] + ly, 2 * c[3] + lz), -1)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_keys_on_the_cpu_match_torch_unique(factor):
    from d3s2.ops.conv import downsample_coords

    x = random_sparse([300, 0, 120, 7], 16, 1)
    parents, inverse = downsample_coords(x.coords, factor, x.resolution)  # the numpy path on the CPU
    ref_parents, ref_inverse = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // factor], 1), dim=0,
                                            return_inverse=True)
    assert parents.dtype == torch.int32 and inverse.dtype == torch.int64
    assert torch.equal(parents, ref_parents.to(torch.int32)) and torch.equal(inverse, ref_inverse)


@pytest.mark.parametrize("case", ["random", "sorted_runs", "one", "empty"])
def test_unique_inverse_matches_torch_unique(case):
    from d3s2.ops.conv.reference import unique_inverse

    g = torch.Generator().manual_seed(0)
    if case == "random":
        keys = torch.randint(0, 500, (3000,), generator=g)
    elif case == "sorted_runs":  # parents of sorted voxels: interleaved sorted runs with repeats
        fine = torch.sort(torch.randint(0, 32**3, (4000,), generator=g)).values
        x, y, z = fine // 1024, (fine // 32) % 32, fine % 32
        keys = ((x // 2) * 16 + y // 2) * 16 + z // 2
    elif case == "one":
        keys = torch.tensor([7])
    else:
        keys = torch.zeros(0, dtype=torch.int64)
    got_u, got_inv = unique_inverse(keys)
    ref_u, ref_inv = torch.unique(keys, return_inverse=True)
    assert torch.equal(got_u, ref_u) and torch.equal(got_inv, ref_inv)
    assert got_u.dtype == torch.int64 and got_inv.dtype == torch.int64
