"""The GPU SDF path's bookkeeping restructured for fewer host syncs gives what the plain rules give: safe voxel pairs,
sign propagation with sparse compactions, far fields filled level by level, and the chunked host copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

import d3s2.geometry.sdf as sdf_mod
from d3s2.geometry._field import TorchField


def test_safe_pairs_match_the_pairs_spelled_out():
    rng = np.random.default_rng(0)
    r = 12
    grid = np.stack(np.meshgrid(*[np.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.from_numpy(grid[rng.random(len(grid)) < 0.6])  # sorted by key, with gaps
    n = coords.shape[0]
    udf = torch.from_numpy(rng.random(n) * (2.0 / r))
    exact = torch.from_numpy(rng.random(n) < 0.1)
    src, dst = sdf_mod._safe_pairs(coords, udf, exact, r)
    row = {tuple(c): i for i, c in enumerate(coords.tolist())}
    want = set()
    for i, c in enumerate(coords.tolist()):
        for axis in range(3):
            nb = list(c)
            nb[axis] += 1
            j = row.get(tuple(nb))
            if j is not None and float(udf[i] + udf[j]) > 2.0 / r * (1 + 1e-6) and not exact[i] and not exact[j]:
                want.add((i, j))
    got = list(zip(src.tolist(), dst.tolist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == want and len(want) > 100


def test_propagate_signs_with_sparse_compactions_matches_full_steps():
    """Compacting the batch only before steps 1, 2, 4, ... gives the signs of steps over every block."""
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(-1, 2, (40, 8, 8, 8), generator=g).to(torch.int8)
    signs[torch.rand(signs.shape, generator=g) < 0.8] = 0  # mostly unknown: several steps to fill
    signs[:5] = 0  # blocks that never fill
    signs[5:8] = 1  # blocks already known
    want = signs.clone()
    for _ in range(3 * sdf_mod.BLOCK):
        total = torch.zeros_like(want)
        total[:, 1:] += want[:, :-1]
        total[:, :-1] += want[:, 1:]
        total[:, :, 1:] += want[:, :, :-1]
        total[:, :, :-1] += want[:, :, 1:]
        total[:, :, :, 1:] += want[:, :, :, :-1]
        total[:, :, :, :-1] += want[:, :, :, 1:]
        want = torch.where((want == 0) & (total != 0), total.sign(), want)
    got = sdf_mod.propagate_signs(signs)
    assert torch.equal(got, want)
    assert (got[:5] == 0).all() and (got[8:] != 0).float().mean() > 0.99


def test_fill_far_level_by_level_matches_cell_by_cell():
    """The far fields filled for a batch of cells (missing ancestors found from coordinates, near parts of all
    levels in one evaluation) are the cells and values of filling each cell's chain of ancestors one cell at a
    time, top down."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    sphere.update_faces(sphere.triangles_center[:, 2] < 0.4)
    g = torch.Generator().manual_seed(1)
    pts = (torch.rand(400, 3, generator=g) * 1.6 - 0.8).float()
    fields = []
    for _ in range(2):
        f = TorchField(sphere.vertices, sphere.faces, band=1 / 32, device="cpu")
        f.prepare(64, 1 / 32 + 2 / 64)
        fields.append(f)
    batched, single = fields
    gid = batched._locate(pts)
    batched._fill_far(gid[:150])
    batched._fill_far(gid)  # a second call fills only what is still missing
    flat = single._flat()
    for c in torch.unique(gid).tolist():
        chain = [c]
        while not bool(flat.has[chain[-1]]):
            chain.append(int(flat.parent(torch.tensor([chain[-1]]))[0]))
        for cell in reversed(chain[:-1]):  # top down: each call fills this one cell
            single._fill_far(torch.tensor([cell]))
    assert len(torch.unique(flat.level[gid])) >= 3 and int(flat.has.sum()) > 20
    assert torch.equal(batched._flat().has, flat.has)
    # Not bit for bit on the CPU: torch's vectorised atan2 and its scalar tail round differently, so a value
    # depends on its position in the batch (up to float rounding).
    torch.testing.assert_close(batched._flat().far, flat.far, atol=1e-6, rtol=0)
    assert float(flat.far.abs().max()) > 0.1


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_byte_chunks_cover_every_byte(chunk):
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randint(0, 1000, (37, 3), generator=g, dtype=torch.int32), torch.rand(50, generator=g),
               torch.rand(29, generator=g) < 0.5]
    outs = [torch.zeros_like(t) for t in tensors]
    sizes = []
    for src, dst in sdf_mod._byte_chunks(tensors, outs, chunk):
        sizes.append(src.numel())
        dst.copy_(src)
    assert all(torch.equal(a, b) for a, b in zip(tensors, outs, strict=True))
    assert max(sizes) <= chunk and sum(sizes) == 37 * 12 + 50 * 4 + 29


def test_host_copy_on_the_cpu_keeps_the_tensors():
    t = torch.arange(10)
    assert sdf_mod._HostCopy(t, t * 2).result()[1].tolist() == list(range(0, 20, 2))


@pytest.mark.gpu
def test_host_copy_streams_through_small_slots(monkeypatch):
    """The background copy through two pinned slots gives exact copies, also with many chunks per tensor."""
    monkeypatch.setattr(sdf_mod, "_COPY_SLOT_BYTES", 1000)
    monkeypatch.setattr(sdf_mod, "_COPY_SLOTS", {})
    g = torch.Generator(device="cuda").manual_seed(3)
    tensors = [torch.randint(0, 1 << 30, (12345, 3), device="cuda", generator=g, dtype=torch.int32),
               torch.randn(54321, device="cuda", generator=g), torch.rand(7777, device="cuda", generator=g) < 0.5]
    host = sdf_mod._HostCopy(*tensors).result()
    assert all(h.device.type == "cpu" and not h.is_pinned() for h in host)
    assert all(torch.equal(h, t.cpu()) for h, t in zip(host, tensors, strict=True))


def test_locate_matches_the_level_by_level_search():
    """All levels searched at once give each point the deepest cell holding it, as a per-level search does (points
    on cell boundaries included)."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    field = TorchField(sphere.vertices, sphere.faces, band=1 / 32, device="cpu")
    field.prepare(64, 1 / 32 + 2 / 64)
    g = torch.Generator().manual_seed(4)
    pts = torch.cat([torch.rand(500, 3, generator=g) * 2 - 1,
                     torch.randint(0, 65, (200, 3), generator=g) / 32.0 - 1.0]).float()  # on cell faces, and at +-1
    flat = field._flat()
    want = torch.zeros(len(pts), dtype=torch.long)
    for j in range(1, len(field._levels)):
        c = ((pts + 1.0) / field._levels[j].size).floor().long().clamp(0, 2**j - 1)
        found, pos = flat.find(flat.levels_t[j:j + 1], c[:, None, :])
        want = torch.where(found[:, 0], pos[:, 0], want)
    got = field._locate(pts)
    assert torch.equal(got, want) and len(torch.unique(flat.level[got])) >= 3
