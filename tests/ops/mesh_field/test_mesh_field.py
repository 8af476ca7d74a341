"""The near-list mesh field (triton backend) against the torch reference on ragged near lists.

Without CUDA the kernel runs under TRITON_INTERPRET=1 on tiny inputs; the ``gpu`` test uses a full-size one.
Distances are bit-identical by construction (same operations, same order, correctly rounded division and
square root, no FMA); the winding number's atan2 is a polynomial, so it agrees to float rounding.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

pytest.importorskip("triton")

from d3s2.ops import use_backend  # noqa: E402
from d3s2.ops.mesh_field import BACKENDS, near_field, pair_dist2  # noqa: E402
from d3s2.ops.mesh_field import triton as mf_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n_tri: int, n_cells: int, n_points: int, max_list: int, seed: int = 0):
    """Random triangles (with degenerate ones and exact duplicates), cells with ragged near lists (empty, one
    triangle, long), points near the triangles and on their vertices."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n_tri, 3, 3, generator=g) * 2 - 1
    v = v[:, :1] + 0.3 * (v - v[:, :1])  # small triangles, so the closest feature varies
    v[0, 2] = v[0, 1]  # repeated vertex
    v[1, 2] = 2 * v[1, 1] - v[1, 0]  # collinear
    v[2] = v[2, 0]  # a point
    v[n_tri - 1] = v[3]  # exact duplicate of triangle 3: nearest-id ties
    counts = torch.randint(0, max_list + 1, (n_cells,), generator=g)
    counts[0], counts[1], counts[2] = 0, 1, max_list
    lists = [torch.randperm(n_tri, generator=g)[:c] for c in counts.tolist()]
    lists[2] = torch.cat([torch.tensor([n_tri - 1, 3]), lists[2][:max_list - 2]])  # the larger duplicate id first
    counts = torch.tensor([len(x) for x in lists])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    near = torch.cat(lists)
    owner = torch.randint(0, n_cells, (n_points,), generator=g)
    owner[:3] = torch.tensor([0, 1, 2])
    pts = torch.rand(n_points, 3, generator=g) * 2 - 1
    pts[3:6] = v[4]  # on the vertices of a triangle (zero-length vectors in the solid angle)
    owner[3:6] = 2
    classes = torch.randint(0, 3, (n_tri,), generator=g, dtype=torch.int8)
    flags = torch.rand(n_tri, 3, 2, generator=g) < 0.3
    tris = v.reshape(n_tri, 9).T.contiguous()
    return [x.to(DEV) for x in (pts, owner, offsets, near.int(), tris, classes, flags)]


def _both(args, **kw):
    return [near_field(*args[:5], backend=b, **kw) for b in ("triton", "torch")]


@pytest.mark.parametrize("n_tri,n_cells,n_points,max_list", [(7, 4, 9, 6), (40, 9, 150, 30), (6, 3, 8, 5)])
def test_near_field_matches_reference(n_tri, n_cells, n_points, max_list, monkeypatch):
    monkeypatch.setattr(mf_triton, "BLOCK_Q_INTERPRET", 64)  # several programs, the last one partly masked
    pts, owner, offsets, near, tris, classes, flags = _case(n_tri, n_cells, n_points, max_list, seed=n_tri)
    args = (pts, owner, offsets, near, tris)
    got, ref = _both(args, need_nearest=True, classes=classes, num_classes=2, edge_flags=flags)
    assert torch.equal(got.dist2, ref.dist2)  # bit-identical distances
    assert torch.equal(got.nearest, ref.nearest)
    assert torch.equal(got.class_dist2, ref.class_dist2)
    assert torch.equal(got.edge_dist2, ref.edge_dist2)
    torch.testing.assert_close(got.winding, ref.winding, atol=2e-6, rtol=0)
    empty = owner == 0
    assert torch.isinf(got.dist2[empty]).all() and (got.nearest[empty] == -1).all()
    assert (got.winding[empty] == 0).all() and torch.isinf(got.edge_dist2[empty]).all()


def test_pair_dist2_matches_reference(monkeypatch):
    monkeypatch.setattr(mf_triton, "BLOCK_Q_INTERPRET", 64)
    pts, owner, offsets, near, tris, *_ = _case(30, 6, 50, 20, seed=5)
    g = torch.Generator().manual_seed(1)
    pi = torch.randint(0, 50, (300,), generator=g).to(DEV)
    ti = torch.randint(0, 30, (300,), generator=g).int().to(DEV)
    got = pair_dist2(pts, pi, ti, tris, backend="triton")
    ref = pair_dist2(pts, pi, ti, tris, backend="torch", chunk=70)
    assert got.shape == (300,) and torch.equal(got, ref)  # bit-identical
    assert pair_dist2(pts, pi[:0], ti[:0], tris, backend="triton").shape == (0,)


