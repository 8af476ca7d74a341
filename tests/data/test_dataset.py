"""SparseSDFDataset (hashed splits, samples, views) and the token-budget sampler + SparseTensor collate."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from d3s2.data.build import BuildConfig, asset_path, build, load_asset, resolve_sources
from d3s2.data.collate import TokenBudgetBatchSampler, collate_sparse
from d3s2.data.dataset import SparseSDFDataset, split_of
from d3s2.sparse import SparseTensor

TINY = Path(__file__).resolve().parents[1] / "assets" / "0ad_tiny.npz"
R = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    config = BuildConfig(resolutions=(R,), views=2, image_size=32, band=2 / R)
    build(resolve_sources(["0ad"], corpus_path=str(TINY)), out, config, progress=False)
    return out


def test_splits_are_hashed_and_disjoint(root):
    names = [f"asset/{i}" for i in range(20000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    for s, frac in (("val", 0.05), ("test", 0.05), ("train", 0.9)):
        assert abs(splits.count(s) / len(names) - frac) < 0.01
    assert split_of("asset/0", 0.0, 0.0) == "train"
    every = SparseSDFDataset(root, R, split=None)
    parts = [SparseSDFDataset(root, R, split=s).names for s in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == every.names and len(every) == 5
    with pytest.raises(ValueError, match="resolutions"):
        SparseSDFDataset(root, 64)
    with pytest.raises(ValueError, match="split"):
        SparseSDFDataset(root, R, split="dev")


def test_sample_fields(root):
    ds = SparseSDFDataset(root, R, split=None, image_size=16)
    s = ds[0]
    n = s["coords"].shape[0]
    assert s["coords"].dtype == torch.int32 and s["coords"].shape == (n, 3) and n == ds.token_counts[0]
    assert s["sdf"].shape == (n, 1) and s["sharp"].shape == (n,) and s["sharp"].dtype == torch.bool
    assert s["sdf"].abs().max() < 2 / R
    nb = s["block_coords"].shape[0]
    assert s["block_sdf"].shape == (nb, 512)
    # Band voxels all lie in the listed blocks.
    blocks = {tuple(b) for b in s["block_coords"].tolist()}
    assert {tuple(c) for c in (s["coords"] // 8).tolist()} <= blocks
    assert s["image"].shape == (4, 16, 16) and 0 <= s["image"].min() and s["image"].max() <= 1
    full = SparseSDFDataset(root, R, split=None, view=s["view"])[0]
    torch.testing.assert_close(s["intrinsics"][:2], full["intrinsics"][:2] / 2)
    torch.testing.assert_close(s["world_to_camera"], full["world_to_camera"])


def test_packed_blocks_expand_to_the_block_targets(root, monkeypatch):
    from d3s2.data import dataset
    from d3s2.data.dataset import band_block_rows

    full = SparseSDFDataset(root, R, split=None, with_image=False)
    packed = SparseSDFDataset(root, R, split=None, with_blocks="packed", with_image=False)
    for i in range(len(full)):
        f, p = full[i], packed[i]
        assert torch.equal(f["coords"], p["coords"]) and torch.equal(f["sdf"][:, 0], p["sdf"])
        assert torch.equal(f["sharp"], p["sharp"]) and torch.equal(f["block_coords"], p["block_coords"])
        bits = torch.from_numpy(np.unpackbits(p["block_inside"].numpy(), axis=1).astype(bool))
        expanded = torch.where(bits, -np.float32(p["band"]), np.float32(p["band"])).reshape(-1)
        expanded[p["block_rows"]] = p["sdf"]
        assert torch.equal(expanded.reshape(-1, 512), f["block_sdf"])
    coords, blocks = p["coords"].numpy(), p["block_coords"].numpy()
    with pytest.raises(ValueError, match="not sorted"):
        band_block_rows(coords[::-1].copy(), blocks, R)
    with pytest.raises(ValueError, match="outside the listed blocks"):
        band_block_rows(coords, blocks[1:], R)
    with pytest.raises(ValueError, match="outside"):
        band_block_rows(coords + R, blocks, R)
    # Block grids too large for the dense table take a binary search: the same rows and checks.
    monkeypatch.setattr(dataset, "_DENSE_BLOCK_TABLE", 0)
    assert np.array_equal(band_block_rows(coords, blocks, R), p["block_rows"].numpy())
    with pytest.raises(ValueError, match="outside the listed blocks"):
        band_block_rows(coords, blocks[1:], R)
    with pytest.raises(ValueError, match="with_blocks"):
        SparseSDFDataset(root, R, split=None, with_blocks="dense")
    with pytest.raises(ValueError, match="collate_packed"):
        collate_sparse([p])


@pytest.mark.parametrize("damage", ["overwritten", "cut", "corrupted"])
def test_a_damaged_asset_file_is_named(root, tmp_path, damage):
    copy = tmp_path / "built"
    shutil.copytree(root, copy)
    ds = SparseSDFDataset(copy, R, split=None)
    path = asset_path(copy, ds.names[0])
    data = path.read_bytes()
    if damage == "overwritten":  # numpy alone: "This file contains pickled (object) data..."
        path.write_bytes(b"not an archive" * 100)
    elif damage == "cut":
        path.write_bytes(data[: len(data) // 2])
    else:  # a stored member's bytes changed: the zip reader's CRC check fails when the array is read
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    for read in (lambda: ds[0], lambda: load_asset(path)):
        with pytest.raises(ValueError, match=rf"{path}: not a readable d3s2 asset archive .*rebuild that folder"):
            read()


def test_views_are_deterministic_per_epoch(root):
    ds = SparseSDFDataset(root, R, split=None, with_blocks=False)
    first = [ds[i]["view"] for i in range(len(ds))]
    assert first == [ds[i]["view"] for i in range(len(ds))]
    seen = set(first)
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        seen |= {ds[i]["view"] for i in range(len(ds))}
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="view"):
        SparseSDFDataset(root, R, split=None, view=5)[0]


def test_token_budget_sampler():
    counts = np.random.default_rng(0).integers(1, 100, size=300)
    counts[7] = 500
    sampler = TokenBudgetBatchSampler(counts, 250, seed=3)
    batches = sampler.batches()
    assert all(counts[b].sum() <= 250 for b in batches)
    flat = sorted(i for b in batches for i in b)
    assert flat == [i for i in range(300) if i != 7]  # the oversized sample is skipped, the rest once each
    assert len(batches) <= 1.15 * counts[counts <= 250].sum() / 250 + 1  # packed tightly
    assert sampler.batches() == batches and len(sampler) == len(batches)
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler(counts, 250, oversized="error")
    capped = TokenBudgetBatchSampler(counts, 10**6, max_batch_size=8, shuffle=False).batches()
    assert max(len(b) for b in capped) == 8
    ranks = [TokenBudgetBatchSampler(counts, 250, seed=3, num_replicas=2, rank=r).batches() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_collate_through_a_dataloader(root):
    ds = SparseSDFDataset(root, R, split=None)
    budget = max(ds.token_counts) + min(ds.token_counts)
    loader = DataLoader(ds, batch_sampler=TokenBudgetBatchSampler(ds.token_counts, budget, seed=0),
                        collate_fn=collate_sparse)
    total = 0
    for batch in loader:
        x = batch["sdf"]
        assert isinstance(x, SparseTensor) and x.resolution == R and x.num_voxels <= budget
        assert x.batch_size == len(batch["names"]) and batch["sharp"].shape == (x.num_voxels,)
        assert isinstance(batch["blocks"], SparseTensor) and batch["blocks"].resolution == R // 8
        assert batch["blocks"].feats.shape[1] == 512 and batch["image"].shape == (x.batch_size, 4, 32, 32)
        for b, name in enumerate(batch["names"]):
            sample = ds[ds.names.index(name)]
            rows = x.coords[:, 0] == b
            torch.testing.assert_close(x.coords[rows, 1:], sample["coords"])
            torch.testing.assert_close(x.feats[rows], sample["sdf"])
        total += x.batch_size
    assert total == len(ds)
    with pytest.raises(ValueError, match="one resolution"):
        collate_sparse([{**ds[0], "resolution": 64}, ds[1]])
