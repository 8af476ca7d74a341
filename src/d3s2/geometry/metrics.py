"""Geometry metrics for evaluation, all in the units of the inputs (``[-1, 1]`` after normalisation).

- Chamfer-L1: mean over both directions of the mean Euclidean distance from area-uniform surface samples of
  one mesh to the other mesh's surface (exact point-to-triangle distance, so no sampling floor);
  Chamfer-L2: the same with squared distances.
- F-score at threshold t: harmonic mean of precision (predicted samples within t of the reference) and
  recall (reference samples within t of the prediction); reported at 0.01 and 0.005.
- Normal consistency: mean |cos| between each sample's face normal and the normal of the closest face of the
  other mesh, both ways.
- Volume IoU: on uniform points in the bounding cube, inside = generalised winding number >= 1/2 (the same
  rule as :mod:`d3s2.geometry.sdf`).
- Watertightness: every edge shared by exactly two faces with opposite orientations (trimesh).
"""

from __future__ import annotations

import numpy as np
import trimesh


def sample_surface(mesh: trimesh.Trimesh, num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(points [num, 3], unit face normals [num, 3]) sampled uniformly by area, deterministic for a seed."""
    points, face = trimesh.sample.sample_surface(mesh, num, seed=seed)
    return np.asarray(points), np.asarray(mesh.face_normals)[face]


def _to_surface(points: np.ndarray, mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """(distance [Q], closest face [Q]) from points to the mesh surface (libigl AABB tree)."""
    import igl

    d2, face, _ = igl.point_mesh_squared_distance(np.ascontiguousarray(points, dtype=np.float64),
                                                  np.ascontiguousarray(mesh.vertices, dtype=np.float64),
                                                  np.ascontiguousarray(mesh.faces, dtype=np.int64))
    return np.sqrt(d2), face


def inside(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """bool [Q]: winding number >= 1/2 (libigl's fast winding number)."""
    import igl

    w = igl.fast_winding_number(np.ascontiguousarray(mesh.vertices, dtype=np.float64),
                                np.ascontiguousarray(mesh.faces, dtype=np.int64),
                                np.ascontiguousarray(points, dtype=np.float64))
    return w >= 0.5


def volume_iou(pred: trimesh.Trimesh, ref: trimesh.Trimesh, num_points: int = 100_000, seed: int = 0) -> float:
    """IoU of the solids, estimated on uniform points in the cube [-1, 1]^3."""
    pts = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(num_points, 3))
    a, b = inside(pred, pts), inside(ref, pts)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mesh_metrics(pred: trimesh.Trimesh, ref: trimesh.Trimesh, *, num_samples: int = 100_000,
                 thresholds: tuple[float, ...] = (0.01, 0.005), num_volume_points: int = 100_000,
                 seed: int = 0) -> dict[str, float]:
    """All metrics of the module docstring for a predicted and a reference mesh (both already aligned)."""
    p, pn = sample_surface(pred, num_samples, seed)
    r, rn = sample_surface(ref, num_samples, seed + 1)
    d_pr, f_pr = _to_surface(p, ref)  # pred samples -> ref surface
    d_rp, f_rp = _to_surface(r, pred)
    out = {
        "chamfer_l1": float((d_pr.mean() + d_rp.mean()) / 2),
        "chamfer_l2": float(((d_pr**2).mean() + (d_rp**2).mean()) / 2),
        "normal_consistency": float((np.abs((pn * np.asarray(ref.face_normals)[f_pr]).sum(1)).mean()
                                     + np.abs((rn * np.asarray(pred.face_normals)[f_rp]).sum(1)).mean()) / 2),
    }
    for t in thresholds:
        precision, recall = (d_pr < t).mean(), (d_rp < t).mean()
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[f"fscore@{t:g}"] = float(f)
    out["volume_iou"] = volume_iou(pred, ref, num_volume_points, seed)
    out["watertight"] = float(pred.is_watertight)
    return out
