"""Write meshes to GLB/OBJ/PLY/STL atomically, with optional decimation to a target face count."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh

from ..fileio import atomic_write

EXPORT_FORMATS = ("glb", "obj", "ply", "stl")


def decimate(mesh: trimesh.Trimesh, num_faces: int) -> trimesh.Trimesh:
    """Quadric-error decimation to about ``num_faces`` faces (``fast-simplification``, the ``data`` extra)."""
    if num_faces <= 0:
        raise ValueError(f"expected a positive face count, got {num_faces}")
    if len(mesh.faces) <= num_faces:
        return mesh
    try:
        import fast_simplification
    except ImportError as err:
        raise RuntimeError("decimation needs fast-simplification: pip install 'd3s2[data]'") from err
    v, f = fast_simplification.simplify(np.asarray(mesh.vertices, dtype=np.float64),
                                        np.asarray(mesh.faces, dtype=np.int64), target_count=int(num_faces))
    return trimesh.Trimesh(vertices=v, faces=f, process=False)


def check_export_path(path: str | os.PathLike) -> str:
    """The export format of ``path`` (its suffix), after checking that a mesh file can be written there; call it
    before the work whose result goes there.

    Raises:
        ValueError: an unsupported suffix, an existing folder at ``path``, a file where a parent folder goes, or
            no permission to write in the nearest existing folder (the ones below it are made on writing).
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"{path}: unsupported export format {fmt!r}, expected one of {', '.join(EXPORT_FORMATS)}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, expected a mesh file name")
    nearest = next(parent for parent in path.parents if parent.exists())  # "." or "/" at the latest
    if not nearest.is_dir():
        raise ValueError(f"{path}: {nearest} is a file, expected a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: no permission to write in {nearest}")
    return fmt


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, *, num_faces: int | None = None) -> str:
    """Write ``mesh`` to ``path`` (format from the suffix), via a temporary file renamed into place.

    ``num_faces`` decimates first. Returns the path written.
    """
    path = os.fspath(path)
    fmt = check_export_path(path)
    if num_faces is not None:
        mesh = decimate(mesh, num_faces)
    atomic_write(path, lambda f: mesh.export(f, file_type=fmt))
    return path
