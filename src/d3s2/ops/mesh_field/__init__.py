"""Near-list mesh field: per query point, the squared distance, nearest triangle, winding number (solid-angle
sum) and flagged-edge distances over the near list of the point's cell (:func:`near_field`), and the squared
distance of explicit (point, triangle) pairs (:func:`pair_dist2`). The inner loops of the SDF's "torch" field
evaluator (:mod:`d3s2.geometry._field`).

Backends, chosen per call (``backend=`` → ``use_backend("mesh_field", ...)`` → ``D3S2_MESH_FIELD_BACKEND`` →
auto): ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; one lane per point, reductions in registers) and
``torch`` (the reference: materialised (point, triangle) pairs, any device). Semantics and shapes:
:mod:`d3s2.ops.mesh_field.reference`.
"""

from __future__ import annotations

import torch

from .._backend import needs_triton, op_backends
from .reference import NearField, near_field_ref, pair_dist2_ref, pair_terms

BACKENDS = op_backends("mesh_field")
BACKENDS.register("triton", needs_triton)
BACKENDS.register("torch")

MAX_EDGE_SETS = 10  # the triton kernel packs 3 edges x K flag sets into one int32 per triangle


def _check(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    ok = t.ndim == len(shape) and all(s is None or a == s for a, s in zip(t.shape, shape, strict=True))
    if not ok or t.dtype not in dtypes:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"expected {name} of shape {want} and dtype in {[str(d) for d in dtypes]}, got "
                         f"{tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"expected {name} on {device}, got {t.device}")


_INT = (torch.int32, torch.int64)


def near_field(points: torch.Tensor, owner: torch.Tensor, offsets: torch.Tensor, near_tri: torch.Tensor,
               tris: torch.Tensor, *, need_dist: bool = True, need_wind: bool = True, need_nearest: bool = False,
               classes: torch.Tensor | None = None, num_classes: int = 0, edge_flags: torch.Tensor | None = None,
               chunk: int = 1 << 18, backend: str | None = None) -> NearField:
    """Per-point reductions over near lists; see :func:`~d3s2.ops.mesh_field.reference.near_field_ref`.

    Args:
        points: float32 [Q, 3]. owner: int32/int64 [Q] cell of each point. offsets: int32/int64 [C + 1] CSR
            offsets of the cells' near lists in ``near_tri`` (int32/int64 [P], triangle ids < F). tris: float32
            [9, F] triangle vertices (v0 xyz, v1 xyz, v2 xyz; SoA). classes: int8/int32/int64 [F] and
            ``num_classes`` (>= 1) for per-class distances. edge_flags: bool [F, 3, K] (K <= 10).
        need_dist / need_wind / need_nearest: which of dist2, winding and nearest to return (nearest needs dist).
        chunk: pairs per batch of the torch backend.
    Returns:
        :class:`NearField`; float32 outputs, ``nearest`` int64 (-1 for an empty near list).
    """
    dev = points.device
    _check("points", points, (None, 3), (torch.float32,), dev)
    q_n = points.shape[0]
    _check("owner", owner, (q_n,), _INT, dev)
    _check("offsets", offsets, (None,), _INT, dev)
    _check("near_tri", near_tri, (None,), _INT, dev)
    _check("tris", tris, (9, None), (torch.float32,), dev)
    if offsets.numel() == 0:
        raise ValueError("expected offsets of shape [C + 1] with C >= 0, got an empty tensor")
    if need_nearest and not need_dist:
        raise ValueError("need_nearest requires need_dist")
    f = tris.shape[1]
    if classes is not None:
        _check("classes", classes, (f,), (torch.int8, *_INT), dev)
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1 with classes, got {num_classes}")
    if edge_flags is not None:
        _check("edge_flags", edge_flags, (f, 3, None), (torch.bool,), dev)
        if not 1 <= edge_flags.shape[2] <= MAX_EDGE_SETS:
            raise ValueError(f"expected 1 to {MAX_EDGE_SETS} edge flag sets, got {edge_flags.shape[2]}")
    name = BACKENDS.resolve(backend, points, owner, offsets, near_tri, tris)
    if name == "torch":
        return near_field_ref(points, owner, offsets, near_tri, tris, need_dist=need_dist, need_wind=need_wind,
                              need_nearest=need_nearest, classes=classes, num_classes=num_classes,
                              edge_flags=edge_flags, chunk=chunk)
    if name == "triton":
        from .triton import near_field_triton  # lazy: triton is imported only when this backend runs

        return near_field_triton(points, owner, offsets, near_tri, tris, need_dist, need_wind, need_nearest,
                                 classes, num_classes, edge_flags)
    raise AssertionError(f"unhandled mesh_field backend {name}")  # every registered backend is dispatched above


def pair_dist2(points: torch.Tensor, point_idx: torch.Tensor, tri_idx: torch.Tensor, tris: torch.Tensor, *,
               chunk: int = 1 << 18, backend: str | None = None) -> torch.Tensor:
    """float32 [P]: squared distance from ``points[point_idx]`` to triangle ``tri_idx`` (points float32 [Q, 3],
    indices int32/int64 [P], tris float32 [9, F]); the same backends as :func:`near_field`. The torch backend
    works in chunks of ``chunk`` pairs. See :func:`~d3s2.ops.mesh_field.reference.pair_dist2_ref`."""
    dev = points.device
    _check("points", points, (None, 3), (torch.float32,), dev)
    _check("point_idx", point_idx, (None,), _INT, dev)
    _check("tri_idx", tri_idx, (point_idx.numel(),), _INT, dev)
    _check("tris", tris, (9, None), (torch.float32,), dev)
    name = BACKENDS.resolve(backend, points, point_idx, tri_idx, tris)
    if name == "torch":
        return pair_dist2_ref(points, point_idx, tri_idx, tris, chunk=chunk)
    if name == "triton":
        from .triton import pair_dist2_triton

        return pair_dist2_triton(points, point_idx, tri_idx, tris)
    raise AssertionError(f"unhandled mesh_field backend {name}")  # every registered backend is dispatched above


__all__ = ["BACKENDS", "NearField", "near_field", "near_field_ref", "pair_dist2", "pair_dist2_ref", "pair_terms"]
