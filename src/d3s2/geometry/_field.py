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
interpolation is approximate (well below the 1/2 threshold that decides the sign: up to 9e-3 from libigl's exact
winding number over 200k random points around a 306-triangle game asset at 128³). Queries with few (point,
triangle) pairs skip the hierarchy and sum every triangle exactly: up to 2^24 pairs, and 2^28 with the Triton kernel
on a GPU, where that sum is cheaper than the hierarchy's host round trips. All levels' cells share one global id
space, so a hierarchical query is one near-list evaluation plus, if far fields are missing, one more for all of
them (their interpolations then go level by level), with three host syncs.
The near-list reductions and the pair distances that filter near lists are the op :mod:`d3s2.ops.mesh_field`
(backend per call: Triton kernels on CUDA, materialised torch pairs elsewhere; ``use_backend("mesh_field",
"torch")`` gives the old GPU path).

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
    """Cells of one level: int64 coords [C, 3], near lists (pair_cell [P] sorted, int32 pair_tri [P], CSR offsets
    [C + 1]), far [C, 8]."""

    __slots__ = ("size", "coords", "keys", "pair_cell", "pair_tri", "offsets", "far", "has_far")

    def __init__(self, size, coords, keys, pair_cell, pair_tri, far):
        self.size, self.coords, self.keys = size, coords, keys  # keys sorted ascending
        self.pair_cell, self.pair_tri, self.far = pair_cell, pair_tri, far
        # index_add, not bincount: CUDA's bincount reads the largest index back to the host.
        counts = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device).index_add_(
            0, pair_cell, torch.ones_like(pair_cell))
        self.offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.has_far = torch.zeros(coords.shape[0], dtype=torch.bool, device=coords.device)


