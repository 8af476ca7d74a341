"""Load, check and normalise triangle meshes.

Every mesh entering d3s2 goes through :func:`load_mesh` (files) or :func:`validate_mesh` (arrays), so bad
input fails early with a :class:`MeshError` that names the file and the problem. :func:`normalize_mesh`
maps a mesh into the cube ``[-scale, scale]^3`` and returns the transform, so results can be mapped back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import trimesh

MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf", ".pmd")


class MeshError(ValueError):
    """A mesh that cannot be used; the message names the file (or array) and the problem."""


def _merge_scene(scene: trimesh.Scene) -> trimesh.Trimesh:
    # Apply each node's transform, then concatenate: the result lives in the scene's world frame.
    parts = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name]
        if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
            part = trimesh.Trimesh(vertices=geom.vertices, faces=geom.faces, process=False)
            part.apply_transform(transform)
            parts.append(part)
    if not parts:
        return trimesh.Trimesh()
    return trimesh.util.concatenate(parts)


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """Read OBJ/PLY/STL/OFF/GLB/GLTF/PMD into one triangle mesh (scenes merged with their transforms).

    Raises :class:`MeshError` if the file is missing or unreadable, empty, has NaN/inf vertices, no faces
    or only degenerate (zero-area) faces. Vertices are float64 ``[V, 3]``, faces int64 ``[F, 3]``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MeshError(f"{path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(f"{path}: unsupported mesh format {suffix!r}, expected one of {', '.join(MESH_SUFFIXES)}")
    if os.path.getsize(path) == 0:
        raise MeshError(f"{path}: file is empty")
    if suffix == ".pmd":
        from .pmd import load_pmd  # imported here: pmd.py builds on this module

        return load_pmd(path)
    try:
        loaded = trimesh.load(path, force=None, process=False)
    except Exception as err:  # trimesh raises many exception types for malformed files
        raise MeshError(f"{path}: unreadable mesh file ({type(err).__name__}: {err})") from err
    if isinstance(loaded, trimesh.Scene):
        loaded = _merge_scene(loaded)
        # trimesh reads a file of garbage in a text format as a scene with nothing in it.
        if len(loaded.faces) == 0:
            raise MeshError(f"{path}: no triangles could be read (not a valid {suffix[1:].upper()} file, or one "
                            "without faces)")
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshError(f"{path}: expected a triangle mesh, got {type(loaded).__name__} (no faces)")
    return validate_mesh(loaded.vertices, loaded.faces, name=path)


def validate_mesh(vertices: np.ndarray, faces: np.ndarray, name: str = "mesh") -> trimesh.Trimesh:
    """Check in-memory arrays (``vertices [V, 3]``, ``faces [F, 3]``) and wrap them in a Trimesh.

    Same checks as :func:`load_mesh`; ``name`` is used in error messages.
    """
    vertices = np.asarray(vertices)
    faces = np.asarray(faces)
    if vertices.size == 0:
        raise MeshError(f"{name}: mesh is empty (no vertices)")
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise MeshError(f"{name}: expected vertices of shape [V, 3], got {list(vertices.shape)}")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices)).any(axis=1).sum())
        raise MeshError(f"{name}: {bad} vertices have NaN or inf coordinates")
    if faces.size == 0:
        raise MeshError(f"{name}: mesh has no faces")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(f"{name}: expected triangle faces of shape [F, 3], got {list(faces.shape)}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise MeshError(f"{name}: expected integer face indices, got {faces.dtype}")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(f"{name}: face indices out of range [0, {len(vertices)})")
    vertices = vertices.astype(np.float64)
    faces = faces.astype(np.int64)
    lo = vertices.min(axis=0)
    with np.errstate(over="ignore"):
        extent = float((vertices.max(axis=0) - lo).max())
    if not np.isfinite(extent):
        raise MeshError(f"{name}: coordinates span more than float64 holds ({lo.min():.3g} to "
                        f"{vertices.max():.3g}); expected a finite bounding box")
    # Areas in units of the mesh size: no overflow for enormous coordinates, and a relative threshold
    # (a face is degenerate when its area is negligible against the mesh size).
    tri = (vertices[faces] - lo) / max(extent, np.finfo(np.float64).tiny)  # [F, 3, 3]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if not (area2 > 1e-12).any():
        raise MeshError(f"{name}: all {len(faces)} faces are degenerate (zero area)")
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


@dataclass
class NormalizeTransform:
    """``normalized = (original - center) * scale``; :meth:`inverse` maps normalized points back."""

    center: np.ndarray  # float64 [3]
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.center) * self.scale

    def inverse(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + self.center

    def to_dict(self) -> dict[str, list[float] | float]:
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}


def normalize_mesh(mesh: trimesh.Trimesh, scale: float = 0.95) -> tuple[trimesh.Trimesh, NormalizeTransform]:
    """Centre the bounding box at the origin and scale its longest side to ``2 * scale``.

    Returns the new mesh (in ``[-scale, scale]^3``) and the transform that produced it.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"expected 0 < scale <= 1, got {scale}")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    center = (lo + hi) / 2
    half = float((hi - lo).max()) / 2
    if half <= 0:
        raise MeshError("mesh: all vertices coincide, cannot normalise")
    transform = NormalizeTransform(center=center, scale=scale / half)
    out = trimesh.Trimesh(vertices=transform.apply(vertices), faces=np.asarray(mesh.faces), process=False)
    return out, transform
