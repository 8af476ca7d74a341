"""The torch SDF field's hierarchical winding numbers (near lists plus interpolated far fields, all levels under one
global cell id) against exact sums over every triangle."""

from __future__ import annotations

import numpy as np
import torch
import trimesh

import d3s2.geometry._field as field_mod
from d3s2.geometry._field import TorchField


def _holed_sphere() -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    sphere.update_faces(sphere.triangles_center[:, 2] < 0.4)  # open edges: non-integer winding numbers
    return sphere


def test_hierarchical_winding_matches_brute_force(monkeypatch):
    mesh = _holed_sphere()
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(3000, 3, generator=g, dtype=torch.float64) * 2 - 1
    pts[:1000] *= 0.7  # many points near the surface: deep cells
    field = TorchField(mesh.vertices, mesh.faces, band=1 / 64, device="cpu")
    field.prepare(64, 1 / 64 + 2 / 64)
    monkeypatch.setattr(field_mod, "_BRUTE_FORCE_PAIRS", 1 << 62)
    exact = field.winding(pts)
    monkeypatch.setattr(field_mod, "_BRUTE_FORCE_PAIRS", 0)
    levels = field._locate(pts.float())
    assert len(torch.unique(field._flat().level[levels])) >= 3  # points owned by cells of several levels
    split = torch.cat([field.winding(pts[:1700]), field.winding(pts[1700:])])  # the second call reuses far fields
    assert bool(field._flat().has.any()) and not bool(field._flat().has.all())  # far fields filled lazily
    fresh = TorchField(mesh.vertices, mesh.faces, band=1 / 64, device="cpu")
    fresh.prepare(64, 1 / 64 + 2 / 64)
    whole = fresh.winding(pts)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)  # batching does not change the values
    err = (whole - exact).abs()
    assert float(err.max()) < 2e-2 and float(err.median()) < 1e-3, (float(err.max()), float(err.median()))
    far = (exact - 0.5).abs() > 2e-2
    assert torch.equal((whole >= 0.5)[far], (exact >= 0.5)[far])
    # Closed and open parts behave: inside the sphere (below the hole) ~1, far outside ~0.
    probe = torch.tensor([[0.0, 0.0, -0.3], [0.9, 0.9, 0.9]], dtype=torch.float64)
    monkeypatch.setattr(field_mod, "_BRUTE_FORCE_PAIRS", 0)
    w = fresh.winding(probe)
    assert abs(float(w[0]) - 1) < 0.1 and abs(float(w[1])) < 0.05
    assert np.isfinite(w.numpy()).all()
