import io

import numpy as np
import pytest
import torch
import trimesh

from d3s2.geometry.marching_cubes import (
    EDGE_CORNERS,
    EDGE_MARGIN,
    build_tables,
    marching_cubes_mesh,
    sparse_marching_cubes,
)


def _grid(r):
    ax = np.arange(r)
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)


def _smooth_field(r, seed):
    """A smooth random field: a sphere plus a few low-frequency waves."""
    rng = np.random.default_rng(seed)
    p = (_grid(r) + 0.5) * (2 / r) - 1
    f = np.linalg.norm(p - rng.uniform(-0.1, 0.1, 3), axis=1) - 0.55
    for _ in range(3):
        k = rng.normal(0, 2.5, 3)
        f += 0.06 * np.sin(p @ k + rng.uniform(0, 6))
    return f


def _canon(v, decimals=4):
    return np.unique(np.round(v, decimals), axis=0)


def _has_ambiguous_face(f):
    """True if some cube face has diagonal corners of one sign and the other diagonal of the other."""
    s = f < 0
    for axis in range(3):
        a = np.moveaxis(s, axis, 0)
        q00, q11 = a[:, :-1, :-1], a[:, 1:, 1:]
        q01, q10 = a[:, :-1, 1:], a[:, 1:, :-1]
        if ((q00 == q11) & (q01 == q10) & (q00 != q01)).any():
            return True
    return False


def test_tables_are_consistent():
    tri, num = build_tables()
    faces = [{c for c in range(8) if (c >> axis) & 1 == side} for axis in range(3) for side in (0, 1)]
    assert num[0] == 0 and num[255] == 0
    for case in range(256):
        t = tri[case, : num[case]]
        crossing = {e for e, (a, b) in enumerate(EDGE_CORNERS) if ((case >> a) & 1) != ((case >> b) & 1)}
        assert set(t.reshape(-1).tolist()) == crossing  # every crossing edge gets a vertex, no other edge does
        # Each directed edge of the case's triangles appears once and its reverse once (closed in the cube).
        inner = [(t[i, k], t[i, (k + 1) % 3]) for i in range(len(t)) for k in range(3)]
        for a, b in inner:
            assert inner.count((a, b)) == 1
            # An edge drawn twice in one cube (a fan diagonal) must not lie on a face: the neighbour draws those.
            if inner.count((b, a)) == 1:
                corners = set(EDGE_CORNERS[a]) | set(EDGE_CORNERS[b])
                assert not any(corners <= f for f in faces)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_skimage_on_dense_grid(seed):
    marching_cubes = pytest.importorskip("skimage.measure").marching_cubes  # the data extra
    r = 28
    f = _smooth_field(r, seed)
    fd = f.reshape(r, r, r)
    verts, faces = sparse_marching_cubes(_grid(r), f, r, to_unit_cube=False)
    sv, sf, _, _ = marching_cubes(fd, 0.0)
    ours = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
    theirs = trimesh.Trimesh(sv, sf, process=False)
    # Same vertices (one per crossing edge, same positions up to EDGE_MARGIN near the grid points) up to order.
    assert len(verts) == len(sv)
    assert np.allclose(_canon(verts.numpy()), _canon(sv), atol=EDGE_MARGIN + 2e-4)
    if not _has_ambiguous_face(fd):
        assert len(faces) == len(sf)
        assert ours.area == pytest.approx(theirs.area, rel=2e-3)
    assert ours.is_watertight and ours.is_winding_consistent
    assert ours.volume == pytest.approx(theirs.volume, rel=2e-3)
    assert ours.volume > 0  # outward normals


def test_sparse_equals_dense_and_watertight():
    r = 32
    f = _smooth_field(r, 3)
    keep = np.abs(f) < 3 * (2 / r)
    vs, fs = sparse_marching_cubes(_grid(r)[keep], f[keep], r)
    vd, fd = sparse_marching_cubes(_grid(r), f, r)
    assert len(vs) == len(vd) and len(fs) == len(fd)
    assert np.allclose(_canon(vs.numpy()), _canon(vd.numpy()), atol=1e-5)
    m = trimesh.Trimesh(vs.numpy(), fs.numpy(), process=False)
    assert m.is_watertight and m.volume > 0
    # Shuffled input gives the same mesh.
    perm = np.random.default_rng(0).permutation(keep.sum())
    vp, fp = sparse_marching_cubes(torch.as_tensor(_grid(r)[keep][perm]), torch.as_tensor(f[keep][perm]), r)
    assert np.allclose(_canon(vp.numpy()), _canon(vs.numpy()), atol=1e-5) and len(fp) == len(fs)


