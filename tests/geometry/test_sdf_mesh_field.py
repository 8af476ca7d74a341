"""The torch SDF backend gives the same SparseSDF whether its near-list op runs the Triton kernel or the torch
pair tensors (without CUDA: the kernel under TRITON_INTERPRET=1 on a tiny mesh at a small resolution)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import trimesh

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first use of the triton backend)

pytest.importorskip("triton")

from d3s2.geometry.sdf import compute_sparse_sdf  # noqa: E402
from d3s2.ops import use_backend  # noqa: E402


def _holed_sphere(subdivisions: int) -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    sphere.update_faces(sphere.triangles_center[:, 2] < 0.4)  # an open cap: a membrane, open edges, closure
    return sphere


def _both(mesh: trimesh.Trimesh, r: int, device: str):
    out = []
    for name in ("triton", "torch"):
        with use_backend("mesh_field", name):
            out.append(compute_sparse_sdf(mesh, r, band=3 / r, device=device, backend="torch")[r].to_arrays())
    return out


def _assert_same(a: dict, b: dict) -> None:
    for k in a:
        if k == "sdf":  # distances are bit-identical; a sign could differ only at a winding-number tie
            assert np.array_equal(np.abs(a[k]), np.abs(b[k])), k
            assert (np.sign(a[k]) != np.sign(b[k])).mean() < 1e-4, k
        else:
            assert np.array_equal(a[k], b[k]), k


def test_torch_field_through_triton_kernel_gives_the_same_sdf():
    a, b = _both(_holed_sphere(0), 16, "cpu")
    _assert_same(a, b)


@pytest.mark.gpu
def test_cuda_field_through_triton_kernel_gives_the_same_sdf(monkeypatch):
    import d3s2.geometry._field as field_mod

    mesh = _holed_sphere(4)
    # With the kernel, winding numbers of up to 2^28 pairs are summed brute force (exact near and far); the same
    # threshold on both paths makes them evaluate the same sums.
    with monkeypatch.context() as m:
        m.setattr(field_mod, "_BRUTE_FORCE_PAIRS_KERNEL", field_mod._BRUTE_FORCE_PAIRS)
        for r in (64, 256):
            _assert_same(*_both(mesh, r, "cuda"))
    # Default thresholds: far fields interpolated on one path only, so inside bits may differ where the winding
    # number is within the interpolation error of 1/2, nowhere else.
    a, b = _both(mesh, 256, "cuda")
    for k in ("coords", "sharp", "block_coords"):
        assert np.array_equal(a[k], b[k]), k
    assert np.array_equal(np.abs(a["sdf"]), np.abs(b["sdf"])) and (np.sign(a["sdf"]) != np.sign(b["sdf"])).mean() < 1e-4
    assert np.unpackbits(a["block_inside"] ^ b["block_inside"]).mean() < 1e-4
