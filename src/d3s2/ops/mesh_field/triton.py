"""Triton kernel of the near-list mesh field: one lane per query point loops over its cell's near list.

Same contract as :func:`d3s2.ops.mesh_field.reference.near_field_ref`. The torch path materialises every
(point, triangle) pair as ~40 float32 temporaries of 4 M pairs and reduces them with scatter ops, so it is bound
by memory traffic and launches; here each lane keeps its running minima and winding sum in registers, reads the
9 vertex coordinates of each near triangle (a gather that hits L2: lanes of one cell read the same triangles)
and writes only the per-point outputs.

Distances use the reference's operations in the same order with correctly rounded division and square root and
no FMA contraction (``enable_fp_fusion=False`` for launches with distance outputs), so they are bit-identical to
the torch path. The solid angle's ``atan2`` is a minimax polynomial (about 1e-7 rad from the exact angle; libdevice
is not available under the interpreter) and its vector lengths use the fast square root, so winding numbers agree
with the torch path to float rounding, not bit for bit (winding-only launches also allow FMAs).

Dimension legend: Q points, C cells, P near-list entries, F triangles, K edge flag sets.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from .reference import NearField

BLOCK_Q = 128  # query points per program
BLOCK_Q_INTERPRET = 1024  # under TRITON_INTERPRET=1 each program costs ~20 ms per near-list step, whatever its size
NUM_WARPS = 4
_PI = tl.constexpr(math.pi)
_HALF_PI = tl.constexpr(math.pi / 2)
_INV_2PI = tl.constexpr(1.0 / (2.0 * math.pi))


@triton.jit
def _atan2(y, x):
    """atan2 for float32 tensors, matching torch's quadrants and signed zeros; |error| < 3e-7 rad."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    mx = tl.maximum(ax, ay)
    a = tl.where(mx > 0, tl.minimum(ax, ay) / tl.where(mx > 0, mx, 1.0), 0.0)
    s = a * a
    # atan(a) / a on [0, 1] as a polynomial in a^2 (least-squares minimax fit, 1.1e-7 max error).
    p = 0.0029036023188382387 * s - 0.016283158212900162
    p = p * s + 0.04303952306509018
    p = p * s - 0.07533681392669678
    p = p * s + 0.10654675960540771
    p = p * s - 0.14207132160663605
    p = p * s + 0.19993053376674652
    p = p * s - 0.3333309292793274
    p = p * s + 1.0
    r = p * a
    r = tl.where(ay > ax, _HALF_PI - r, r)
    r = tl.where(x.to(tl.int32, bitcast=True) < 0, _PI - r, r)  # sign bit: -0.0 counts as negative, as in torch
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)


