"""Narrow-band signed distance fields on sparse voxels: the SS-VAE's input and target.

Grid: at resolution ``R`` the cube ``[-1, 1]^3`` is split into ``R^3`` voxels of size ``h = 2 / R``; voxel
``(i, j, k)`` has its centre at ``(index + 0.5) * h - 1``. The band of width ``tau`` (``band``, in ``[-1, 1]``
units, default 1/128: 4 voxels at 1024³, 2 at 512³, 1 at 256³) is the set of voxels whose centre lies
closer than ``tau`` to the surface. No dense ``R^3`` array is ever built: candidate cells are refined
coarse to fine, keeping only cells that can reach the band, so memory grows with the band, not with ``R^3``.

Inside/outside rule (the sign): a point is **inside** (negative distance) when the generalised winding
number of the mesh at that point is at least 1/2, and outside otherwise. The winding number counts how
many times the surface wraps around the point; it is 1 inside and 0 outside a closed, outward-oriented
mesh, and it degrades gracefully on real meshes:

- holes: the value drops smoothly to 1/2 across the hole, so the surface is closed by a "membrane" where
  the winding number crosses 1/2 (a minimal-area-like cap spanning the hole);
- several parts, self-intersections and duplicated faces: windings add up (2 where two parts overlap),
  so overlapping parts form their union;
- flipped faces: a few flipped faces only change the sign in a small lens near each flipped face
  (about the face's own size); a mesh whose every face is flipped is read inside-out;
- open sheets (a leaf, a single-sided wall, a flag) enclose nothing, so the winding number is below 1/2
  on both sides: such "lost" triangles (found by evaluating the winding number just in front of and behind
  each triangle) are thickened into a closed shell of half-thickness one voxel, and the solid is the union
  of the winding-number solid and these shells. Triangles with the inside on both sides (inside another
  part, duplicates) are internal and ignored. The distance is measured to the boundary of that solid:
  ``sdf = min(±distance to boundary triangles, distance to lost triangles - h)``;
- inside-out as a whole: a closed mesh with negative signed volume, and an open mesh in which no triangle
  bounds the solid but some read as inside on both sides (crossed billboard quads wound clockwise), have
  their faces reversed first. A mesh left with no boundary or lost triangle is an error.

Off-band voxels on the outer faces of the grid count as outside, so the surface also closes there.

The band is *closed*: every occupied 8³ block stores the inside bit of all its 512 voxels, and blocks are
added where a sign change (a hole's membrane, or a band thinner than a voxel) reaches the side of an
occupied block whose neighbour is missing, until no sign change touches a missing neighbour. Marching
cubes over the truncated field of the occupied blocks (:meth:`SparseSDF.block_targets`) is then watertight.

Sharp voxels: band voxels closer than ``tau`` to a mesh edge whose dihedral angle (the angle between the
two face normals) exceeds ``sharp_angle_deg``.

Backends: ``"igl"`` (CPU, libigl's AABB distance and fast winding number) and ``"torch"`` (CPU or CUDA,
this module's own multilevel evaluator, see :mod:`d3s2.geometry._field`; its inner loops are the op
:mod:`d3s2.ops.mesh_field`, Triton kernels on CUDA). Both follow the rule above.
Everything after the distance queries (sorting, sign components, sign propagation, block closure) runs in
torch on the field's device, so the CUDA path keeps its band voxels on the GPU; connected components use
scipy on the CPU and :func:`label_components` elsewhere.

Dimension legend: N band voxels, NB occupied blocks, F triangles, R resolution.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

logger = logging.getLogger(__name__)

BLOCK = 8  # voxels per block side; the VAE decodes whole 8³ blocks
MAX_RESOLUTION = 2048
_BLOCK_VOXELS = BLOCK**3


@dataclass
class SparseSDF:
    """Band voxels of one mesh at one resolution, plus inside bits for every voxel of occupied blocks.

    Attributes:
        coords: int32 ``[N, 3]`` voxel indices ``(x, y, z)`` in ``[0, R)``, sorted by ``(x, y, z)``.
        sdf: float32 ``[N]`` signed distance in ``[-1, 1]`` units, negative inside, ``|sdf| < band``.
        sharp: bool ``[N]`` voxel lies within ``band`` of a sharp mesh edge.
        resolution: R.
        band: tau, the band half-width in ``[-1, 1]`` units.
        block_coords: int32 ``[NB, 3]`` occupied 8³ blocks ``(bx, by, bz)`` sorted lexicographically; every block
            holding a band voxel plus blocks added to close the band (see the module docstring).
        block_inside: uint8 ``[NB, 64]``: ``np.packbits`` of the 512 inside bits of each block, voxel order
            ``(lx, ly, lz)`` lexicographic (z fastest): bit ``(lx * 8 + ly) * 8 + lz``, big-endian bit order.
    """

    coords: np.ndarray
    sdf: np.ndarray
    sharp: np.ndarray
    resolution: int
    band: float
    block_coords: np.ndarray
    block_inside: np.ndarray

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (dataset files)."""
        return {
            "coords": self.coords.astype(np.int32),
            "sdf": self.sdf.astype(np.float32),
            "sharp": np.packbits(self.sharp.astype(bool)),
            "num_voxels": np.asarray(len(self), dtype=np.int64),
            "resolution": np.asarray(self.resolution, dtype=np.int64),
            "band": np.asarray(self.band, dtype=np.float64),
            "block_coords": self.block_coords.astype(np.int32),
            "block_inside": self.block_inside.astype(np.uint8),
        }

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> SparseSDF:
        """Inverse of :meth:`to_arrays` (accepts an ``NpzFile``)."""
        missing = {"coords", "sdf", "sharp", "num_voxels", "resolution", "band", "block_coords", "block_inside"}
        missing -= set(d.keys())
        if missing:
            raise ValueError(f"SparseSDF arrays: missing keys {sorted(missing)}")
        n = int(d["num_voxels"])
        return cls(
            coords=np.asarray(d["coords"], dtype=np.int32),
            sdf=np.asarray(d["sdf"], dtype=np.float32),
            sharp=np.unpackbits(np.asarray(d["sharp"], dtype=np.uint8), count=n).astype(bool),
            resolution=int(d["resolution"]),
            band=float(d["band"]),
            block_coords=np.asarray(d["block_coords"], dtype=np.int32),
            block_inside=np.asarray(d["block_inside"], dtype=np.uint8),
        )

    def inside_blocks(self) -> np.ndarray:
        """bool ``[NB, 8, 8, 8]`` inside bits of every voxel of every occupied block, indexed ``[b, lx, ly, lz]``."""
        bits = np.unpackbits(self.block_inside, axis=1, count=_BLOCK_VOXELS).astype(bool)
        return bits.reshape(-1, BLOCK, BLOCK, BLOCK)

    def block_targets(self, block_size: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """Truncated SDF target for every voxel of every occupied block.

        Returns ``(blocks int32 [NB', 3], target float32 [NB', block_size^3])``: inside the band the signed
        distance, outside it ``-band`` (inside) or ``+band`` (outside). Voxel order inside a block is
        ``(lx, ly, lz)`` lexicographic, z fastest: column ``(lx * s + ly) * s + lz``; voxel coordinate
        ``block * block_size + (lx, ly, lz)``. ``block_size`` must divide 8; smaller blocks are the
        sub-blocks of the stored 8³ blocks (all of them, including those without band voxels).
        """
        if block_size <= 0 or BLOCK % block_size:
            raise ValueError(f"block_size must divide {BLOCK}, got {block_size}")
        inside = self.inside_blocks()
        target = np.where(inside, -self.band, self.band).astype(np.float32)  # [NB, 8, 8, 8]
        if len(self):
            rows = _lookup(_keys(self.block_coords, self.resolution // BLOCK),
                           _keys(self.coords // BLOCK, self.resolution // BLOCK))
            local = self.coords % BLOCK
            target[rows, local[:, 0], local[:, 1], local[:, 2]] = self.sdf
        if block_size == BLOCK:
            return self.block_coords.copy(), target.reshape(-1, _BLOCK_VOXELS)
        f = BLOCK // block_size
        nb = target.shape[0]
        # [NB, f, s, f, s, f, s] -> [NB, f, f, f, s, s, s]
        sub = target.reshape(nb, f, block_size, f, block_size, f, block_size).transpose(0, 1, 3, 5, 2, 4, 6)
        offs = np.stack(np.meshgrid(np.arange(f), np.arange(f), np.arange(f), indexing="ij"), -1).reshape(-1, 3)
        blocks = (self.block_coords[:, None, :] * f + offs[None]).reshape(-1, 3).astype(np.int32)
        return blocks, sub.reshape(-1, block_size**3).copy()

    def dense(self) -> np.ndarray:
        """float32 ``[R, R, R]`` truncated field (``+band`` away from occupied blocks). For tests and small R."""
        r = self.resolution
        grid = np.full((r, r, r), self.band, dtype=np.float32)
        blocks, target = self.block_targets()
        vox = target.reshape(-1, BLOCK, BLOCK, BLOCK)
        for b, (bx, by, bz) in enumerate(blocks * BLOCK):
            grid[bx:bx + BLOCK, by:by + BLOCK, bz:bz + BLOCK] = vox[b]
        return grid


# ---------------------------------------------------------------------------------------------- helpers
def _keys(coords, r: int):
    """int64 [M] lexicographic key of integer coords [M, 3] in [0, r) (numpy array or torch tensor)."""
    c = coords.long() if isinstance(coords, torch.Tensor) else coords.astype(np.int64)
    return (c[:, 0] * r + c[:, 1]) * r + c[:, 2]


def _lookup(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query key in ``sorted_keys`` (keys must be present)."""
    return np.searchsorted(sorted_keys, query)


def _narrow(values: torch.Tensor, bound: int) -> torch.Tensor:
    """int32 copy of int64 ``values`` in ``[0, bound)`` when they fit (sorting them is then about twice as fast on a
    GPU: half the radix passes), else ``values``."""
    return values.int() if bound <= 2**31 else values


def _member(sorted_keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found bool [M], row int64 [M]) for each query key in ``sorted_keys``."""
    if sorted_keys.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device), torch.zeros_like(query)
    row = torch.searchsorted(sorted_keys, query).clamp_max(sorted_keys.numel() - 1)
    return sorted_keys[row] == query, row


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [M, L / 8]: ``np.packbits(bits, axis=1)`` of bool ``[M, L]`` (L a multiple of 8), on bits' device."""
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (bits.reshape(bits.shape[0], -1, 8).to(torch.uint8) * weights).sum(-1).to(torch.uint8)


def voxel_centers(coords, resolution: int):
    """float64 [M, 3] centres of voxels ``coords`` [M, 3] at ``resolution`` (numpy array or torch tensor)."""
    c = coords.double() if isinstance(coords, torch.Tensor) else coords.astype(np.float64)
    return (c + 0.5) * (2.0 / resolution) - 1.0


def _block_offsets() -> np.ndarray:
    """int64 [512, 3] local voxel offsets in (lx, ly, lz) lexicographic order."""
    g = np.arange(BLOCK)
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)


def sharp_face_edges(mesh: trimesh.Trimesh, angle_deg: float) -> np.ndarray:
    """bool [F, 3]: edge (v0v1, v1v2, v2v0) of each face is sharp (dihedral angle above ``angle_deg``).

    Vertices are merged by position first, so triangle soups (common in game assets) still have adjacency.
    """
    faces = np.asarray(mesh.faces)
    flags = np.zeros((len(faces), 3), dtype=bool)
    merged = trimesh.Trimesh(vertices=mesh.vertices, faces=faces, process=False)
    merged.merge_vertices()
    if len(merged.faces) < 2:
        return flags
    sharp = merged.face_adjacency_angles > math.radians(angle_deg)  # [A] angle between adjacent face normals
    pairs = merged.face_adjacency[sharp]  # [S, 2] faces
    edges = np.sort(merged.face_adjacency_edges[sharp], axis=1)  # [S, 2] merged vertex ids
    mf = np.asarray(merged.faces)
    local = np.sort(np.stack([mf[:, [0, 1]], mf[:, [1, 2]], mf[:, [2, 0]]], axis=1), axis=2)  # [F, 3, 2]
    for side in range(2):
        f = pairs[:, side]
        match = (local[f] == edges[:, None, :]).all(axis=2)  # [S, 3]
        rows, cols = np.nonzero(match)
        flags[f[rows], cols] = True
    return flags


def open_face_edges(mesh: trimesh.Trimesh) -> np.ndarray:
    """bool [F, 3]: face edges whose orientations do not cancel (after merging vertices by position).

    On a closed, consistently oriented surface (also several overlapping ones) every edge is used once in
    each direction and the winding number is an integer off the surface; near the other edges (holes,
    flipped faces, non-manifold fans) it can take any value, so signs there are evaluated voxel by voxel.
    """
    merged = trimesh.Trimesh(vertices=mesh.vertices, faces=np.asarray(mesh.faces), process=False)
    merged.merge_vertices()
    f = np.asarray(merged.faces)
    u = f.reshape(-1)
    v = f[:, [1, 2, 0]].reshape(-1)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    _, inv = np.unique(lo.astype(np.int64) * (len(merged.vertices) + 1) + hi, return_inverse=True)
    balance = np.bincount(inv, weights=np.where(u < v, 1.0, -1.0))
    return (balance[inv] != 0).reshape(-1, 3)


def _sharp_segments(mesh: trimesh.Trimesh, flags: np.ndarray) -> np.ndarray:
    """float64 [E, 2, 3] end points of the flagged face edges."""
    tri = np.asarray(mesh.vertices)[np.asarray(mesh.faces)]  # [F, 3, 3]
    seg = np.stack([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]], axis=1)  # [F, 3, 2, 3]
    return seg[flags]


def near_primitives(points: np.ndarray, prims: np.ndarray, radius: float, cells: tuple[int, ...] = (128, 64, 32),
                    max_marks: int = 1 << 22) -> np.ndarray:
    """bool [Q]: a superset of the points closer than ``radius`` to some primitive.

    ``points`` [Q, 3] and ``prims`` [E, k, 3] (segments or triangles) in ``[-1, 1]^3``. Each primitive marks the
    cells of a ``c^3`` grid that its bounding box grown by ``radius`` touches; a point in an unmarked cell is
    farther than ``radius`` from every primitive. ``c`` is the finest of ``cells`` with at most ``max_marks``
    marks (else every point is returned). Lets exact distance queries skip most far points.
    """
    if len(prims) == 0:
        return np.zeros(len(points), dtype=bool)
    for c in cells:
        size = 2.0 / c
        lo = np.clip(np.floor((prims.min(1) - radius + 1.0) / size).astype(np.int64), 0, c - 1)  # [E, 3]
        hi = np.clip(np.floor((prims.max(1) + radius + 1.0) / size).astype(np.int64), 0, c - 1)
        ext = hi - lo + 1
        count = ext.prod(1)
        if count.sum() <= max_marks:
            break
    else:
        return np.ones(len(points), dtype=bool)
    owner = np.repeat(np.arange(len(prims)), count)
    rank = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    e = ext[owner]
    cell = lo[owner] + np.stack([rank // (e[:, 1] * e[:, 2]), (rank // e[:, 2]) % e[:, 1], rank % e[:, 2]], -1)
    marked = np.zeros((c, c, c), dtype=bool)
    marked[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    pc = np.clip(np.floor((points + 1.0) / size).astype(np.int64), 0, c - 1)
    return marked[pc[:, 0], pc[:, 1], pc[:, 2]]


def warn_narrow_band_at(band: float, resolutions: Sequence[int]) -> None:
    """A warning per resolution at which ``band`` is narrower than one voxel (2 / R in the unit cube)."""
    for r in resolutions:
        if band < 2.0 / r:
            logger.warning("band %.5f is narrower than one voxel at %d^3 (%.5f): band voxels will not form complete "
                           "marching-cubes cells; only the block targets are closed", band, r, 2.0 / r)


# ---------------------------------------------------------------------------------------------- backends
@functools.cache
def _igl_installed() -> bool:
    """libigl (the ``data`` extra) is the CPU default; without it the torch backend runs on the CPU too."""
    try:
        import igl  # noqa: F401
    except ImportError:
        logger.warning("libigl is not installed: the SDF uses the torch backend on the CPU (slower; pip install "
                       "'d3s2[data]' for libigl)")
        return False
    return True


class _IglField:
    """Distance and winding number from libigl (CPU): AABB-tree distances, fast winding number."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, edge_flags: np.ndarray, segment_sets: list[np.ndarray],
                 band: float) -> None:
        import igl

        self._igl = igl
        self.band = band
        self.device = torch.device("cpu")
        self.v = np.ascontiguousarray(vertices, dtype=np.float64)
        self.f = np.ascontiguousarray(faces, dtype=np.int64)
        self.edge_flags = np.asarray(edge_flags, dtype=bool)  # [F, 3, K]
        self.segment_sets = [np.ascontiguousarray(s.reshape(-1, 3), dtype=np.float64) for s in segment_sets]
        # Trees of the whole mesh built once (the free functions rebuild them per call; same results).
        self._tree = igl.AABB()
        self._tree.init(self.v, self.f)
        self._wn = igl.FastWindingNumberBVH()
        self._wn.init(self.v, self.f)

    def nearest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance [Q], nearest triangle int64 [Q]) from each point to the mesh."""
        if len(points) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        d2, face, _ = self._tree.squared_distance(self.v, self.f, np.ascontiguousarray(points))
        return np.sqrt(d2), np.asarray(face, dtype=np.int64)

    def _subset_distance(self, points: np.ndarray, faces: np.ndarray) -> np.ndarray:
        if len(points) == 0 or len(faces) == 0:
            return np.full(len(points), np.inf)
        d2, _, _ = self._igl.point_mesh_squared_distance(np.ascontiguousarray(points), self.v, faces)
        return np.sqrt(d2)

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """bool [Q]: winding number >= 1/2 at float64 points [Q, 3]."""
        if len(points) == 0:
            return torch.zeros(0, dtype=torch.bool)
        w = self._wn.winding_number(np.ascontiguousarray(points.numpy(), dtype=np.float64))
        return torch.from_numpy(w >= 0.5)

    def _own_edge_bound(self, points: np.ndarray, faces: np.ndarray, k: int) -> np.ndarray:
        """float64 [Q]: distance from each point to the set-``k`` edges of triangle ``faces[q]`` (inf if it has
        none), an upper bound of the point's distance to segment set ``k``."""
        out = np.full(len(points), np.inf)
        flags = self.edge_flags[faces, :, k]  # [Q, 3] edges v0v1, v1v2, v2v0
        for e in range(3):
            sel = np.nonzero(flags[:, e])[0]
            a = self.v[self.f[faces[sel], e]]
            ab = self.v[self.f[faces[sel], (e + 1) % 3]] - a
            ap = points[sel] - a
            t = np.clip(np.einsum("ij,ij->i", ap, ab) / np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300), 0.0, 1.0)
            d = ap - t[:, None] * ab
            out[sel] = np.minimum(out[sel], np.sqrt(np.einsum("ij,ij->i", d, d)))
        return out

    def edge_distances(self, points: np.ndarray, limits: list[float] | None = None,
                       masks: list[np.ndarray | None] | None = None, faces: np.ndarray | None = None) -> np.ndarray:
        """[Q, K] distance from each point to each segment set (inf for an empty set).

        Callers that only compare distances with ``limits[k]`` may get inf for points farther than that and for
        points outside ``masks[k]``, and, where ``faces`` (each point's nearest triangle, int64 [Q]) is given, an
        upper bound below ``limits[k]`` for points that close to that triangle's own flagged edges: all three skip
        the exact query and keep its comparison with the limit.
        """
        out = np.full((len(points), len(self.segment_sets)), np.inf)
        for k, sv in enumerate(self.segment_sets):
            want = np.ones(len(points), dtype=bool) if masks is None or masks[k] is None else masks[k].copy()
            if limits is not None and len(sv):
                want[want] = near_primitives(points[want], sv.reshape(-1, 2, 3), limits[k])
                if faces is not None:
                    sel = np.nonzero(want)[0]
                    bound = self._own_edge_bound(points[sel], faces[sel], k)
                    # The margin is far above float64 rounding, so the exact distance is below the limit too.
                    done = bound < limits[k] * (1 - 1e-9)
                    out[sel[done], k] = bound[done]
                    want[sel[done]] = False
            sel = np.nonzero(want)[0]
            q = points[sel]
            if len(sv) and len(q):
                se = np.arange(len(sv), dtype=np.int64).reshape(-1, 2)
                d2, _, _ = self._igl.point_mesh_squared_distance(np.ascontiguousarray(q), sv, se)
                out[sel, k] = np.sqrt(d2)
        return out

    def set_classes(self, classes: np.ndarray) -> None:
        self.classes = np.asarray(classes, dtype=np.int8)
        self.subsets = [np.ascontiguousarray(self.f[self.classes == k]) for k in range(2)]

    def prepare(self, resolution: int, radius: float) -> None:
        """Nothing to build: libigl makes its AABB tree per call."""

    def band_voxels(self, resolution: int, radius: float):
        """(coords int64 [N, 3], distances [N, 3] to all / boundary / lost-sheet triangles, edge distances [N, K])."""
        coords, udf, face = band_candidates(self, resolution, radius)
        centers = voxel_centers(coords, resolution)
        dist = np.full((len(coords), 3), np.inf)
        dist[:, 0] = udf
        near_class = self.classes[face]
        # Lost-sheet distances matter only below ``radius`` (see _sparse_sdf_one).
        near_lost = near_primitives(centers, self.v[self.subsets[1]], radius)
        for k, need in enumerate([np.ones(len(coords), dtype=bool), near_lost]):
            # Where the nearest triangle is in the subset, the subset distance is the distance to all.
            same = near_class == k
            dist[same, k + 1] = udf[same]
            rows = np.nonzero(need & ~same)[0]
            dist[rows, k + 1] = self._subset_distance(centers[rows], self.subsets[k])
        # Sharp flags compare the sharp-edge distance (>= udf) with the band; signs the open-edge distance with
        # the exact-sign limit of _sparse_sdf_one.
        limits = [self.band, _exact_sign_limit(radius, resolution)]
        return coords, dist, self.edge_distances(centers, limits, [udf < self.band, None], face)


def _make_field(backend: str, mesh: trimesh.Trimesh, edge_flags: np.ndarray, band: float, device: str):
    """``edge_flags`` bool [F, 3, K]: flag sets whose distances band_voxels() reports (sharp, open)."""
    if backend == "igl":
        if device != "cpu":
            raise ValueError(f"backend 'igl' runs on the CPU only, got device={device!r}")
        sets = [_sharp_segments(mesh, edge_flags[:, :, k]) for k in range(edge_flags.shape[2])]
        return _IglField(mesh.vertices, mesh.faces, edge_flags, sets, band)
    if backend == "torch":
        from d3s2.geometry._field import TorchField

        return TorchField(mesh.vertices, mesh.faces, band=band, device=device, edge_flags=edge_flags)
    raise ValueError(f"unknown SDF backend {backend!r}, expected 'igl' or 'torch'")


# ---------------------------------------------------------------------------------------------- algorithm
def _levels(resolution: int) -> list[int]:
    """Grid sizes from coarse to fine, each half the next, ending at ``resolution`` (coarsest <= 16 or odd)."""
    levels = [resolution]
    while levels[-1] % 2 == 0 and levels[-1] > 16:
        levels.append(levels[-1] // 2)
    return levels[::-1]


def band_candidates(field, resolution: int, band: float) -> tuple[np.ndarray, np.ndarray]:
    """Band voxels by coarse-to-fine refinement: coords int64 [N, 3], unsigned distance float64 [N] and
    nearest triangle int64 [N] (``field.nearest``).

    A cell of size ``s`` is refined only if its centre is closer than ``band + (s - h) * sqrt(3) / 2`` to the
    surface (``h`` the voxel size): the voxel centres inside the cell lie within that half-diagonal of its
    centre, so every cell that contains a band voxel centre is kept. A cell whose parent's distance plus the
    offset between their centres is already below that limit is kept without a query.
    """
    levels = _levels(resolution)
    g0 = levels[0]
    h = 2.0 / resolution
    ax = np.arange(g0)
    cells = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    bound = np.full(len(cells), np.inf)  # upper bound of each cell centre's distance to the surface
    children = np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(-1, 3)
    for i, g in enumerate(levels):
        size = 2.0 / g
        if g == resolution:
            dist, face = field.nearest(voxel_centers(cells, g))
            keep = dist < band
            return cells[keep], dist[keep], face[keep]
        limit = band + (size - h) * math.sqrt(3) / 2
        # The margin is far above float64 rounding: these cells would pass the exact test too.
        query = ~(bound < limit * (1 - 1e-9))
        dist = bound.copy()
        dist[query] = field.nearest(voxel_centers(cells[query], g))[0]
        keep = dist < limit
        bound = np.repeat(dist[keep] + size * math.sqrt(3) / 4, len(children))  # children's centres are that close
        cells = (cells[keep][:, None, :] * 2 + children[None]).reshape(-1, 3)
        assert levels[i + 1] == 2 * g
    raise AssertionError("unreachable: the last level is the resolution")


def _block_coords(keys: torch.Tensor, g: int) -> torch.Tensor:
    """int64 [M, 3] block coordinates of lexicographic block keys [M]."""
    return torch.stack([keys // (g * g), (keys // g) % g, keys % g], -1)


def _block_voxels(block_coords: torch.Tensor) -> torch.Tensor:
    """int64 [NB * 512, 3] voxel coordinates of blocks, block-major, voxels in (lx, ly, lz) order."""
    offsets = torch.from_numpy(_block_offsets()).to(block_coords.device)
    return (block_coords[:, None, :] * BLOCK + offsets[None]).reshape(-1, 3)


def _grid_face_mask(block_coords: torch.Tensor, g: int) -> torch.Tensor:
    """bool [NB, 8, 8, 8]: voxels on the outer faces of the grid (off-band ones there count as outside)."""
    mask = torch.zeros((len(block_coords), BLOCK, BLOCK, BLOCK), dtype=torch.bool, device=block_coords.device)
    for axis in range(3):
        lo = block_coords[:, axis] == 0
        hi = block_coords[:, axis] == g - 1
        idx = [slice(None)] * 4
        idx[axis + 1] = 0
        mask[tuple(idx)] |= lo[:, None, None]
        idx[axis + 1] = BLOCK - 1
        mask[tuple(idx)] |= hi[:, None, None]
    return mask


def propagate_signs(signs: torch.Tensor, max_steps: int = 3 * BLOCK) -> torch.Tensor:
    """Fill unknown (0) entries of int8 ``signs [NB, 8, 8, 8]`` (+1 inside, -1 outside) from their neighbours.

    Each round, an unknown voxel takes the sign of the majority of its known 6-neighbours in the same block
    (ties wait a round). Off-band voxels cannot have the surface between them and a neighbour when the band is
    wider than half a voxel, so this copies the sign of the nearest band voxels. Entries still unknown at the
    end stay 0. Vectorised over the blocks that can still change (blocks are independent). Returns a new tensor.
    """
    s = signs.to(torch.int8).clone()
    active = torch.nonzero((s == 0).flatten(1).any(1)).squeeze(1)
    changing = None
    for step in range(max_steps):
        if step & (step - 1) == 0 and changing is not None:
            # Compacted before steps 1, 2, 4, 8, ... only (each compaction is a host sync): a block left in the
            # batch after its last fill gets no fill again, so the result is the same.
            active = active[torch.nonzero(changing).squeeze(1)]
        if active.numel() == 0:
            break
        a = s[active]
        total = torch.zeros_like(a)  # int8 holds a sum of six signs
        total[:, 1:] += a[:, :-1]
        total[:, :-1] += a[:, 1:]
        total[:, :, 1:] += a[:, :, :-1]
        total[:, :, :-1] += a[:, :, 1:]
        total[:, :, :, 1:] += a[:, :, :, :-1]
        total[:, :, :, :-1] += a[:, :, :, 1:]
        unknown = a == 0
        fill = unknown & (total != 0)
        a = torch.where(fill, total.sign(), a)
        s[active] = a
        # A block without a fill this round never changes again; one without unknowns is done.
        changing = fill.flatten(1).any(1) & (a == 0).flatten(1).any(1)
    return s


_DIRS = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1) if (dx, dy, dz) != (0, 0, 0)]
_SIDE_CHUNK = 1 << 15  # blocks per side-sign gather: [chunk, 26, 64] bools stay under 60 MB


def _side_regions() -> np.ndarray:
    """int64 [26, 64]: the voxels (rows of :func:`_block_offsets`) of a block's side facing each of ``_DIRS``: a
    face layer (64 voxels), an edge line (8, repeated to 64) or a corner voxel (1, repeated)."""
    off = _block_offsets()
    rows = []
    for d in _DIRS:
        m = np.ones(len(off), dtype=bool)
        for axis, x in enumerate(d):
            if x:
                m &= off[:, axis] == (0 if x < 0 else BLOCK - 1)
        rows.append(np.resize(np.nonzero(m)[0], BLOCK * BLOCK))  # repeats change neither any() nor all()
    return np.stack(rows)


def _side_signs(inside: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """bool [M, 26, 2]: whether the side of each block facing each of ``_DIRS`` holds an inside voxel (0) and an
    outside voxel (1); ``inside`` bool [M, 8, 8, 8], ``regions`` from :func:`_side_regions` on its device."""
    flat = inside.reshape(inside.shape[0], -1)
    out = torch.empty((inside.shape[0], len(_DIRS), 2), dtype=torch.bool, device=inside.device)
    for s in range(0, inside.shape[0], _SIDE_CHUNK):
        r = flat[s:s + _SIDE_CHUNK][:, regions]  # [m, 26, 64]
        out[s:s + _SIDE_CHUNK, :, 0] = r.any(2)
        out[s:s + _SIDE_CHUNK, :, 1] = ~r.all(2)
    return out


def _close_blocks(field, resolution: int, block_keys: torch.Tensor, inside: torch.Tensor,
                  max_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add missing blocks next to a sign change; see the module docstring.

    A missing block D is added when the voxels of present blocks that touch D (face layers, edge lines and
    corner voxels of its 26 neighbours) hold both signs: some marching-cubes cell between them and D may
    cross the surface. ``block_keys`` int64 [NB] sorted, ``inside`` bool [NB, 8, 8, 8]. Returns the grown
    pair, still sorted; new blocks get the inside bits of all their voxels from the winding number.

    Blocks are only added, so a missing block's verdict can change only when a neighbour was added in the last
    round: each round examines the missing neighbours of the blocks added in the previous one (all blocks in the
    first). Each block's 26 sides are summarised once, when it is added, as two bits (holds an inside voxel,
    holds an outside voxel), so a round tests all (candidate, direction) pairs with one lookup. Inside bits and
    side bits are appended to growing buffers, sorted once at the end.
    """
    g = resolution // BLOCK
    dev = block_keys.device
    n = block_keys.numel()
    buf = inside
    dirs = torch.tensor(_DIRS, device=dev)  # once: a host-to-device copy waits for the queued kernels
    regions = torch.from_numpy(_side_regions()).to(dev)
    sides = _side_signs(inside, regions)  # [cap, 26, 2], rows as in buf
    dir_idx = torch.arange(len(_DIRS), device=dev)
    row_of = torch.arange(n, device=dev)  # row in buf of each entry of the sorted block_keys
    frontier = _block_coords(block_keys, g)
    new_keys = block_keys
    minus_one = torch.full((1,), -1, dtype=torch.long, device=dev)
    for _ in range(max_rounds):
        nb = (frontier[:, None, :] + dirs[None]).reshape(-1, 3)
        k = _keys(nb.clamp(0, g - 1), g)
        # Off-grid and present neighbours become -1, which sorts first: one unique (one host sync) compacts.
        k = torch.where(((nb >= 0) & (nb < g)).all(1) & ~_member(block_keys, k)[0], k, -1)
        cand = torch.unique(torch.cat([minus_one, k]))[1:]
        if cand.numel() == 0:
            new_keys = cand
            break
        # Present block B = D - d touches candidate D with its side facing d.
        b = _block_coords(cand, g)[:, None, :] - dirs[None]  # [M, 26, 3]
        ok = ((b >= 0) & (b < g)).all(2)
        found, pos = _member(block_keys, _keys(b.clamp(0, g - 1).reshape(-1, 3), g))
        found = found.reshape(b.shape[:2]) & ok
        touch = sides[row_of[pos].reshape(b.shape[:2]), dir_idx[None]] & found[..., None]  # [M, 26, 2]
        new_keys = cand[torch.nonzero(touch.any(1).all(1)).squeeze(1)]
        if new_keys.numel() == 0:
            break
        frontier = _block_coords(new_keys, g)
        vox = _block_voxels(frontier)
        # Voxels on the grid's outer faces count as outside (the rule of _grid_face_mask, in 4 ops, not 24).
        new_inside = field.inside(voxel_centers(vox, resolution)) & ~((vox == 0) | (vox == resolution - 1)).any(1)
        new_inside = new_inside.reshape(-1, BLOCK, BLOCK, BLOCK)
        m = new_keys.numel()
        if n + m > buf.shape[0]:  # grow geometrically: appends cost O(total), not O(rounds * total)
            cap = max(2 * buf.shape[0], n + m)
            grown = torch.empty((cap, BLOCK, BLOCK, BLOCK), dtype=torch.bool, device=dev)
            grown[:n] = buf[:n]
            buf = grown
            grown_sides = torch.empty((cap, len(_DIRS), 2), dtype=torch.bool, device=dev)
            grown_sides[:n] = sides[:n]
            sides = grown_sides
        buf[n:n + m] = new_inside
        sides[n:n + m] = _side_signs(new_inside, regions)
        all_keys = torch.cat([block_keys, new_keys])
        order = torch.argsort(all_keys)  # keys are distinct
        block_keys = all_keys[order]
        row_of = torch.cat([row_of, torch.arange(n, n + m, device=dev)])[order]
        n += m
    else:
        logger.warning("band closure stopped after %d rounds with %d blocks still open", max_rounds, new_keys.numel())
    return block_keys, buf[row_of]


def label_components(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n]: the smallest node index of each node's connected component (undirected edges ``src``-``dst``).

    Label propagation with hooking and pointer jumping, all in torch on the edges' device: each round the root
    of every edge's larger label is hooked under the smaller one, then every node jumps to its root. An edge whose
    ends share a label keeps sharing it (labels only merge), so it is dropped for good: each round works on the
    edges still between components, with one host sync for the round and one per two jumps.
    """
    label = torch.arange(n, device=src.device)
    while src.numel():
        ls, ld = label[src], label[dst]
        keep = torch.nonzero(ls != ld).squeeze(1)
        if keep.numel() == 0:
            break
        src, dst, ls, ld = src[keep], dst[keep], ls[keep], ld[keep]
        low = torch.minimum(ls, ld)
        label.scatter_reduce_(0, torch.maximum(ls, ld), low, reduce="amin")  # labels are roots here
        while True:
            once = label[label]
            twice = once[once]
            if torch.equal(twice, once):
                label = twice
                break
            label = twice
    return label


def _components(src: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """Component label [n] per node: scipy on the CPU (fastest there), :func:`label_components` elsewhere."""
    if src.device.type != "cpu":
        return label_components(src, dst, n)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(src.numel(), dtype=np.int8), (src.numpy(), dst.numpy())), shape=(n, n))
    return torch.from_numpy(connected_components(graph, directed=False)[1].astype(np.int64))


def _count(index: torch.Tensor, num: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [num]: ``torch.bincount(index, weights, minlength=num)`` for indices < num, without the host sync of
    CUDA's bincount (it reads the largest index back)."""
    src = torch.ones_like(index) if weights is None else weights.long()
    return torch.zeros(num, dtype=torch.long, device=index.device).index_add_(0, index, src)


def _groups(labels: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M], bounds [num + 1]): the members of label ``l`` (labels int64 [M] in [0, num)) are
    ``order[bounds[l]:bounds[l + 1]]``, in index order. Counts from a sorted search, not atomics: a few labels
    hold most of tens of millions of voxels."""
    narrow = _narrow(labels, num)
    order = torch.argsort(narrow, stable=True)
    return order, torch.searchsorted(narrow[order], torch.arange(num + 1, device=labels.device, dtype=narrow.dtype))


def _spread(order: torch.Tensor, bounds: torch.Tensor, samples: int) -> torch.Tensor:
    """Indices of up to ``samples`` members of each group of :func:`_groups`, spread over its members."""
    dev = order.device
    num = bounds.numel() - 1
    counts = bounds[1:] - bounds[:-1]
    k = counts.clamp_max(samples)
    total = int(k.sum())  # one host sync: both repeats below then know their output size
    lab = torch.repeat_interleave(torch.arange(num, device=dev), k, output_size=total)
    rank = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(k, 0) - k, k, output_size=total)
    pick = bounds[lab] + torch.div(rank * counts[lab], k[lab].clamp_min(1), rounding_mode="floor")
    return order[pick]


def _safe_pairs(coords: torch.Tensor, udf: torch.Tensor, exact: torch.Tensor,
                resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges (src, dst int64 [E]) between 6-neighbour band voxels that cannot have the surface between them
    (``udf_a + udf_b > h``, neither exact); ``coords`` int64 [N, 3] sorted by key. Fixed-size work per axis, one
    host sync for the compaction."""
    n = coords.shape[0]
    h = 2.0 / resolution
    keys = _keys(coords, resolution)
    idx = torch.arange(n, device=coords.device)
    dst = []
    for axis, stride in enumerate((resolution * resolution, resolution, 1)):
        if stride == 1:  # keys are sorted and distinct: the +z neighbour, if present, is the next voxel
            row = (idx + 1).clamp_max(n - 1)
            found = keys[row] == keys + 1
        else:
            found, row = _member(keys, keys + stride)
        ok = found & (coords[:, axis] < resolution - 1)
        ok &= (udf + udf[row] > h * (1 + 1e-6)) & ~exact & ~exact[row]
        dst.append(torch.where(ok, row, -1))
    dst = torch.stack(dst, 1).reshape(-1)  # [3N]: voxel-major, as the per-axis edges of a voxel
    edge = torch.nonzero(dst >= 0).squeeze(1)
    return torch.div(edge, 3, rounding_mode="floor"), dst[edge]


def band_signs(field, coords: torch.Tensor, udf: torch.Tensor, exact: torch.Tensor, resolution: int,
               samples: int = 8, needed: torch.Tensor | None = None) -> torch.Tensor:
    """Inside (winding number >= 1/2) flag of each band voxel, with few winding-number evaluations.

    Voxels flagged ``exact`` (near open edges, where the winding number is not an integer) get their own
    winding number. Among the others, two 6-neighbours with ``udf_a + udf_b > h`` cannot have the surface
    between them, so their (integer) winding numbers agree: voxels are grouped into connected components
    of such pairs and each component takes the majority of ``samples`` evaluations spread over it.
    ``coords`` int64 [N, 3] must be sorted by key; all inputs on the field's device. ``needed`` (bool [N],
    default all): exact voxels outside it, and components without a voxel in it, get no winding number (False);
    their sign is not used by the caller.
    """
    n = coords.shape[0]
    dev = coords.device
    inside = torch.zeros(n, dtype=torch.bool, device=dev)
    if n == 0:
        return inside
    idx = torch.nonzero(exact if needed is None else exact & needed).squeeze(1)
    inside[idx] = field.inside(voxel_centers(coords[idx], resolution))
    rest = torch.nonzero(~exact).squeeze(1)
    if rest.numel() == 0:
        return inside
    labels = _components(*_safe_pairs(coords, udf, exact, resolution), n).to(dev)
    uniq, lab = torch.unique(_narrow(labels[rest], n), return_inverse=True)
    nl = uniq.numel()
    order, bounds = _groups(lab, nl)
    pick = _spread(order, bounds, samples)
    if needed is not None:
        # A component without a needed voxel needs no vote; the others keep the same samples, so the same votes.
        have = torch.nn.functional.pad(torch.cumsum(needed[rest][order], 0), (1, 0))  # needed members so far
        wanted = have[bounds[1:]] > have[bounds[:-1]]
        pick = pick[wanted[lab[pick]]]
    vote = field.inside(voxel_centers(coords[rest[pick]], resolution))
    pos = _count(lab[pick], nl, vote)
    tot = _count(lab[pick], nl)
    inside[rest] = (2 * pos > tot)[lab]
    logger.debug("band signs: %d voxels, %d exact, %d components", n, idx.numel(), nl)
    return inside


def classify_triangles(field, mesh: trimesh.Trimesh) -> np.ndarray:
    """int8 [F]: 0 boundary of the winding-number solid, 1 lost sheet, 2 internal (or degenerate).

    The winding number is evaluated just in front of and behind each triangle's centroid: a boundary
    triangle has the inside (>= 1/2) on exactly one side; a lost sheet (an open surface such as a leaf or
    a single-sided wall) has the outside on both sides; an internal triangle (inside another part, or a
    duplicate) has the inside on both.
    """
    tri = np.asarray(mesh.vertices)[np.asarray(mesh.faces)]  # [F, 3, 3]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(normal, axis=1)
    ok = area2 > 1e-12
    unit = normal / np.maximum(area2, 1e-30)[:, None]
    delta = np.minimum(1e-3, 0.05 * np.sqrt(area2 / 2))[:, None]  # well inside the triangle's own solid angle
    center = tri.mean(axis=1)
    points = torch.from_numpy(np.concatenate([center + delta * unit, center - delta * unit]))
    side = field.inside(points.to(field.device)).cpu().numpy()
    front, back = side[: len(tri)], side[len(tri):]
    classes = np.where(front != back, 0, np.where(front, 2, 1)).astype(np.int8)
    classes[~ok] = 2
    return classes


def _exact_sign_limit(radius: float, resolution: int) -> float:
    """Voxels closer than this to an open edge get their own winding number (see :func:`band_signs`)."""
    return radius + 4.0 / resolution


def _sparse_sdf_one(field, resolution: int, band: float) -> SparseSDF:
    dev = field.device
    shell = 2.0 / resolution  # half-thickness of thickened lost sheets: one voxel
    radius = band + shell
    coords, dist, edge_dist = (torch.as_tensor(x, device=dev) for x in field.band_voxels(resolution, radius))
    g = resolution // BLOCK
    order = torch.argsort(_narrow(_keys(coords, resolution), resolution**3))  # voxels are distinct
    coords, dist, edge_dist = coords[order], dist[order], edge_dist[order]
    sharp_dist, open_dist = edge_dist[:, 0], edge_dist[:, 1]
    # A voxel's sign matters only if its |sdf| can be below the band: ±dist[:, 1] or the lost-sheet shell is.
    needed = (dist[:, 1] < band) | (dist[:, 2] - shell < band)
    inside_w = band_signs(field, coords, dist[:, 0], open_dist < _exact_sign_limit(radius, resolution), resolution,
                          needed=needed)
    # Union of the winding-number solid (distance to its boundary triangles) and the thickened lost sheets.
    sdf = torch.minimum(torch.where(inside_w, -dist[:, 1], dist[:, 1]), dist[:, 2] - shell)
    keep = torch.nonzero(sdf.abs() < band).squeeze(1)  # one host sync for the three gathers
    coords, sdf, sharp = coords[keep], sdf[keep].float(), sharp_dist[keep] < band
    inside_band = sdf < 0

    # Inside bits of every voxel of every occupied block: band voxels from their winding number, the rest
    # propagated from them; voxels that propagation cannot reach get their own winding number.
    if coords.shape[0] == 0:
        # Every surface point lies within half a voxel diagonal of some voxel centre: a wider band always holds one.
        reach = math.sqrt(3) / resolution
        cause = (f"the band is narrower than half a voxel diagonal ({reach:.5g}), so a flat or thin surface can pass "
                 "between the voxel centres: expected a wider --band or a higher resolution" if band < reach
                 else "the surface is degenerate")
        raise ValueError(f"no voxel lies within the band ({band:.5g}) at {resolution}^3: {cause}")
    band_host = _start_host_copy(coords.int(), sdf, sharp)
    block_keys, rows = torch.unique(_narrow(_keys(coords // BLOCK, g), g**3), return_inverse=True)
    block_keys = block_keys.long()
    nb = block_keys.numel()
    signs = torch.zeros((nb, _BLOCK_VOXELS), dtype=torch.int8, device=dev)
    local = coords % BLOCK
    signs[rows, (local[:, 0] * BLOCK + local[:, 1]) * BLOCK + local[:, 2]] = torch.where(inside_band, 1, -1).to(
        torch.int8)
    off_band = (signs == 0).reshape(nb, BLOCK, BLOCK, BLOCK)
    signs = propagate_signs(signs.reshape(nb, BLOCK, BLOCK, BLOCK)).reshape(nb, _BLOCK_VOXELS)
    signs = _fill_unknown_signs(field, signs, block_keys, resolution)
    inside = (signs > 0).reshape(nb, BLOCK, BLOCK, BLOCK)
    inside &= ~(off_band & _grid_face_mask(_block_coords(block_keys, g), g))
    block_keys, inside = _close_blocks(field, resolution, block_keys, inside, max_rounds=4 * g)
    return _to_host(band_host, resolution, band, block_keys, inside)


def _fill_unknown_signs(field, signs: torch.Tensor, block_keys: torch.Tensor, resolution: int) -> torch.Tensor:
    """int8 ``signs`` [NB, 512] (+1 inside, -1 outside, 0 unknown) with the unknown entries, voxels that sign
    propagation did not reach, set from their winding number (in place; returned)."""
    unknown_b, unknown_v = torch.nonzero(signs == 0, as_tuple=True)
    if unknown_b.numel():
        offsets = torch.from_numpy(_block_offsets()).to(signs.device)
        vox = _block_coords(block_keys, resolution // BLOCK)[unknown_b] * BLOCK + offsets[unknown_v]
        signs[unknown_b, unknown_v] = torch.where(field.inside(voxel_centers(vox, resolution)), 1, -1).to(torch.int8)
    return signs


_COPY_SLOT_BYTES = 1 << 25  # each of the two pinned slots the band's host copy streams through: 32 MiB
_COPY_SLOTS: dict[torch.device, torch.Tensor] = {}  # per device, kept for the process: pinning costs like copying
_COPY_LOCK = threading.Lock()  # one copy at a time uses a device's slots


def _byte_chunks(tensors: list[torch.Tensor], outs: list[torch.Tensor],
                 chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(source, destination) uint8 views of at most ``chunk`` bytes covering each of ``tensors`` (contiguous) and
    the matching ``outs`` (same shapes and dtypes), in order."""
    for t, o in zip(tensors, outs, strict=True):
        src, dst = t.reshape(-1).view(torch.uint8), o.reshape(-1).view(torch.uint8)
        for lo in range(0, src.numel(), chunk):
            yield src[lo:lo + chunk], dst[lo:lo + chunk]


class _HostCopy:
    """Host copies (pageable memory) of device tensors, made by a background thread while the caller goes on.

    On CUDA the thread streams the bytes through two pinned slots of ``_COPY_SLOT_BYTES`` on a side stream: the
    device-to-pinned copy of one chunk overlaps the pinned-to-pageable copy of the previous one. A direct copy to
    pageable memory runs at ~2 GB/s (0.37 s for the 720 MB of a 42 M-voxel band) and a pinned buffer of the band's
    size costs about as much to allocate; here neither is on the caller's path, which only waits in
    :meth:`result` for what is left. ``background=False`` copies synchronously (``.cpu()``); on the CPU the
    tensors are used as they are.
    """

    def __init__(self, *tensors: torch.Tensor, background: bool = True) -> None:
        self._out: list[torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if tensors[0].device.type != "cuda" or not background:
            self._out = [t.cpu() for t in tensors]
            return
        stream = torch.cuda.Stream(tensors[0].device)
        stream.wait_stream(torch.cuda.current_stream(tensors[0].device))  # the tensors are ready when copies start
        # The thread holds the tensors until their copies are done, so their memory is not reused before.
        self._thread = threading.Thread(target=self._run, args=([t.contiguous() for t in tensors], stream),
                                        name="d3s2-sdf-host-copy", daemon=True)
        self._thread.start()

    def _run(self, tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
        try:
            dev = tensors[0].device
            outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
            with _COPY_LOCK, torch.cuda.device(dev), torch.cuda.stream(stream):
                if dev not in _COPY_SLOTS:
                    _COPY_SLOTS[dev] = torch.empty((2, _COPY_SLOT_BYTES), dtype=torch.uint8, pin_memory=True)
                slots = _COPY_SLOTS[dev]
                pending = None  # (event, pinned chunk, destination) of the previous chunk
                for i, (src, dst) in enumerate(_byte_chunks(tensors, outs, slots.shape[1])):
                    # Slot i % 2 was last emptied by the synchronous copy-out of chunk i - 2.
                    pinned = slots[i % 2, :src.numel()]
                    pinned.copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(stream)
                    if pending is not None:
                        pending[0].synchronize()
                        pending[2].copy_(pending[1])
                    pending = (done, pinned, dst)
                if pending is not None:
                    pending[0].synchronize()
                    pending[2].copy_(pending[1])
            self._out = outs
        except BaseException as e:  # re-raised by result() in the caller's thread
            self._error = e

    def result(self) -> list[torch.Tensor]:
        """The host tensors, once the copies are done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError("copying the band voxels to the host failed") from self._error
        return self._out


def _start_host_copy(*tensors: torch.Tensor) -> _HostCopy:
    """Host copies of ``tensors`` (see :class:`_HostCopy`): on CUDA the transfer overlaps the sign work and block
    closure that follow; :func:`_to_host` waits for it."""
    return _HostCopy(*tensors)


def _to_host(band_host: _HostCopy, resolution: int, band: float, block_keys: torch.Tensor,
             inside: torch.Tensor) -> SparseSDF:
    """The :class:`SparseSDF` from the host copies of the band voxels (coords int32 [N, 3], sdf [N], sharp bool
    [N], from :func:`_start_host_copy`) and the device blocks (keys int64 [NB] sorted, inside bool [NB, 8, 8, 8])."""
    # Packed and narrowed on the device: an eighth of the inside bits and half the coordinates cross to the host.
    block_coords = _block_coords(block_keys, resolution // BLOCK).int().cpu().numpy()
    block_inside = pack_bits(inside.reshape(len(block_keys), -1)).cpu().numpy()
    coords, sdf, sharp = band_host.result()
    return SparseSDF(coords=coords.numpy(), sdf=sdf.numpy(), sharp=sharp.numpy(), resolution=resolution,
                     band=float(band), block_coords=block_coords, block_inside=block_inside)


def compute_sparse_sdf(
    mesh: trimesh.Trimesh,
    resolutions: int | list[int] | tuple[int, ...],
    band: float = 1 / 128,
    *,
    device: str = "cpu",
    sharp_angle_deg: float = 30.0,
    backend: str | None = None,
    warn_narrow_band: bool = True,
) -> dict[int, SparseSDF]:
    """Band SDF of ``mesh`` (already normalised into ``[-1, 1]^3``) at each resolution.

    Args:
        mesh: triangle mesh inside ``[-1, 1]^3`` (see :func:`d3s2.geometry.mesh_io.normalize_mesh`).
        resolutions: R or several; each a multiple of 8 in ``[8, 2048]``.
        band: tau in ``[-1, 1]`` units; voxels with ``|sdf| < tau`` are kept.
        device: "cpu" or a CUDA device; CUDA requires the "torch" backend.
        sharp_angle_deg: dihedral angle above which an edge is sharp.
        backend: "igl" (CPU default when libigl is installed) or "torch" (CUDA default; also runs on CPU).
        warn_narrow_band: :func:`warn_narrow_band_at` for this call (a caller looping over many meshes warns once).

    Returns ``{R: SparseSDF}``. The spatial structures are built once and shared by all resolutions.
    """
    if isinstance(resolutions, int):
        resolutions = [resolutions]
    for r in resolutions:
        if not isinstance(r, (int, np.integer)) or r % BLOCK or not BLOCK <= r <= MAX_RESOLUTION:
            raise ValueError(f"expected resolutions that are multiples of {BLOCK} in [8, {MAX_RESOLUTION}], got {r!r}")
    if not 0 < band < 1:
        raise ValueError(f"expected 0 < band < 1, got {band}")
    vertices = np.asarray(mesh.vertices)
    if np.abs(vertices).max() > 1:
        raise ValueError("expected a mesh inside [-1, 1]^3 (normalise it first), got coordinates up to "
                         f"{np.abs(vertices).max():.3f}")
    if mesh.is_watertight and mesh.volume < 0:
        # A closed mesh with negative signed volume is wound inside-out as a whole (e.g. clockwise game
        # assets): without this every face would read as an open sheet and become a thin shell.
        logger.info("mesh is closed but inside-out (signed volume %.4g): reversing its faces", mesh.volume)
        mesh = trimesh.Trimesh(vertices, np.asarray(mesh.faces)[:, ::-1].copy(), process=False)
    if backend is None:
        backend = "igl" if str(device) == "cpu" and _igl_installed() else "torch"
    if warn_narrow_band:
        warn_narrow_band_at(band, resolutions)
    field, classes = _classified_field(mesh, backend, band, str(device), int(resolutions[0]), sharp_angle_deg)
    if not (classes == 0).any() and (classes == 2).any():
        # No triangle bounds the solid, yet some read as inside on both sides: an open mesh wound inside-out as
        # a whole (e.g. crossed billboard quads of clockwise game assets). Reversed, they are open sheets.
        logger.info("no triangle bounds the winding-number solid and %d are inside on both sides: reversing the "
                    "mesh's faces", int((classes == 2).sum()))
        mesh = trimesh.Trimesh(vertices, np.asarray(mesh.faces)[:, ::-1].copy(), process=False)
        field, classes = _classified_field(mesh, backend, band, str(device), int(resolutions[0]), sharp_angle_deg)
    if not (classes < 2).any():
        raise ValueError(f"mesh has no usable surface: all {len(classes)} triangles are degenerate or inside the "
                         "solid on both sides")
    field.set_classes(classes)
    return {int(r): _sparse_sdf_one(field, int(r), band) for r in resolutions}


def _classified_field(mesh: trimesh.Trimesh, backend: str, band: float, device: str, resolution: int,
                      sharp_angle_deg: float):
    """The distance/winding field of ``mesh`` prepared for ``resolution``, and its triangle classes."""
    flags = np.stack([sharp_face_edges(mesh, sharp_angle_deg), open_face_edges(mesh)], axis=2)  # [F, 3, 2]
    field = _make_field(backend, mesh, flags, band, device)
    field.prepare(resolution, band + 2.0 / resolution)
    return field, classify_triangles(field, mesh)