def test_open_band_and_errors():
    r = 16
    f = _smooth_field(r, 0)
    keep = np.abs(f) < 0.5 * (2 / r)  # too thin: cubes are missing, so the mesh has holes
    v, fc = sparse_marching_cubes(_grid(r)[keep], f[keep], r)
    if len(fc):
        assert not trimesh.Trimesh(v.numpy(), fc.numpy(), process=False).is_watertight
    empty_v, empty_f = sparse_marching_cubes(np.zeros((0, 3), dtype=np.int64), np.zeros(0), r)
    assert empty_v.shape == (0, 3) and empty_f.shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        sparse_marching_cubes(np.zeros((4, 2)), np.zeros(4), r)
    with pytest.raises(ValueError, match="values"):
        sparse_marching_cubes(np.zeros((4, 3)), np.zeros(5), r)
    assert isinstance(marching_cubes_mesh(_grid(r), f, r), trimesh.Trimesh)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    r = 40
    f = _smooth_field(r, 4)
    vc, fc = sparse_marching_cubes(_grid(r), f, r)
    vg, fg = sparse_marching_cubes(_grid(r), f, r, device="cuda")
    assert len(fg) == len(fc)
    assert np.allclose(_canon(vg.cpu().numpy()), _canon(vc.numpy()), atol=1e-5)


def test_noise_field_is_watertight_and_manifold():
    # White noise hits every ambiguous configuration; the grid's outer layer is outside so the surface closes.
    r = 14
    f = np.random.default_rng(0).normal(size=(r, r, r))
    f[[0, -1], :, :] = f[:, [0, -1], :] = f[:, :, [0, -1]] = 1.0
    v, fc = sparse_marching_cubes(_grid(r), f.reshape(-1), r)
    m = trimesh.Trimesh(v.numpy(), fc.numpy(), process=False)
    _, counts = np.unique(m.edges_sorted, axis=0, return_counts=True)
    assert (counts == 2).all()
    assert m.is_winding_consistent


@pytest.mark.parametrize("chunk", [1, 37, 1000])
def test_chunked_equals_unchunked(chunk):
    r = 16
    f = _smooth_field(r, 5)
    keep = np.abs(f) < 3 * (2 / r)
    perm = np.random.default_rng(1).permutation(keep.sum())  # chunks of an unsorted voxel list
    c, v = torch.as_tensor(_grid(r)[keep][perm]), torch.as_tensor(f[keep][perm])
    v0, f0 = sparse_marching_cubes(c, v, r, chunk=0)
    v1, f1 = sparse_marching_cubes(c, v, r, chunk=chunk)
    assert len(f0) > 0 and torch.equal(f0, f1) and torch.equal(v0, v1)


@pytest.mark.parametrize("fmt", ["stl", "obj", "ply", "glb"])
def test_values_at_the_level_give_distinct_vertices_that_survive_export(fmt):
    # An L1 ball with integer values: many grid points lie exactly on the surface, where every crossing edge
    # that ends there would put its vertex; vertices at one position are welded by readers (STL has no shared
    # vertices), which pinches the mesh.
    r = 9
    values = (np.abs(_grid(r) - 4).sum(axis=1) - 3).astype(np.float32)
    mesh = marching_cubes_mesh(_grid(r), values, r)
    assert len(np.unique(mesh.vertices, axis=0)) == len(mesh.vertices)
    assert mesh.is_watertight and mesh.is_winding_consistent
    data = mesh.export(file_type=fmt)
    data = data.encode() if isinstance(data, str) else data  # OBJ is text
    loaded = trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh")  # welds vertices by position
    assert (len(loaded.vertices), len(loaded.faces)) == (len(mesh.vertices), len(mesh.faces))
    assert loaded.is_watertight and loaded.is_winding_consistent
