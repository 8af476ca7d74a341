"""Importer for 0 A.D. PMD meshes (the game's binary model format), so the 0 A.D. corpus can be rebuilt.

Layout (little-endian), versions 1–4: ``b"PSMD"``, u32 version, u32 data size (bytes after this field),
u32 num_vertices, then (version ≥ 4 only) u32 num_uv_sets (1 before version 4); per vertex: position 3×f32,
normal 3×f32, num_uv_sets × uv 2×f32, 4×u8 bone ids, 4×f32 bone weights; then u32 num_faces and
num_faces × 3 u16 vertex indices. Bones and prop points follow; they are not needed for geometry.

Dimension legend: V vertices, F faces, T uv sets.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from d3s2.geometry.mesh_io import MeshError, validate_mesh

MAGIC = b"PSMD"
SUPPORTED_VERSIONS = (1, 2, 3, 4)
# Bytes per vertex besides the uv sets: position + normal (6 f32), bone ids (4 u8), weights (4 f32).
_VERTEX_FIXED_BYTES = 6 * 4 + 4 + 4 * 4


class PMDError(MeshError):
    """A PMD file that cannot be parsed; the message names the file and the problem."""


def _vertex_dtype(num_uv_sets: int) -> np.dtype:
    fields = [("pos", "<f4", (3,)), ("normal", "<f4", (3,))]
    if num_uv_sets:
        fields.append(("uv", "<f4", (num_uv_sets, 2)))
    fields += [("bones", "u1", (4,)), ("weights", "<f4", (4,))]
    return np.dtype(fields)


def parse_pmd(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parse PMD bytes into ``vertices`` float32 ``[V, 3]`` and ``faces`` int64 ``[F, 3]``.

    Raises:
        PMDError: bad magic, unsupported version, truncated data or a face index out of range.
    """
    if len(data) < 16 or data[:4] != MAGIC:
        raise PMDError(f"{name}: not a PMD file (expected magic {MAGIC!r}, got {data[:4]!r})")
    version, _size, num_vertices = struct.unpack_from("<III", data, 4)
    if version not in SUPPORTED_VERSIONS:
        raise PMDError(f"{name}: unsupported PMD version {version}, expected one of {SUPPORTED_VERSIONS}")
    offset = 16
    num_uv_sets = 1
    if version >= 4:
        if len(data) < offset + 4:
            raise PMDError(f"{name}: truncated PMD header")
        (num_uv_sets,) = struct.unpack_from("<I", data, offset)
        offset += 4
    dtype = _vertex_dtype(num_uv_sets)
    vertex_bytes = num_vertices * dtype.itemsize
    if len(data) < offset + vertex_bytes + 4:
        raise PMDError(f"{name}: truncated PMD: {num_vertices} vertices need {vertex_bytes} bytes, "
                       f"got {max(len(data) - offset, 0)}")
    verts = np.frombuffer(data, dtype=dtype, count=num_vertices, offset=offset)["pos"]
    offset += vertex_bytes
    (num_faces,) = struct.unpack_from("<I", data, offset)
    offset += 4
    if len(data) < offset + num_faces * 6:
        raise PMDError(f"{name}: truncated PMD: {num_faces} faces need {num_faces * 6} bytes, "
                       f"got {len(data) - offset}")
    faces = np.frombuffer(data, dtype="<u2", count=num_faces * 3, offset=offset).reshape(num_faces, 3)
    if num_faces and int(faces.max()) >= num_vertices:
        raise PMDError(f"{name}: face index {int(faces.max())} out of range for {num_vertices} vertices")
    return np.array(verts, dtype=np.float32), faces.astype(np.int64)


def read_pmd(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.pmd`` file: ``vertices`` float32 ``[V, 3]``, ``faces`` int64 ``[F, 3]``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PMDError(f"{path}: cannot read ({err.strerror or err})") from err
    return parse_pmd(data, str(path))


def load_pmd(path: str | Path):
    """Read a ``.pmd`` file as a validated, outward-facing ``trimesh.Trimesh`` (same checks as :func:`load_mesh`).

    PMD triangles are wound clockwise (the game's front-face convention), so the winding is reversed;
    :func:`read_pmd` keeps the file order.
    """
    vertices, faces = read_pmd(path)
    return validate_mesh(vertices, faces[:, ::-1].copy(), str(path))


def write_pmd(path: str | Path, vertices: np.ndarray, faces: np.ndarray, *, normals: np.ndarray | None = None,
              uvs: np.ndarray | None = None) -> None:
    """Write a version-4 PMD with no bones (weights 0, bone ids 0xFF) and no prop points.

    Args:
        vertices: ``[V, 3]`` positions. faces: ``[F, 3]`` indices < min(V, 65536).
        normals: ``[V, 3]`` (zeros if None). uvs: ``[V, T, 2]`` or ``[V, 2]`` (one zero set if None).
    """
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"expected vertices of shape [V, 3], got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"expected faces of shape [F, 3], got {faces.shape}")
    num_vertices = vertices.shape[0]
    if num_vertices > 65536:
        raise ValueError(f"PMD indexes vertices with u16: expected at most 65536 vertices, got {num_vertices}")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"expected face indices in [0, {num_vertices}), got [{faces.min()}, {faces.max()}]")
    uv = np.zeros((num_vertices, 1, 2), np.float32) if uvs is None else np.asarray(uvs, np.float32)
    if uv.ndim == 2:
        uv = uv[:, None, :]
    rec = np.zeros(num_vertices, dtype=_vertex_dtype(uv.shape[1]))
    rec["pos"] = vertices
    rec["normal"] = 0.0 if normals is None else np.asarray(normals, np.float32)
    rec["uv"] = uv
    rec["bones"] = 0xFF
    body = b"".join([
        struct.pack("<II", num_vertices, uv.shape[1]), rec.tobytes(),
        struct.pack("<I", faces.shape[0]), faces.astype("<u2").tobytes(),
        struct.pack("<II", 0, 0),  # no bones, no prop points
    ])
    data = MAGIC + struct.pack("<II", 4, len(body)) + body
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def iter_pmd_zip(zip_path: str | Path, prefix: str = "art/meshes/") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(path_in_zip, vertices [V, 3], faces [F, 3])`` for every ``*.pmd`` under ``prefix``, sorted."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.lower().endswith(".pmd"))
        for n in names:
            verts, faces = parse_pmd(zf.read(n), f"{zip_path}:{n}")
            yield n, verts, faces


def pmd_zip_to_npz(zip_path: str | Path, out_path: str | Path, prefix: str = "art/meshes/") -> int:
    """Rebuild the corpus npz (``0ad_meshes.npz`` format) from the game's ``public.zip``; returns the mesh count.

    Keys are the path inside the zip with ``/`` replaced by ``|`` plus ``|v`` (float32 ``[V, 3]``) and ``|f``
    (uint16 ``[F, 3]``).
    """
    arrays: dict[str, np.ndarray] = {}
    for n, verts, faces in iter_pmd_zip(zip_path, prefix):
        key = n.replace("/", "|")
        arrays[f"{key}|v"] = verts
        arrays[f"{key}|f"] = faces.astype(np.uint16)
    out_path = Path(out_path)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out_path)
    return len(arrays) // 2