class _Flat:
    """The cells of all levels under one global id: level ``j``'s cell of row ``r`` is ``base[j] + r``; global
    keys ``key_j + sum_{i<j} 8^i`` are sorted. Holds concatenated near lists (CSR), cell corners and sizes, and
    the far-field buffers, of which each level's ``far`` / ``has_far`` become views (filled in place)."""

    def __init__(self, levels: list[_Level], dtype: torch.dtype) -> None:
        dev = levels[0].coords.device
        counts = [lv.coords.shape[0] for lv in levels]
        self.base = [0]
        for c in counts:
            self.base.append(self.base[-1] + c)
        self.kbase = [sum(8**i for i in range(j)) for j in range(len(levels))]
        self.kbase_t = torch.tensor(self.kbase, device=dev)  # once: a host-to-device copy waits for queued kernels
        self.base_t = torch.tensor(self.base, device=dev)
        self.levels_t = torch.arange(len(levels), device=dev)
        self.level_size = torch.tensor([lv.size for lv in levels], dtype=dtype, device=dev)
        self.level_max = torch.bitwise_left_shift(torch.ones_like(self.levels_t), self.levels_t) - 1  # 2^j - 1
        self.keys = torch.cat([lv.keys + kb for lv, kb in zip(levels, self.kbase, strict=True)])
        self.level = torch.repeat_interleave(torch.arange(len(levels), device=dev),
                                             torch.tensor(counts, device=dev))
        self.coords = torch.cat([lv.coords for lv in levels])
        # Same operations as a per-level interpolation: corner = coords * size - 1 in the field's dtype.
        self.lo = torch.cat([lv.coords.to(dtype) * lv.size - 1.0 for lv in levels])
        self.size = torch.cat([torch.full((c,), lv.size, dtype=dtype, device=dev)
                               for lv, c in zip(levels, counts, strict=True)])
        pbase = [0]
        for lv in levels:
            pbase.append(pbase[-1] + lv.pair_tri.numel())
        self.offsets = torch.cat([lv.offsets[:-1] + pb for lv, pb in zip(levels, pbase[:-1], strict=True)]
                                 + [torch.tensor([pbase[-1]], device=dev)])
        self.pair_tri = torch.cat([lv.pair_tri for lv in levels])  # int32, as every level's
        self.far = torch.cat([lv.far for lv in levels])
        self.has = torch.cat([lv.has_far for lv in levels])
        for lv, b, c in zip(levels, self.base[:-1], counts, strict=True):
            lv.far, lv.has_far = self.far[b:b + c], self.has[b:b + c]

    def find(self, levels: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found bool [Q, L'], global id [Q, L']) of the cells ``coords`` int64 [Q, L', 3] at ``levels`` int64 [L']:
        one search for cells of several levels."""
        g = torch.bitwise_left_shift(torch.ones_like(levels), levels)
        k = (coords[..., 0] * g + coords[..., 1]) * g + coords[..., 2] + self.kbase_t[levels]
        pos = torch.searchsorted(self.keys, k.reshape(-1)).clamp_max(self.keys.numel() - 1).reshape(k.shape)
        return self.keys[pos] == k, pos

    def parent(self, gid: torch.Tensor) -> torch.Tensor:
        """Global id [M] of the parent of each cell ``gid`` [M] (level >= 1; every cell's parent exists)."""
        j = self.level[gid] - 1
        g = torch.bitwise_left_shift(torch.ones_like(j), j)
        c = self.coords[gid] // 2
        k = (c[:, 0] * g + c[:, 1]) * g + c[:, 2] + self.kbase_t[j]
        return torch.searchsorted(self.keys, k)


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
        self._flat_levels: _Flat | None = None
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

    def _far(self, points: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
        """Trilinear interpolation of the far-field corner values of cells ``gid`` (global ids, see
        :meth:`_flat`) at points [Q, 3]."""
        flat = self._flat()
        u = ((points - flat.lo[gid]) / flat.size[gid][:, None]).clamp(0.0, 1.0)  # [Q, 3]
        wts = torch.where(self.corner_mask[None], u[:, None, :], 1 - u[:, None, :]).prod(-1)  # [Q, 8]
        return (wts * flat.far[gid]).sum(1)

    def _flat(self) -> _Flat:
        """Every level's cells under one global id (levels in order, each sorted by key), built once per
        hierarchy: one near-list evaluation then serves points owned by cells of any level."""
        if self._flat_levels is None:
            self._flat_levels = _Flat(self._levels, self.dtype)
        return self._flat_levels

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
                     torch.zeros(nf, dtype=torch.long, device=dev), torch.arange(nf, dtype=torch.int32, device=dev),
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
            new_coords = ccoords[torch.nonzero(keep_cell).squeeze(1)]
            kept = torch.nonzero(keep_pair).squeeze(1)  # one host sync for both gathers
            pair_cell = remap[cell_of_pair[kept]]
            pair_tri = tri_of_pair[kept]
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
        self._flat_levels = None
        self._resolution = resolution

    # ------------------------------------------------------------------ queries
    def band_voxels(self, resolution: int, radius: float):
        """Voxels closer than ``radius`` to any triangle, as tensors on the field's device: (coords int64 [N, 3],
        distances [N, 3] to all, boundary and lost-sheet triangles, flagged-edge distances [N, K])."""
        self.prepare(resolution, radius)
        parent = self._levels[-1]
        vox = (parent.coords[:, None, :] * 2 + self.child[None]).reshape(-1, 3)
        owner = torch.arange(parent.coords.shape[0], device=self.device)[:, None].expand(-1, 8).reshape(-1)
        if 2 ** len(self._levels) != resolution:  # the hierarchy's grid (a power of two) overhangs the voxels
            inside_grid = torch.nonzero((vox < resolution).all(1)).squeeze(1)
            vox, owner = vox[inside_grid], owner[inside_grid]
        pts = self._centers(vox, 2.0 / resolution)
        d, _, sd = self._near(pts, owner, parent, True, True, need_wind=False, by_class=True)
        keep = torch.nonzero(d[:, 0] < radius).squeeze(1)  # one host sync for the three gathers
        return vox[keep], d[keep], sd[keep]

    def _locate(self, points: torch.Tensor) -> torch.Tensor:
        """Global id (see :meth:`_flat`) of the deepest cell holding each point [Q, 3]."""
        flat = self._flat()
        num = len(self._levels)
        if num == 1:
            return torch.zeros(points.shape[0], dtype=torch.long, device=self.device)  # the root
        # [Q, num - 1, 3]: the cell of each level holding each point. A true division by the float32 cell size, as
        # a per-level division by the size on the CPU; CUDA's division by a scalar multiplies by its reciprocal
        # instead, which is the same at power-of-two resolutions (power-of-two cell sizes).
        c = ((points + 1.0)[:, None, :] / flat.level_size[1:, None]).floor().long()
        c = torch.minimum(c.clamp_min(0), flat.level_max[1:, None])
        found, pos = flat.find(flat.levels_t[1:], c)
        depth = (found * flat.levels_t[1:]).amax(1)  # the deepest level whose cell exists, 0 (the root) if none
        return torch.where(depth > 0, pos.gather(1, (depth - 1).clamp_min(0)[:, None]).squeeze(1), 0)

    def _fill_far(self, gid: torch.Tensor) -> None:
        """Compute the far-field corner values of cells ``gid`` (global ids) and of their ancestors if missing.

        A cell's far field needs its parent's, and a cell with a far field has ancestors with one, so the missing
        cells are the cells without one among ``gid`` and all their ancestors (found for all levels at once from
        their coordinates). A corner value is the winding number one level up (the parent's near list plus its
        interpolated far field) minus the cell's own near part: the near parts of every missing cell take one
        near-list evaluation, then the levels are filled from the top, each from its parents' far fields. Three
        host syncs per call, whatever the depth.
        """
        flat = self._flat()
        missing = self._without_far(gid)
        if missing.numel() == 0:
            return
        lv, co = flat.level[missing], flat.coords[missing]
        up = flat.levels_t[1:-1]  # the levels that can hold ancestors
        if up.numel():
            # The level-i ancestor of a cell of level l > i has its coordinates >> (l - i).
            shift = (lv[:, None] - up[None]).clamp_min(0)  # [M, L']
            _, pos = flat.find(up, co[:, None, :] >> shift[..., None])
            missing = self._without_far(torch.cat([missing, torch.where(lv[:, None] > up[None], pos, 0).reshape(-1)]))
        # Global ids are ordered by level: one search splits the sorted missing cells into levels.
        bounds = (8 * torch.searchsorted(missing, flat.base_t)).tolist()
        m = missing.numel()
        parent = flat.parent(missing).repeat_interleave(8)
        corners = ((flat.coords[missing][:, None, :] + self.corner[None]).reshape(-1, 3).to(self.dtype)
                   * flat.size[missing].repeat_interleave(8)[:, None] - 1.0)  # [8M, 3]
        w = self._near_flat(torch.cat([corners, corners]), torch.cat([parent, missing.repeat_interleave(8)]))
        w_parent, w_own = w[:8 * m], w[8 * m:]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                w_corner = w_parent[lo:hi] + self._far(corners[lo:hi], parent[lo:hi])
                cells = missing[lo // 8:hi // 8]
                flat.far[cells] = (w_corner - w_own[lo:hi]).reshape(-1, 8)
                flat.has[cells] = True

    def _without_far(self, gid: torch.Tensor) -> torch.Tensor:
        """Sorted distinct cells among ``gid`` without a far field (one host sync: the root, id 0, has one)."""
        flat = self._flat()
        zero = gid.new_zeros(1)
        return torch.unique(torch.cat([zero, torch.where(flat.has[gid], 0, gid)]))[1:]

    def _near_flat(self, points: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
        """Near-list winding number [Q] of points [Q, 3] over the lists of cells ``gid`` (global ids)."""
        flat = self._flat()
        return near_field(points.to(self.dtype).contiguous(), gid, flat.offsets, flat.pair_tri, self.tri,
                          need_dist=False, need_wind=True, chunk=self.chunk).winding

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """bool [Q] on the field's device: winding number >= 1/2 at points [Q, 3] (any float dtype/device)."""
        return self.winding(points) >= 0.5

    def winding(self, points: torch.Tensor) -> torch.Tensor:
        """Winding number [Q] (field dtype, field device) at arbitrary points [Q, 3] after :meth:`build`."""
        pts = torch.as_tensor(points).to(self.device, self.dtype)
        if pts.shape[0] == 0:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        nf = self.tri.shape[1]
        kernel = self.device.type == "cuda" and BACKENDS.resolve(None, pts) == "triton"
        if pts.shape[0] * nf <= (_BRUTE_FORCE_PAIRS_KERNEL if kernel else _BRUTE_FORCE_PAIRS):
            # Few points: summing every triangle exactly is cheaper than filling far-field corners.
            root = torch.zeros(pts.shape[0], dtype=torch.long, device=self.device)  # its near list: every triangle
            _, w, _ = self._near(pts, root, self._levels[0], False, False)
            return w
        gid = self._locate(pts)
        self._fill_far(gid)
        return self._near_flat(pts, gid) + self._far(pts, gid)