def test_nearest_ties_go_to_smallest_id():
    pts, owner, offsets, near, tris, *_ = _case(12, 4, 30, 8, seed=3)
    pts[:4] = tris[:, 3].reshape(3, 3).mean(0)  # on the centroid of triangle 3 and of its duplicate 11
    owner[:4] = 2
    got, ref = _both((pts, owner, offsets, near, tris), need_nearest=True, need_wind=False)
    assert (got.nearest[:4] == 3).all() and torch.equal(got.nearest, ref.nearest)
    assert (got.dist2[:4] < 1e-12).all()


def test_winding_of_closed_mesh_is_integer():
    """A tetrahedron seen from points inside (1) and outside (0), one cell holding all four faces."""
    v = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    tris = v[f].reshape(4, 9).T.contiguous().to(DEV)
    pts = torch.tensor([[0.1, 0.1, 0.1], [0.05, 0.05, 0.2], [0.6, 0.6, 0.6], [-0.1, 0.1, 0.1]], device=DEV)
    owner = torch.zeros(4, dtype=torch.long, device=DEV)
    offsets = torch.tensor([0, 4], device=DEV)
    near = torch.arange(4, device=DEV)
    got = near_field(pts, owner, offsets, near, tris, need_dist=False, backend="triton")
    torch.testing.assert_close(got.winding, torch.tensor([1.0, 1.0, 0.0, 0.0], device=DEV), atol=1e-6, rtol=0)
    assert got.dist2 is None and got.nearest is None


def test_atan2_quadrants_and_signed_zeros():
    """Single-triangle solid angles sweep num/den over all quadrants, including den exactly +-0."""
    ang = torch.linspace(-math.pi, math.pi, 41)
    # A right triangle seen from points around it in its plane's normal direction and in the plane itself.
    tri = torch.tensor([[0.0, 0, 0, 0.4, 0, 0, 0, 0.4, 0]]).T.contiguous()
    pts = torch.stack([0.1 + 0.3 * ang.cos(), 0.1 + 0.3 * ang.sin(), 0.2 * ang.sin()], 1)
    pts = torch.cat([pts, torch.tensor([[0.1, 0.1, 0.0], [0.1, 0.1, -0.0], [0.0, 0.0, 0.0]])])
    args = (pts.to(DEV), torch.zeros(len(pts), dtype=torch.long, device=DEV), torch.tensor([0, 1], device=DEV),
            torch.zeros(1, dtype=torch.long, device=DEV), tri.to(DEV))
    got, ref = _both(args, need_dist=False)
    torch.testing.assert_close(got.winding, ref.winding, atol=1e-6, rtol=0)


def test_backend_choice():
    pts, owner, offsets, near, tris, *_ = _case(5, 3, 6, 4)
    assert BACKENDS.resolve(None, pts) == ("triton" if DEV == "cuda" else "torch")
    with use_backend("mesh_field", "torch"):
        assert BACKENDS.resolve(None, pts) == "torch"
    with pytest.raises(ValueError, match="expected points of shape"):
        near_field(pts[:, :2], owner, offsets, near, tris)
    with pytest.raises(ValueError, match="need_nearest requires need_dist"):
        near_field(pts, owner, offsets, near, tris, need_dist=False, need_nearest=True)
    empty = near_field(pts[:0], owner[:0], offsets, near, tris, backend="triton")
    assert empty.dist2.shape == (0,) and empty.winding.shape == (0,)


@pytest.mark.gpu
def test_near_field_full_size_gpu():
    """200k points, 20k triangles, near lists of up to 300 triangles: same as the torch path."""
    pts, owner, offsets, near, tris, classes, flags = _case(20000, 4000, 200000, 300, seed=7)
    owner, order = torch.sort(owner)  # points of a cell side by side, as the SDF queries them
    pts = pts[order]
    got, ref = _both((pts, owner, offsets, near, tris), need_nearest=True, classes=classes, num_classes=2,
                     edge_flags=flags, chunk=1 << 22)
    assert torch.equal(got.dist2, ref.dist2)
    assert torch.equal(got.nearest, ref.nearest)
    assert torch.equal(got.class_dist2, ref.class_dist2)
    assert torch.equal(got.edge_dist2, ref.edge_dist2)
    torch.testing.assert_close(got.winding, ref.winding, atol=2e-5, rtol=0)
    pi, ti = torch.randint(0, 200000, (1 << 22,), device=DEV), torch.randint(0, 20000, (1 << 22,), device=DEV)
    assert torch.equal(pair_dist2(pts, pi, ti, tris, backend="triton"), pair_dist2(pts, pi, ti, tris, backend="torch"))


def test_size_arguments_are_not_specialised():
    """A one-triangle mesh or a new point count must not compile new kernel variants: the compiled (not
    interpreted) kernels mark their size arguments ``do_not_specialize``."""
    code = ("from d3s2.ops.mesh_field import triton as t\n"
            "for k, names in ((t._near_field_kernel, ('Q', 'F')), (t._pair_dist2_kernel, ('N', 'F'))):\n"
            "    flags = {p.name: p.do_not_specialize for p in k.params}\n"
            "    assert all(flags[n] for n in names), flags\n"
            "    assert not any(flags[p.name] for p in k.params if p.name not in names), flags\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "..", "src"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
