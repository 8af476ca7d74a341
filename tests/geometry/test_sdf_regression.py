"""The igl SDF path gives exactly the stored outputs of its first (slower) implementation.

``data/sdf_regression.npz`` holds the band voxels, distances, sharp flags and block bits computed by
d3s2 at commit 4ba27db (before the CPU speed-ups) for the meshes of :func:`regression_meshes`. Regenerate it
only on purpose: ``PYTHONPATH=src python tests/geometry/test_sdf_regression.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import trimesh

from d3s2.geometry.sdf import compute_sparse_sdf

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "sdf_regression.npz")
CASES = [("holes", 40, 4 / 40), ("parts_sheet", 48, 3 / 48), ("flipped_box", 32, 1 / 16)]


def regression_meshes() -> dict[str, trimesh.Trimesh]:
    """Small meshes exercising every branch: holes (open edges), overlapping parts with sharp edges plus an
    open sheet (lost triangles, internal triangles), and a box with flipped faces."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    holes = sphere.copy()
    holes.update_faces(holes.triangles_center[:, 2] < 0.4)
    b1 = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    b2 = b1.copy()
    b2.apply_translation([0.4, 0.3, 0.2])
    sheet = trimesh.Trimesh([[-0.7, -0.7, -0.6], [0.7, -0.7, -0.6], [0.7, 0.7, -0.5]], [[0, 1, 2]], process=False)
    parts = trimesh.util.concatenate([b1, b2, sheet])
    box = trimesh.creation.box(extents=(1.2, 0.9, 1.0))
    box.apply_transform(trimesh.transformations.rotation_matrix(0.3, [1, 2, 3]))
    faces = np.asarray(box.faces).copy()
    faces[::5] = faces[::5, ::-1]
    flipped = trimesh.Trimesh(box.vertices, faces, process=False)
    return {"holes": holes, "parts_sheet": parts, "flipped_box": flipped}


def _compute() -> dict[str, np.ndarray]:
    meshes = regression_meshes()
    out = {}
    for name, r, band in CASES:
        for k, v in compute_sparse_sdf(meshes[name], r, band=band, backend="igl")[r].to_arrays().items():
            out[f"{name}|{k}"] = v
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_igl_sdf_matches_stored_outputs(name):
    ref = np.load(FIXTURE)
    got = _compute()
    keys = [k for k in ref.files if k.startswith(name + "|")]
    assert keys
    for k in keys:
        if k.endswith("|sdf"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            assert np.array_equal(got[k], ref[k]), k


if __name__ == "__main__":
    arrays = _compute()
    tmp = FIXTURE + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, FIXTURE)


def test_near_primitives_keeps_every_point_within_radius():
    import igl

    from d3s2.geometry.sdf import near_primitives

    rng = np.random.default_rng(0)
    seg = rng.uniform(-0.9, 0.9, (40, 1, 3)) + rng.normal(scale=0.1, size=(40, 2, 3))  # [E, 2, 3] short segments
    pts = rng.uniform(-1, 1, (20000, 3))
    sv = seg.reshape(-1, 3)
    d2, _, _ = igl.point_mesh_squared_distance(pts, sv, np.arange(len(sv)).reshape(-1, 2))
    for radius in (0.01, 0.05):
        near = near_primitives(pts, seg, radius)
        assert near[np.sqrt(d2) <= radius].all()
        assert near.mean() < 0.5  # it does cull
    assert near_primitives(pts, seg[:0], 0.1).sum() == 0
    assert near_primitives(pts, seg, 0.05, max_marks=1).all()  # over budget: no culling