@triton.jit
def _dot(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


@triton.jit
def _segment_dist2(apx, apy, apz, abx, aby, abz):
    t = tl.div_rn(_dot(apx, apy, apz, abx, aby, abz), tl.maximum(_dot(abx, aby, abz, abx, aby, abz), 1e-30))
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    dx = apx - t * abx
    dy = apy - t * aby
    dz = apz - t * abz
    return _dot(dx, dy, dz, dx, dy, dz)


@triton.jit
def _tri_dist2(ax, ay, az, bx, by, bz, cx, cy, cz):
    """(squared distance to the triangle, squared distances to its edges v0v1, v1v2, v2v0) from the vertices
    relative to the point (``a = v0 - p`` ...), with the reference's operations in its order."""
    abx = bx - ax
    aby = by - ay
    abz = bz - az
    bcx = cx - bx
    bcy = cy - by
    bcz = cz - bz
    cax = ax - cx
    cay = ay - cy
    caz = az - cz
    e0 = _segment_dist2(-ax, -ay, -az, abx, aby, abz)
    e1 = _segment_dist2(-bx, -by, -bz, bcx, bcy, bcz)
    e2 = _segment_dist2(-cx, -cy, -cz, cax, cay, caz)
    acx = cx - ax
    acy = cy - ay
    acz = cz - az
    nx = aby * acz - abz * acy
    ny = abz * acx - abx * acz
    nz = abx * acy - aby * acx
    nn = _dot(nx, ny, nz, nx, ny, nz)
    # cross(edge, p - v) . n >= 0 for the three edges: the projection falls inside the triangle.
    s0 = _dot(aby * -az - abz * -ay, abz * -ax - abx * -az, abx * -ay - aby * -ax, nx, ny, nz)
    s1 = _dot(bcy * -bz - bcz * -by, bcz * -bx - bcx * -bz, bcx * -by - bcy * -bx, nx, ny, nz)
    s2 = _dot(cay * -cz - caz * -cy, caz * -cx - cax * -cz, cax * -cy - cay * -cx, nx, ny, nz)
    inside = (s0 >= 0) & (s1 >= 0) & (s2 >= 0) & (nn > 1e-30)
    an = _dot(ax, ay, az, nx, ny, nz)
    plane = tl.div_rn(an * an, tl.maximum(nn, 1e-30))
    return tl.where(inside, plane, tl.minimum(tl.minimum(e0, e1), e2)), e0, e1, e2


@triton.jit
def _load_relative(TRI, F, t, mask, px, py, pz):
    """The 9 vertex coordinates of triangles ``t`` minus the points (``v0 - p``, ``v1 - p``, ``v2 - p``)."""
    ax = tl.load(TRI + t, mask=mask, other=0.0) - px
    ay = tl.load(TRI + F + t, mask=mask, other=0.0) - py
    az = tl.load(TRI + 2 * F + t, mask=mask, other=0.0) - pz
    bx = tl.load(TRI + 3 * F + t, mask=mask, other=0.0) - px
    by = tl.load(TRI + 4 * F + t, mask=mask, other=0.0) - py
    bz = tl.load(TRI + 5 * F + t, mask=mask, other=0.0) - pz
    cx = tl.load(TRI + 6 * F + t, mask=mask, other=0.0) - px
    cy = tl.load(TRI + 7 * F + t, mask=mask, other=0.0) - py
    cz = tl.load(TRI + 8 * F + t, mask=mask, other=0.0) - pz
    return ax, ay, az, bx, by, bz, cx, cy, cz


# Sizes are not specialised: Triton would compile a variant per value class (1, a multiple of 16, other) of each,
# so the first mesh with one triangle, or a new point count class, would pay a compilation mid-run.
@triton.jit(do_not_specialize=["Q", "F"])
def _near_field_kernel(P, OWNER, OFFS, NEAR, TRI, CLS, EBITS, D2, NEAREST, CD2, WIND, ED2, Q, F,
                       NEED_DIST: tl.constexpr, NEED_WIND: tl.constexpr, NEED_NEAREST: tl.constexpr,
                       NEED_D: tl.constexpr, NUM_CLASSES: tl.constexpr, NC_P2: tl.constexpr, K: tl.constexpr,
                       K_P2: tl.constexpr, BLOCK: tl.constexpr):
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    qm = q < Q
    q64 = q.to(tl.int64)
    px = tl.load(P + q64 * 3, mask=qm, other=0.0)
    py = tl.load(P + q64 * 3 + 1, mask=qm, other=0.0)
    pz = tl.load(P + q64 * 3 + 2, mask=qm, other=0.0)
    cell = tl.load(OWNER + q64, mask=qm, other=0).to(tl.int64)
    start = tl.load(OFFS + cell, mask=qm, other=0).to(tl.int64)
    count = (tl.load(OFFS + cell + 1, mask=qm, other=0).to(tl.int64) - start).to(tl.int32)
    count = tl.where(qm, count, 0)
    best = tl.full([BLOCK], float("inf"), tl.float32)
    best_id = tl.full([BLOCK], 2147483647, tl.int32)
    wsum = tl.zeros([BLOCK], tl.float32)
    kc = tl.arange(0, NC_P2)
    cls_best = tl.full([BLOCK, NC_P2], float("inf"), tl.float32)
    kk = tl.arange(0, K_P2)
    edge_best = tl.full([BLOCK, K_P2], float("inf"), tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        active = j < count
        t = tl.load(NEAR + start + j, mask=active, other=0).to(tl.int32)
        ax, ay, az, bx, by, bz, cx, cy, cz = _load_relative(TRI, F, t, active, px, py, pz)
        if NEED_WIND:
            la = tl.sqrt(_dot(ax, ay, az, ax, ay, az))  # approximate: winding numbers are not bit-exact anyway
            lb = tl.sqrt(_dot(bx, by, bz, bx, by, bz))
            lc = tl.sqrt(_dot(cx, cy, cz, cx, cy, cz))
            num = _dot(ax, ay, az, by * cz - bz * cy, bz * cx - bx * cz, bx * cy - by * cx)
            den = (la * lb * lc + _dot(ax, ay, az, bx, by, bz) * lc + _dot(bx, by, bz, cx, cy, cz) * la
                   + _dot(cx, cy, cz, ax, ay, az) * lb)
            wsum += tl.where(active, _atan2(num, den) * _INV_2PI, 0.0)
        if NEED_D:  # any distance output: dist, class or edge distances
            d2, e0, e1, e2 = _tri_dist2(ax, ay, az, bx, by, bz, cx, cy, cz)
            d2 = tl.where(active, d2, float("inf"))
            if NEED_NEAREST:
                better = (d2 < best) | ((d2 == best) & (t < best_id) & active)
                best_id = tl.where(better, t, best_id)
            best = tl.minimum(best, d2)
            if NUM_CLASSES > 0:
                c = tl.load(CLS + t, mask=active, other=NUM_CLASSES).to(tl.int32)
                cls_best = tl.minimum(cls_best, tl.where(c[:, None] == kc[None, :], d2[:, None], float("inf")))
            if K > 0:
                bits = tl.load(EBITS + t, mask=active, other=0)
                f0 = ((bits[:, None] >> kk[None, :]) & 1) != 0
                f1 = ((bits[:, None] >> (K + kk[None, :])) & 1) != 0
                f2 = ((bits[:, None] >> (2 * K + kk[None, :])) & 1) != 0
                ed = tl.where(f0, e0[:, None], float("inf"))
                ed = tl.minimum(ed, tl.where(f1, e1[:, None], float("inf")))
                ed = tl.minimum(ed, tl.where(f2, e2[:, None], float("inf")))
                edge_best = tl.minimum(edge_best, ed)
    if NEED_DIST:
        tl.store(D2 + q64, best, mask=qm)
    if NEED_NEAREST:
        tl.store(NEAREST + q64, tl.where(best_id == 2147483647, -1, best_id).to(tl.int64), mask=qm)
    if NEED_WIND:
        tl.store(WIND + q64, wsum, mask=qm)
    if NUM_CLASSES > 0:
        cmask = qm[:, None] & (kc[None, :] < NUM_CLASSES)
        tl.store(CD2 + q64[:, None] * NUM_CLASSES + kc[None, :], cls_best, mask=cmask)
    if K > 0:
        tl.store(ED2 + q64[:, None] * K + kk[None, :], edge_best, mask=qm[:, None] & (kk[None, :] < K))


@triton.jit(do_not_specialize=["N", "F"])
def _pair_dist2_kernel(P, PT, TI, TRI, D2, N, F, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    q = tl.load(PT + i, mask=m, other=0).to(tl.int64)
    t = tl.load(TI + i, mask=m, other=0).to(tl.int32)
    px = tl.load(P + q * 3, mask=m, other=0.0)
    py = tl.load(P + q * 3 + 1, mask=m, other=0.0)
    pz = tl.load(P + q * 3 + 2, mask=m, other=0.0)
    ax, ay, az, bx, by, bz, cx, cy, cz = _load_relative(TRI, F, t, m, px, py, pz)
    d2, _, _, _ = _tri_dist2(ax, ay, az, bx, by, bz, cx, cy, cz)
    tl.store(D2 + i, d2, mask=m)


def pair_dist2_triton(points: torch.Tensor, point_idx: torch.Tensor, tri_idx: torch.Tensor,
                      tris: torch.Tensor) -> torch.Tensor:
    """Launcher of ``_pair_dist2_kernel``; arguments validated by :func:`d3s2.ops.mesh_field.pair_dist2`."""
    n = point_idx.numel()
    out = torch.empty(n, dtype=torch.float32, device=points.device)
    if n:
        block = BLOCK_Q_INTERPRET if triton_interpret() else 256
        _pair_dist2_kernel[(triton.cdiv(n, block),)](points.contiguous(), point_idx.contiguous(),
                                                     tri_idx.contiguous(), tris.contiguous(), out, n, tris.shape[1],
                                                     BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


def edge_bits(edge_flags: torch.Tensor) -> torch.Tensor:
    """int32 [F]: bit ``e * K + k`` set when edge e of the triangle is in flag set k (``edge_flags`` bool [F, 3, K])."""
    f, _, k = edge_flags.shape
    shifts = torch.arange(3 * k, device=edge_flags.device, dtype=torch.int32)
    return (edge_flags.reshape(f, 3 * k).to(torch.int32) << shifts).sum(1, dtype=torch.int32)


def near_field_triton(points: torch.Tensor, owner: torch.Tensor, offsets: torch.Tensor, near_tri: torch.Tensor,
                      tris: torch.Tensor, need_dist: bool, need_wind: bool, need_nearest: bool,
                      classes: torch.Tensor | None, num_classes: int, edge_flags: torch.Tensor | None) -> NearField:
    """Launcher of ``_near_field_kernel``; arguments validated by :func:`d3s2.ops.mesh_field.near_field`."""
    dev, q_n = points.device, points.shape[0]
    f = tris.shape[1]
    nc = num_classes if classes is not None else 0
    k = edge_flags.shape[2] if edge_flags is not None else 0
    d2 = torch.empty(q_n, dtype=torch.float32, device=dev) if need_dist else None
    nearest = torch.empty(q_n, dtype=torch.int64, device=dev) if need_nearest else None
    cd2 = torch.empty((q_n, nc), dtype=torch.float32, device=dev) if nc else None
    wind = torch.empty(q_n, dtype=torch.float32, device=dev) if need_wind else None
    ed2 = torch.empty((q_n, k), dtype=torch.float32, device=dev) if k else None
    need_d = need_dist or nc > 0 or k > 0
    if q_n:
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        cls = classes.contiguous() if nc else dummy
        bits = edge_bits(edge_flags) if k else dummy
        block = BLOCK_Q_INTERPRET if triton_interpret() else BLOCK_Q
        grid = (triton.cdiv(q_n, block),)
        _near_field_kernel[grid](
            points.contiguous(), owner.contiguous(), offsets.contiguous(), near_tri.contiguous(), tris.contiguous(),
            cls, bits, d2 if need_dist else dummy, nearest if need_nearest else dummy, cd2 if nc else dummy,
            wind if need_wind else dummy, ed2 if k else dummy, q_n, f,
            NEED_DIST=need_dist, NEED_WIND=need_wind, NEED_NEAREST=need_nearest, NEED_D=need_d, NUM_CLASSES=nc,
            NC_P2=max(2, triton.next_power_of_2(nc)), K=k, K_P2=max(2, triton.next_power_of_2(k)), BLOCK=block,
            num_warps=NUM_WARPS, enable_fp_fusion=not need_d)  # FMAs would change distances' roundings
    return NearField(dist2=d2, nearest=nearest, class_dist2=cd2, winding=wind, edge_dist2=ed2)
