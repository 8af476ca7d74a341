"""Sparse marching cubes: triangle meshes straight from sparse SDF voxels, no dense grid.

A cube is the 2×2×2 group of voxels with lowest corner ``v``; it is processed when all 8 voxels are present.
Vertices sit on cube edges whose end values straddle the iso level (linear interpolation, kept
:data:`EDGE_MARGIN` off the edge's ends) and are welded: one vertex per grid edge, shared by the (up to 4) cubes
around it. Triangles are wound so their normals
point towards increasing values, i.e. outwards for an SDF that is negative inside. A closed band (every
cube that the surface crosses is present) gives a watertight mesh.

The case tables are generated here (:func:`build_tables`) rather than copied: for each of the 256 corner
sign patterns, the iso-contour is traced face by face on the cube's surface and each closed contour is
triangulated as a fan. Ambiguous faces (two diagonal corners inside, two outside) always separate the
inside corners; because the choice depends on the face alone, the two cubes sharing a face agree and the
surface has no cracks, and fans are rooted so that no diagonal lies on a cube face (the neighbour would draw
it too). On configurations without ambiguous faces the polygons equal those of other
marching-cubes tables (e.g. scikit-image's); triangulations of polygons with 4+ vertices may differ.

Dimension legend: N voxels, M processed cubes, V vertices, T triangles, R resolution.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# Corner i of a cube sits at offset (i & 1, (i >> 1) & 1, (i >> 2) & 1).
CORNER_OFFSETS = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.int64)


def _edges() -> tuple[np.ndarray, np.ndarray]:
    """(edge corners int64 [12, 2], edge axis int64 [12]); edge (a, b) runs from a to a + unit(axis)."""
    pairs, axes = [], []
    for axis in range(3):
        for c in range(8):
            if not (c >> axis) & 1:
                pairs.append((c, c | (1 << axis)))
                axes.append(axis)
    return np.array(pairs, dtype=np.int64), np.array(axes, dtype=np.int64)


EDGE_CORNERS, EDGE_AXIS = _edges()
# Voxels: how far a vertex stays from its edge's ends. A value at the level (or so close to it that float32 rounds
# the interpolation to an end) would put the vertices of every crossing edge that meets there at one position, which
# readers that weld by position (STL has no shared vertices) turn into a pinch. Float32 still tells apart
# positions this far from a grid point at 1024³.
EDGE_MARGIN = 1e-3


def _cube_faces() -> list[tuple[list[int], np.ndarray]]:
    """The 6 faces as (4 corners in cyclic order, outward normal [3])."""
    faces = []
    for axis in range(3):
        u, w = [a for a in range(3) if a != axis]
        for side in (0, 1):
            base = side << axis
            cyc = [base, base | (1 << u), base | (1 << u) | (1 << w), base | (1 << w)]
            normal = np.zeros(3)
            normal[axis] = 1.0 if side else -1.0
            faces.append((cyc, normal))
    return faces


def _on_one_face(e1: int, e2: int, face_sets: list[frozenset]) -> bool:
    corners = set(map(int, EDGE_CORNERS[e1])) | set(map(int, EDGE_CORNERS[e2]))
    return any(corners <= f for f in face_sets)


def _fan_apex(loop: list[int], face_sets: list[frozenset]) -> int:
    """Index of a fan apex whose diagonals do not lie on a cube face.

    A diagonal on a face (the loop crosses an ambiguous face twice) would also be drawn by the neighbouring
    cube across that face, leaving an edge shared by four triangles.
    """
    n = len(loop)
    for i in range(n):
        if all(not _on_one_face(loop[i], loop[j], face_sets) for j in range(n) if (j - i) % n not in (0, 1, n - 1)):
            return i
    raise AssertionError(f"no fan apex for contour {loop}")


@functools.lru_cache(maxsize=1)
def build_tables() -> tuple[np.ndarray, np.ndarray]:
    """Generate the case tables.

    Returns ``(tri_table int64 [256, K, 3], num_tris int64 [256])``: for case ``c`` (bit ``i`` set when corner
    ``i`` is inside, i.e. below the iso level) the first ``num_tris[c]`` rows list triangles as local edge
    indices (``EDGE_CORNERS``), wound so the normal points from inside to outside; the rest are -1.
    """
    edge_index = {tuple(sorted(map(int, p))): i for i, p in enumerate(EDGE_CORNERS)}
    corner_pos = CORNER_OFFSETS.astype(np.float64)
    edge_mid = corner_pos[EDGE_CORNERS].mean(axis=1)  # [12, 3]
    faces = _cube_faces()
    face_sets = [frozenset(cyc) for cyc, _ in faces]
    tables: list[list[tuple[int, int, int]]] = []
    for case in range(256):
        inside = [(case >> i) & 1 for i in range(8)]
        nxt: dict[int, int] = {}  # directed contour segments: edge -> next edge
        for cyc, normal in faces:
            s = [inside[c] for c in cyc]
            # Face edges in cyclic order: edge k joins cyc[k] and cyc[k+1].
            fe = [edge_index[tuple(sorted((cyc[k], cyc[(k + 1) % 4])))] for k in range(4)]
            crossing = [k for k in range(4) if s[k] != s[(k + 1) % 4]]
            if not crossing:
                continue
            # Pair crossings around each inside corner: corner k is flanked by face edges k-1 and k.
            segs = []
            if len(crossing) == 2:
                k0, k1 = crossing
                # The crossing segment cuts the face in two; every inside corner lies on the same side of it.
                segs.append((fe[k0], fe[k1], cyc[s.index(1)]))
            else:  # ambiguous face: separate (cut off) each inside corner
                for c in range(4):
                    if s[c]:
                        segs.append((fe[(c - 1) % 4], fe[c], cyc[c]))
            for a, b, corner in segs:
                # Orient the segment so that, seen from outside the cube, the inside corner is on its left.
                d = edge_mid[b] - edge_mid[a]
                if np.dot(np.cross(d, corner_pos[corner] - edge_mid[a]), normal) < 0:
                    a, b = b, a
                nxt[a] = b
        tris: list[tuple[int, int, int]] = []
        remaining = dict(nxt)
        while remaining:
            start = min(remaining)
            loop = [start]
            e = remaining.pop(start)
            while e != start:
                loop.append(e)
                e = remaining.pop(e)
            apex = _fan_apex(loop, face_sets)
            loop = loop[apex:] + loop[:apex]
            for k in range(1, len(loop) - 1):
                tris.append((loop[0], loop[k], loop[k + 1]))
        tables.append(tris)
    k = max(len(t) for t in tables)
    tri_table = np.full((256, k, 3), -1, dtype=np.int64)
    num_tris = np.zeros(256, dtype=np.int64)
    for case, tris in enumerate(tables):
        num_tris[case] = len(tris)
        if tris:
            tri_table[case, : len(tris)] = tris
    _orient_tables(tri_table, num_tris)
    return tri_table, num_tris


def _orient_tables(tri_table: np.ndarray, num_tris: np.ndarray) -> None:
    """Flip every case (in place) if its triangles face inwards, judged on a linear field for single-corner cases.

    The per-face rule above gives every case the same handedness; one check on case 1 (corner 0 inside)
    fixes the global sign so normals point from inside to outside.
    """
    mid = CORNER_OFFSETS[EDGE_CORNERS].mean(axis=1).astype(np.float64)
    a, b, c = mid[tri_table[1, 0]]
    normal = np.cross(b - a, c - a)
    if np.dot(normal, np.ones(3)) < 0:  # corner 0 (origin) inside: outward is +(1,1,1)
        valid = np.arange(tri_table.shape[1])[None, :] < num_tris[:, None]
        tri_table[valid] = tri_table[valid][:, [0, 2, 1]]


def _as_tensors(coords, values, resolution, device):
    coords = torch.as_tensor(np.asarray(coords) if not torch.is_tensor(coords) else coords)
    values = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values)
    if device is not None:
        coords, values = coords.to(device), values.to(device)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"expected coords of shape [N, 3], got {list(coords.shape)}")
    if values.ndim != 1 or values.shape[0] != coords.shape[0]:
        raise ValueError(f"expected values of shape [{coords.shape[0]}], got {list(values.shape)}")
    if resolution is None or int(resolution) <= 0:
        raise ValueError(f"expected a positive resolution, got {resolution!r}")
    return coords.long(), values.float()


def _active_cubes(origins: torch.Tensor, skeys: torch.Tensor, svals: torch.Tensor, corner_off: torch.Tensor,
                  r1: int, level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cubes with lowest corner in ``origins`` int64 ``[n, 3]`` whose 8 voxels are present (sorted keys
    ``skeys``, values ``svals``) and that the surface crosses: ``(corner values [m, 8], origins [m, 3],
    case [m])``, in ``origins`` order."""
    ck = (((origins[:, None, 0] + corner_off[None, :, 0]) * r1 + origins[:, None, 1] + corner_off[None, :, 1]) * r1
          + origins[:, None, 2] + corner_off[None, :, 2])  # [n, 8] corner keys
    pos = torch.searchsorted(skeys, ck).clamp_max(max(skeys.numel() - 1, 0))
    present = (skeys[pos] == ck).all(dim=1)
    del ck
    cube_vals = svals[pos[present]]  # [m', 8]
    cube_origin = origins[present]
    case = ((cube_vals < level).long() << torch.arange(8, device=origins.device)).sum(dim=1)
    active = (case > 0) & (case < 255)
    return cube_vals[active], cube_origin[active], case[active]


