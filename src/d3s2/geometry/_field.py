"""Multilevel distance and winding-number evaluator in torch (CPU or CUDA): the "torch" SDF backend.

Cells of an octree-like hierarchy aligned with the voxel grid (level ``j`` has cell size ``s_j = h * 2^(J-j)``,
origin at -1, level ``J`` = voxels) are refined only near the surface. Each cell keeps a *near list*: the
triangles within ``r_j + hd_j`` of its centre, with ``r_j = max(2 s_j, band)`` and ``hd_j`` its half-diagonal,
a superset of the triangles closer than ``r_j`` to any point of the cell. For a point ``p`` in cell ``C``:

- unsigned distance (exact up to ``r_j``): the minimum over the near list;
- winding number ``w(p) = sum_{t in near(C)} Omega_t(p) / 4pi + far_C(p)``, where the far part (triangles at
  least ``2 s_j`` away) is smooth inside ``C`` and is trilinearly interpolated from its values at the 8
  corners: ``far_C(corner) = w(corner) - near part at the corner``. Corner winding numbers are evaluated the
  same way one level up, down from a root cell whose near list is every triangle (so its far part is 0).

Solid angles use the Van Oosterom–Strackee formula, so near-field terms are exact; only the far-field
interpolation is approximate (well below the 1/2 threshold that decides the sign). The near-list reductions and
the pair distances that filter near lists are the op :mod:`d3s2.ops.mesh_field` (backend per call: Triton kernels
on CUDA, materialised torch pairs elsewhere; ``use_backend("mesh_field", "torch")`` gives the old GPU path).

Dimension legend: P (point, triangle) pairs, Q query points, C cells, F triangles.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from d3s2.ops.mesh_field import BACKENDS, near_field, pair_dist2

logger = logging.getLogger(__name__)

_CHILD = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.long)  # (x, y, z), z fastest
_CORNER = _CHILD  # corners of a unit cell in the same order
_PAIR_CHUNK = 1 << 18  # pairs per kernel batch on the CPU: keeps temporaries in cache
_PAIR_CHUNK_GPU = 1 << 22  # on a GPU: fewer, larger launches (under 1 GiB of float32 temporaries)
_BRUTE_FORCE_PAIRS = 1 << 24  # winding queries with fewer (point, triangle) pairs skip the hierarchy
# With the Triton kernel on a GPU (~4e10 pairs/s on an H200) 2^28 pairs take ~7 ms, less than the hierarchy's
# per-call host syncs and far-field fills; block-closure rounds of meshes up to a few thousand triangles fit.
_BRUTE_FORCE_PAIRS_KERNEL = 1 << 28


class _Level:
    """Cells of one level: int64 coords [C, 3], near lists (pair_cell [P] sorted, pair_tri [P], CSR offsets
    [C + 1]), far [C, 8]."""

    __slots__ = ("size", "coords", "keys", "pair_cell", "pair_tri", "offsets", "far", "has_far")

    def __init__(self, size, coords, keys, pair_cell, pair_tri, far):
        self.size, self.coords, self.keys = size, coords, keys  # keys sorted ascending
        self.pair_cell, self.pair_tri, self.far = pair_cell, pair_tri, far
        counts = torch.bincount(pair_cell, minlength=coords.shape[0])
        self.offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.has_far = torch.zeros(coords.shape[0], dtype=torch.bool, device=coords.device)


class TorchField:
    """Distance, winding number and sharp-edge distance for one mesh; see the module docstring."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, *, band: float, device: str = "cpu",
                 edge_flags: np.ndarray | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.child = _CHILD.to(self.device)  # on the device once: a per-call copy would sync with the host
        self.corner = _CORNER.to(self.device)
        self.corner_mask = self.corner.bool()
        self.chunk = _PAIR_CHUNK if self.device.type == "cpu" else _PAIR_CHUNK_GPU
        v = torch.as_tensor(np.asarray(vertices), dtype=torch.float64)
        f = torch.as_tensor(np.asarray(faces, dtype=np.int64))
        self.tri = v[f].to(self.device, self.dtype).reshape(-1, 9).T.contiguous()  # [9, F] SoA
        self.band = float(band)
        if edge_flags is None:
            edge_flags = np.zeros((len(faces), 3, 1), dtype=bool)
        self.tri_sharp = torch.as_tensor(np.asarray(edge_flags, dtype=bool), device=self.device)  # [F, 3, K]
        self._levels: list[_Level] = []
        self._resolution = 0
        self._radius = self.band
        self.tri_class = torch.zeros(self.tri.shape[1], dtype=torch.int8, device=self.device)

    def set_classes(self, classes: np.ndarray) -> None:
        """int8 [F]: 0 boundary, 1 lost sheet, 2 internal (see ``d3s2.geometry.sdf.classify_triangles``)."""
        self.tri_class = torch.as_tensor(np.asarray(classes, dtype=np.int8), device=self.device)

    def prepare(self, resolution: int, radius: float) -> None:
        """Build the hierarchy for ``resolution`` keeping cells within ``radius`` of the surface."""
        if (resolution, radius) != (self._resolution, self._radius) or not self._levels:
            self._radius = float(radius)
            self.build(resolution)

    # ------------------------------------------------------------------ near-list evaluation
    def _near(self, points: torch.Tensor, owner: torch.Tensor, level: _Level, need_dist: bool, need_sharp: bool,
              need_wind: bool = True, by_class: bool = False):
        """Reduce over the near list of each point's owner cell (op ``mesh_field``): (dist [Q] | None, winding [Q]
        (zeros if not needed), sharp dist [Q, K] | None).

        With ``by_class`` the distance is [Q, 3]: all triangles, boundary triangles, lost-sheet triangles.
        """
        r = near_field(points.to(self.dtype).contiguous(), owner, level.offsets, level.pair_tri, self.tri,
                       need_dist=need_dist, need_wind=need_wind, classes=self.tri_class if by_class else None,
                       num_classes=2, edge_flags=self.tri_sharp if need_sharp else None, chunk=self.chunk)
        dist2 = torch.cat([r.dist2[:, None], r.class_dist2], 1) if by_class else r.dist2
        wind = r.winding if need_wind else torch.zeros(points.shape[0], device=self.device, dtype=self.dtype)
        return (dist2.sqrt() if need_dist else None), wind, (r.edge_dist2.sqrt() if need_sharp else None)

    def _far(self, points: torch.Tensor, owner: torch.Tensor, level: _Level) -> torch.Tensor:
        """Trilinear interpolation of the owner cells' far-field corner values at points [Q, 3]."""
        lo = level.coords[owner].to(self.dtype) * level.size - 1.0
        u = ((points - lo) / level.size).clamp(0.0, 1.0)  # [Q, 3]
        wts = torch.where(self.corner_mask[None], u[:, None, :], 1 - u[:, None, :]).prod(-1)  # [Q, 8]
        return (wts * level.far[owner]).sum(1)

    def _evaluate(self, points: torch.Tensor, owner: torch.Tensor, level: _Level, need_dist: bool = True,
                  need_sharp: bool = False):
        d, w, sd = self._near(points, owner, level, need_dist, need_sharp)
        return d, w + self._far(points, owner, level), sd

    # ------------------------------------------------------------------ hierarchy
    def _centers(self, coords: torch.Tensor, size: float) -> torch.Tensor:
        return (coords.to(self.dtype) + 0.5) * size - 1.0

    def build(self, resolution: int) -> None:
        """Refine cells towards the band at ``resolution``; keeps every level for later point queries."""
        dev, band = self.device, self._radius
        h = 2.0 / resolution
        num = max(0, math.ceil(math.log2(resolution)))  # levels 0..num, level num = voxels
        sizes = [h * 2 ** (num - j) for j in range(num + 1)]
        nf = self.tri.shape[1]
        root = torch.zeros((1, 3), dtype=torch.long, device=dev)
        lvl = _Level(sizes[0], root, torch.zeros(1, dtype=torch.long, device=dev),
                     torch.zeros(nf, dtype=torch.long, device=dev), torch.arange(nf, device=dev),
                     torch.zeros((1, 8), dtype=self.dtype, device=dev))
        lvl.has_far[:] = True  # the root's near list is every triangle: no far part
        levels = [lvl]
        child = self.child
        for j in range(1, num):  # build levels 1 .. num-1; voxels (level num) are queried in level num-1 cells
            size = sizes[j]
            g = 2 ** j
            hd = size * math.sqrt(3) / 2
            radius = max(2 * size, band) + hd
            parent = levels[-1]
            # Children of every parent cell, paired with the parent's near list, filtered by distance.
            pc, ptri = parent.pair_cell, parent.pair_tri
            ccoords = (parent.coords[:, None, :] * 2 + child[None]).reshape(-1, 3)  # [8C, 3]
            cell_of_pair = (pc[:, None] * 8 + torch.arange(8, device=dev)[None]).reshape(-1)
            tri_of_pair = ptri[:, None].expand(-1, 8).reshape(-1)
            d = pair_dist2(self._centers(ccoords, size), cell_of_pair, tri_of_pair, self.tri, chunk=self.chunk).sqrt()
            keep_pair = d <= radius
            mind = torch.full((ccoords.shape[0],), float("inf"), device=dev, dtype=self.dtype)
            mind.scatter_reduce_(0, cell_of_pair, d, reduce="amin")
            # Keep children that may still contain band voxel centres.
            keep_cell = mind < band + hd
            remap = torch.cumsum(keep_cell.long(), 0) - 1
            keep_pair &= keep_cell[cell_of_pair]
            new_coords = ccoords[keep_cell]
            pair_cell = remap[cell_of_pair[keep_pair]]
            pair_tri = tri_of_pair[keep_pair]
            logger.debug("level %d: %d cells, %d near pairs", j, new_coords.shape[0], pair_cell.numel())
            # Sort cells by key so points can be located by binary search.
            keys = (new_coords[:, 0] * g + new_coords[:, 1]) * g + new_coords[:, 2]
            korder = torch.argsort(keys)
            rank = torch.empty_like(korder)
            rank[korder] = torch.arange(korder.numel(), device=dev)
            pair_cell = rank[pair_cell]
            porder = torch.argsort(pair_cell, stable=True)
            lvl = _Level(size, new_coords[korder], keys[korder], pair_cell[porder], pair_tri[porder],
                         torch.zeros((new_coords.shape[0], 8), dtype=self.dtype, device=dev))
            levels.append(lvl)
        self._levels = levels
        self._resolution = resolution

    # ------------------------------------------------------------------ queries
    def band_voxels(self, resolution: int, radius: float):
        """Voxels closer than ``radius`` to any triangle, as tensors on the field's device: (coords int64 [N, 3],
        distances [N, 3] to all, boundary and lost-sheet triangles, flagged-edge distances [N, K])."""
        self.prepare(resolution, radius)
        parent = self._levels[-1]
        vox = (parent.coords[:, None, :] * 2 + self.child[None]).reshape(-1, 3)
        owner = torch.arange(parent.coords.shape[0], device=self.device)[:, None].expand(-1, 8).reshape(-1)
        inside_grid = (vox < resolution).all(1)
        vox, owner = vox[inside_grid], owner[inside_grid]
        pts = self._centers(vox, 2.0 / resolution)
        d, _, sd = self._near(pts, owner, parent, True, True, need_wind=False, by_class=True)
        keep = d[:, 0] < radius
        return vox[keep], d[keep], sd[keep]

    def _rows(self, j: int, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found bool [Q], row [Q]) of cells ``coords`` [Q, 3] at level j."""
        level = self._levels[j]
        g = 2**j
        k = (coords[:, 0] * g + coords[:, 1]) * g + coords[:, 2]
        pos = torch.searchsorted(level.keys, k).clamp_max(max(level.keys.numel() - 1, 0))
        found = level.keys[pos] == k if level.keys.numel() else torch.zeros_like(k, dtype=torch.bool)
        return found, pos

    def _locate(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deepest level cell holding each point: (level index [Q], cell row [Q])."""
        lvl_idx = torch.zeros(points.shape[0], dtype=torch.long, device=self.device)
        row = torch.zeros(points.shape[0], dtype=torch.long, device=self.device)
        for j in range(1, len(self._levels)):
            c = ((points + 1.0) / self._levels[j].size).floor().long().clamp(0, 2**j - 1)
            found, pos = self._rows(j, c)
            lvl_idx = torch.where(found, j, lvl_idx)
            row = torch.where(found, pos, row)
        return lvl_idx, row

    def _ensure_far(self, j: int, rows: torch.Tensor) -> None:
        """Compute the far-field corner values of cells ``rows`` at level j (and their ancestors) if missing."""
        level = self._levels[j]
        rows = torch.unique(rows)
        missing = rows[~level.has_far[rows]]
        if missing.numel() == 0:
            return
        parent = self._levels[j - 1]
        coords = level.coords[missing]
        found, prow = self._rows(j - 1, coords // 2)
        assert bool(found.all()), "every cell's parent exists"
        self._ensure_far(j - 1, prow)
        corners = ((coords[:, None, :] + self.corner[None]).reshape(-1, 3).to(self.dtype) * level.size
                   - 1.0)  # [8M, 3]
        _, w_corner, _ = self._evaluate(corners, prow.repeat_interleave(8), parent, need_dist=False)
        _, near_w, _ = self._near(corners, missing.repeat_interleave(8), level, False, False)
        level.far[missing] = (w_corner - near_w).reshape(-1, 8)
        level.has_far[missing] = True

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """bool [Q] on the field's device: winding number >= 1/2 at points [Q, 3] (any float dtype/device)."""
        return self.winding(points) >= 0.5

    def winding(self, points: torch.Tensor) -> torch.Tensor:
        """Winding number [Q] (field dtype, field device) at arbitrary points [Q, 3] after :meth:`build`."""
        pts = torch.as_tensor(points).to(self.device, self.dtype)
        out = torch.zeros(pts.shape[0], dtype=self.dtype, device=self.device)
        if pts.shape[0] == 0:
            return out
        nf = self.tri.shape[1]
        kernel = self.device.type == "cuda" and BACKENDS.resolve(None, pts) == "triton"
        if pts.shape[0] * nf <= (_BRUTE_FORCE_PAIRS_KERNEL if kernel else _BRUTE_FORCE_PAIRS):
            # Few points: summing every triangle exactly is cheaper than filling far-field corners.
            root = torch.zeros(pts.shape[0], dtype=torch.long, device=self.device)  # its near list: every triangle
            _, w, _ = self._near(pts, root, self._levels[0], False, False)
            return w
        lvl_idx, row = self._locate(pts)
        for j in torch.unique(lvl_idx).tolist():
            sel = torch.nonzero(lvl_idx == j).squeeze(1)
            if j > 0:
                self._ensure_far(j, row[sel])
            _, w, _ = self._evaluate(pts[sel], row[sel], self._levels[j], need_dist=False)
            out[sel] = w
        return out
