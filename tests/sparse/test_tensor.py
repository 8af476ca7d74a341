import pytest
import torch

from d3s2 import sparse as sp


def _random_sparse(counts, resolution=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in counts:
        flat = torch.randperm(resolution**3, generator=g)[:n]
        xyz = torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], 1)
        coords.append(xyz)
        feats.append(torch.randn(n, channels, generator=g))
    return sp.SparseTensor.from_samples(coords, feats, resolution=resolution)


def test_layout_and_cu_seqlens_with_empty_sample():
    x = _random_sparse([5, 0, 3])
    assert x.batch_size == 3
    assert x.cu_seqlens.tolist() == [0, 5, 5, 8]
    assert x.batch_counts.tolist() == [5, 0, 3]
    assert x.max_seqlen == 5


def test_replace_shares_cache_and_checks_rows():
    x = _random_sparse([4, 2])
    y = x.replace(x.feats * 2)
    x.set_cache("k", 1)
    assert y.get_cache("k") == 1
    with pytest.raises(ValueError, match="expected 6 rows"):
        x.replace(torch.zeros(5, 3))


def test_cat_and_unbind_roundtrip():
    a, b = _random_sparse([3, 2], seed=1), _random_sparse([4], seed=2)
    c = sp.SparseTensor.cat([a, b])
    assert c.batch_size == 3 and c.cu_seqlens.tolist() == [0, 3, 5, 9]
    parts = c.unbind()
    assert [p.num_voxels for p in parts] == [3, 2, 4]
    torch.testing.assert_close(parts[2].feats, b.feats)
    assert (parts[2].coords == b.coords).all()


@pytest.mark.parametrize(
    "coords, msg",
    [
        (torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.int32), "not sorted by batch"),
        (torch.tensor([[0, 0, 0, 8], [0, 1, 1, 1]], dtype=torch.int32), "out of range"),
        (torch.tensor([[0, -1, 0, 0], [0, 1, 1, 1]], dtype=torch.int32), "out of range"),
        (torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.int32), "duplicate voxels"),
        (torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1]], dtype=torch.int64), "int32"),
    ],
)
def test_invalid_inputs_raise_clear_errors(coords, msg):
    with pytest.raises(ValueError, match=msg):
        sp.SparseTensor(torch.zeros(2, 3), coords, resolution=8)


def test_integer_feats_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        sp.SparseTensor(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int32), resolution=8)


def test_dense_places_features():
    x = _random_sparse([3, 2])
    d = x.dense()
    c = x.coords.long()
    torch.testing.assert_close(d[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], x.feats)
    assert d.abs().sum() == pytest.approx(x.feats.abs().sum().item(), rel=1e-5)


def test_device_move_carries_structure_cache():
    from d3s2.models.vae.sparse_sdf_vae import POOL_KEY, prepare_structure

    x = _random_sparse([40, 0, 25], resolution=16, channels=1)
    prepare_structure(x, 8)
    x.set_cache("opaque", object())  # not walkable: dropped by a device move
    moved = x.to("meta")
    assert moved.coords.device.type == "meta" and "opaque" not in moved._cache
    assert set(moved._cache) == set(x._cache) - {"opaque"}
    child, moved_child = x.get_cache(POOL_KEY), moved.get_cache(POOL_KEY)
    assert moved_child.coords.device.type == "meta" and moved_child.coords.shape == child.coords.shape
    parents, inverse, counts = moved.get_cache("down_2")
    assert parents is moved_child.coords  # shared tensors stay shared
    assert moved.batch_counts.device.type == "meta"
    assert moved.replace(moved.feats)._cache is moved._cache


def test_pickled_structure_cache_stays_shared():
    """DataLoader workers pickle batches: the prepared structure arrives whole, shared tensors still shared."""
    import pickle

    from d3s2.models.vae.sparse_sdf_vae import POOL_KEY, prepare_structure

    x = prepare_structure(_random_sparse([40, 25], resolution=16, channels=1), 8)
    y = pickle.loads(pickle.dumps(x))
    assert set(y._cache) == set(x._cache)
    assert y.get_cache(POOL_KEY).coords is y.get_cache("down_2")[0]
    assert torch.equal(y.get_cache(POOL_KEY).coords, x.get_cache(POOL_KEY).coords)
