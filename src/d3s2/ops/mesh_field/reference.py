"""Pure-torch reference (the spec) of the near-list mesh field: per query point, distance, nearest triangle,
winding number and flagged-edge distances over the triangles of its cell's near list; and the squared distance
of explicit (point, triangle) pairs (:func:`pair_dist2_ref`, used to filter near lists).

Inputs (see :func:`near_field_ref`): points ``[Q, 3]``, each with an owner cell ``owner [Q]``; cell ``c`` has the
near list ``near_tri[offsets[c]:offsets[c + 1]]`` (CSR, triangle ids into ``tris``). Per point ``q`` with near
list ``L``, the outputs are

    dist2[q]          = min_{t in L} |p - T_t|^2                         (inf for an empty list)
    nearest[q]        = smallest t in L reaching dist2[q]                 (-1 for an empty list)
    class_dist2[q, k] = min over t in L with classes[t] == k              (inf if none)
    winding[q]        = sum_{t in L} Omega_t(p) / 4 pi                    (0 for an empty list)
    edge_dist2[q, k]  = min squared distance to the edges of t in L flagged in set k (inf if none)

with the solid angle from the Van Oosterom–Strackee formula. This reference materialises the (point, triangle)
pairs in chunks and reduces them with scatter ops: it is the "old" torch path of the SDF's field evaluator.
All float math is float32 with one IEEE rounding per operation (division and square root correctly rounded),
so a kernel that performs the same operations in the same order gives bit-identical distances.

Dimension legend: Q points, C cells, P near-list entries (or pairs), F triangles, K edge flag sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class NearField:
    """Per-point outputs of :func:`near_field_ref` (None where not requested)."""

    dist2: torch.Tensor | None  # float32 [Q]
    nearest: torch.Tensor | None  # int64 [Q]
    class_dist2: torch.Tensor | None  # float32 [Q, num_classes]
    winding: torch.Tensor | None  # float32 [Q]
    edge_dist2: torch.Tensor | None  # float32 [Q, K]


# Pair terms work on structure-of-arrays inputs (each coordinate a contiguous [P] tensor): on the CPU this
# is several times faster than [P, 3] tensors reduced over their last dimension.
def _sub(a, b):
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _segment_dist2(ap, ab):
    """Squared distance from points to segments, given ``ap = p - a`` and ``ab = b - a`` (SoA)."""
    t = (_dot(ap, ab) / _dot(ab, ab).clamp_min(1e-30)).clamp(0.0, 1.0)
    d = (ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2])
    return _dot(d, d)


def pair_terms(p: torch.Tensor, tri: torch.Tensor, sharp: torch.Tensor | None = None, need_dist: bool = True,
               need_wind: bool = True):
    """Per (point, triangle) pair: squared distance, solid angle / 4pi, squared distances to flagged edges.

    Args:
        p: [3, P] points (SoA). tri: [9, P] triangle vertices (v0 xyz, v1 xyz, v2 xyz). sharp: bool [P, 3, K]
        edge (v0v1, v1v2, v2v0) is in flag set k (sharp edges, open edges, ...).
    Returns:
        (dist2 [P] or None, winding [P] or None, flagged_dist2 [P, K] or None); inf where no edge is flagged.
    """
    pp = (p[0], p[1], p[2])
    a = _sub((tri[0], tri[1], tri[2]), pp)  # v0 - p
    b = _sub((tri[3], tri[4], tri[5]), pp)
    c = _sub((tri[6], tri[7], tri[8]), pp)
    wind = None
    if need_wind:
        la, lb, lc = _dot(a, a).sqrt(), _dot(b, b).sqrt(), _dot(c, c).sqrt()
        num = _dot(a, _cross(b, c))
        den = la * lb * lc + _dot(a, b) * lc + _dot(b, c) * la + _dot(c, a) * lb
        wind = torch.atan2(num, den) * (1.0 / (2.0 * math.pi))  # 2 atan2 / (4 pi)
    if not need_dist:
        return None, wind, None
    ab, bc, ca = _sub(b, a), _sub(c, b), _sub(a, c)  # triangle edges
    ma, mb, mc = (-a[0], -a[1], -a[2]), (-b[0], -b[1], -b[2]), (-c[0], -c[1], -c[2])  # p - v
    e = torch.stack([_segment_dist2(ma, ab), _segment_dist2(mb, bc), _segment_dist2(mc, ca)], 1)  # [P, 3]
    n = _cross(ab, _sub(c, a))
    nn = _dot(n, n)
    inside = ((_dot(_cross(ab, ma), n) >= 0) & (_dot(_cross(bc, mb), n) >= 0) & (_dot(_cross(ca, mc), n) >= 0)
              & (nn > 1e-30))
    plane = _dot(a, n) ** 2 / nn.clamp_min(1e-30)
    dist2 = torch.where(inside, plane, e.min(dim=1).values)
    sharp_d2 = None
    if sharp is not None:
        sharp_d2 = torch.where(sharp, e[:, :, None], torch.full_like(e[:, :, None], float("inf"))).amin(dim=1)
    return dist2, wind, sharp_d2


def pair_dist2_ref(points: torch.Tensor, point_idx: torch.Tensor, tri_idx: torch.Tensor, tris: torch.Tensor,
                   chunk: int = 1 << 18) -> torch.Tensor:
    """float32 [P]: squared distance of each (point, triangle) pair (:func:`pair_terms`), in chunks of pairs.

    points float32 [Q, 3], point_idx / tri_idx int [P], tris float32 [9, F].
    """
    out = torch.empty(point_idx.numel(), dtype=torch.float32, device=points.device)
    for s in range(0, point_idx.numel(), chunk):
        q, t = point_idx[s:s + chunk].long(), tri_idx[s:s + chunk].long()
        out[s:s + chunk] = pair_terms(points[q].T, tris[:, t], need_wind=False)[0]
    return out


def expand_pairs(owner: torch.Tensor, offsets: torch.Tensor, near_tri: torch.Tensor):
    """(point index [P], triangle index [P]) pairing each point with the near list of its owner cell."""
    counts = (offsets[1:] - offsets[:-1])[owner]
    pt = torch.repeat_interleave(torch.arange(owner.numel(), device=owner.device), counts)
    offs = torch.arange(pt.numel(), device=owner.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                                   counts)
    return pt, near_tri[offsets[owner][pt] + offs].long()


def near_field_ref(points: torch.Tensor, owner: torch.Tensor, offsets: torch.Tensor, near_tri: torch.Tensor,
                   tris: torch.Tensor, *, need_dist: bool = True, need_wind: bool = True, need_nearest: bool = False,
                   classes: torch.Tensor | None = None, num_classes: int = 0, edge_flags: torch.Tensor | None = None,
                   chunk: int = 1 << 18) -> NearField:
    """Reduce :func:`pair_terms` over each point's near list (see the module docstring).

    Args:
        points: float32 [Q, 3]. owner: int [Q] cell of each point. offsets: int [C + 1] CSR offsets into
        ``near_tri`` (int [P], triangle ids). tris: float32 [9, F] triangle vertices (SoA). classes: int [F]
        class of each triangle (classes >= ``num_classes`` take part in no class distance). edge_flags: bool
        [F, 3, K] edge (v0v1, v1v2, v2v0) of a triangle is in flag set k. chunk: pairs per batch.
    """
    dev, q_n = points.device, points.shape[0]
    inf = float("inf")
    pts = points.T.contiguous()  # [3, Q]
    dist2 = torch.full((q_n,), inf, device=dev) if need_dist else None
    cls2 = torch.full((q_n, num_classes), inf, device=dev) if classes is not None else None
    wind = torch.zeros(q_n, device=dev) if need_wind else None
    nk = 0 if edge_flags is None else edge_flags.shape[2]
    edge2 = torch.full((q_n, nk), inf, device=dev) if edge_flags is not None else None
    need_d = dist2 is not None or cls2 is not None or edge2 is not None
    pt, ti = expand_pairs(owner.long(), offsets.long(), near_tri)
    d2_all = []
    for s in range(0, pt.numel(), chunk):
        q, t = pt[s:s + chunk], ti[s:s + chunk]
        d2, w, e2 = pair_terms(pts[:, q], tris[:, t], None if edge_flags is None else edge_flags[t], need_d, need_wind)
        if need_wind:
            wind.index_add_(0, q, w)
        if dist2 is not None:
            dist2.scatter_reduce_(0, q, d2, reduce="amin")
            if need_nearest:
                d2_all.append(d2)
        if cls2 is not None:
            c = classes[t]
            for k in range(num_classes):
                cls2[:, k].scatter_reduce_(0, q, torch.where(c == k, d2, inf), reduce="amin")
        if edge2 is not None:
            edge2.scatter_reduce_(0, q[:, None].expand(-1, nk), e2, reduce="amin")
    nearest = None
    if need_nearest:
        # Ties go to the smallest triangle id: the minimum id over the pairs that reach the point's minimum.
        d2 = torch.cat(d2_all) if d2_all else torch.zeros(0, device=dev)
        big = torch.iinfo(torch.int64).max
        cand = torch.where(d2 == dist2[pt], ti, big)
        nearest = torch.full((q_n,), big, dtype=torch.int64, device=dev).scatter_reduce_(0, pt, cand, reduce="amin")
        nearest = torch.where(nearest == big, -1, nearest)
    return NearField(dist2=dist2, nearest=nearest, class_dist2=cls2, winding=wind, edge_dist2=edge2)