def sparse_marching_cubes(
    coords,
    values=None,
    resolution: int | None = None,
    *,
    level: float = 0.0,
    device: str | torch.device | None = None,
    to_unit_cube: bool = True,
    chunk: int = 1 << 21,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle mesh of the ``level`` iso-surface of a sparse voxel field.

    Args:
        coords: int ``[N, 3]`` voxel indices in ``[0, R)`` (unique), or a :class:`~d3s2.geometry.sdf.SparseSDF`
            (then its block targets are used: every voxel of every occupied block, closed band).
        values: float ``[N]`` field values at the voxels (negative inside).
        resolution: R.
        level: iso value.
        device: run on this device (default: the device of ``coords``).
        to_unit_cube: return vertices in ``[-1, 1]`` units (voxel centres at ``(i + 0.5) * 2 / R - 1``);
            otherwise in voxel-index units (voxel centre ``i``, as scikit-image).
        chunk: find the surface cubes this many voxels at a time (bounded memory: ~100 bytes per voxel of a
            chunk; the result does not depend on it); 0 = all at once.

    Returns:
        ``(vertices float32 [V, 3], faces int64 [T, 3])`` on the device used.
    """
    from d3s2.geometry.sdf import BLOCK, SparseSDF, _block_offsets

    if isinstance(coords, SparseSDF):
        s = coords
        blocks, target = s.block_targets()
        coords = (blocks[:, None, :].astype(np.int64) * BLOCK + _block_offsets()[None]).reshape(-1, 3)
        values = target.reshape(-1)
        resolution = s.resolution
    if values is None:
        raise ValueError("expected values [N] with coords [N, 3] (or pass a SparseSDF)")
    coords, values = _as_tensors(coords, values, resolution, device)
    dev = coords.device
    r = int(resolution)
    tri_table, num_tris = build_tables()
    tri_table_t = torch.as_tensor(tri_table, device=dev)
    num_tris_t = torch.as_tensor(num_tris, device=dev)
    edge_corners = torch.as_tensor(EDGE_CORNERS, device=dev)
    edge_axis = torch.as_tensor(EDGE_AXIS, device=dev)
    corner_off = torch.as_tensor(CORNER_OFFSETS, device=dev)

    # Hash every voxel; a grid of size (R+1)^3 keeps keys of out-of-range neighbours distinct.
    r1 = r + 1
    keys = (coords[:, 0] * r1 + coords[:, 1]) * r1 + coords[:, 2]
    order = torch.argsort(keys)
    skeys, svals = keys[order], values[order]

    # The surface cubes, a chunk of lowest corners at a time: the [n, 8] corner lookups are the largest arrays.
    step = coords.shape[0] if chunk <= 0 else chunk
    parts = [_active_cubes(coords[i: i + step], skeys, svals, corner_off, r1, level)
             for i in range(0, coords.shape[0], max(step, 1))]
    if parts:
        cube_vals, cube_origin, case = (torch.cat(x) for x in zip(*parts, strict=True))
    else:
        cube_vals, cube_origin = values.new_zeros(0, 8), coords.new_zeros(0, 3)
        case = torch.zeros(0, dtype=torch.long, device=dev)

    # Triangles as (cube, local edge) -> global edge id = key(lower endpoint) * 3 + axis.
    tris = tri_table_t[case]  # [M, K, 3]
    valid = torch.arange(tri_table.shape[1], device=dev)[None, :] < num_tris_t[case][:, None]  # [M, K]
    cube_idx = torch.arange(case.numel(), device=dev)[:, None].expand_as(valid)[valid]  # [T]
    local_edges = tris[valid]  # [T, 3]
    lower = cube_origin[cube_idx][:, None, :] + corner_off[edge_corners[local_edges, 0]]  # [T, 3, 3]
    gid = ((lower[..., 0] * r1 + lower[..., 1]) * r1 + lower[..., 2]) * 3 + edge_axis[local_edges]  # [T, 3]
    uniq, faces = torch.unique(gid.reshape(-1), return_inverse=True)
    faces = faces.reshape(-1, 3)

    # One vertex per unique edge: interpolate between the edge's end values (first occurrence of each).
    first = torch.full((uniq.numel(),), gid.numel(), dtype=torch.long, device=dev)
    first.scatter_reduce_(0, faces.reshape(-1), torch.arange(gid.numel(), device=dev), reduce="amin")
    t_idx, k_idx = first // 3, first % 3
    le = local_edges[t_idx, k_idx]  # [V]
    cv = cube_vals[cube_idx[t_idx]]  # [V, 8]
    v0 = cv.gather(1, edge_corners[le, 0:1]).squeeze(1)
    v1 = cv.gather(1, edge_corners[le, 1:2]).squeeze(1)
    t = ((level - v0) / (v1 - v0)).clamp(EDGE_MARGIN, 1.0 - EDGE_MARGIN)
    p0 = (cube_origin[cube_idx[t_idx]] + corner_off[edge_corners[le, 0]]).float()
    step = torch.nn.functional.one_hot(edge_axis[le], 3).float()
    verts = p0 + t[:, None] * step  # [V, 3] voxel-index units
    if to_unit_cube:
        verts = (verts + 0.5) * (2.0 / r) - 1.0
    return verts, faces


def marching_cubes_mesh(*args, **kwargs):
    """:func:`sparse_marching_cubes` returning a ``trimesh.Trimesh`` (CPU numpy arrays)."""
    import trimesh

    verts, faces = sparse_marching_cubes(*args, **kwargs)
    return trimesh.Trimesh(vertices=verts.cpu().numpy(), faces=faces.cpu().numpy(), process=False)
