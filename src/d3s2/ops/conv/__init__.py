"""Sparse 3D convolution over a kernel map. Backends: ``triton`` (implicit GEMM, CUDA) and ``torch`` (reference).

Public entry point: :func:`sparse_conv`; the layers in :mod:`d3s2.sparse.conv` route here. Weight converters for
torchsparse, spconv and ``F.conv3d`` layouts live in :mod:`d3s2.ops.conv.convert`.
"""

from __future__ import annotations

import torch

from .._backend import needs_float_dtype, needs_triton, op_backends
from .reference import (
    KernelMap,
    down_kernel_map,
    downsample_coords,
    kernel_map_pairs,
    sparse_conv_ref,
    subdivided_kernel_map,
    submanifold_kernel_map,
    transpose_kernel_map,
)

BACKENDS = op_backends("conv")
# Auto-preference order: fastest first.
BACKENDS.register("triton", needs_triton, needs_float_dtype(torch.float16, torch.bfloat16, torch.float32))
BACKENDS.register("torch")


def sparse_conv(feats: torch.Tensor, kernel_map: torch.Tensor | KernelMap, weight: torch.Tensor,
                bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``out[p] = bias + Σ_k feats[kernel_map[p, k]] @ weight[k]``; see :func:`sparse_conv_ref` for shapes.

    ``kernel_map`` is an int32 ``[M, K]`` map or a :class:`KernelMap` (which caches the transposed map, pair lists
    and tile schedules across calls; layers pass one).
    """
    kmap = kernel_map if isinstance(kernel_map, KernelMap) else KernelMap(kernel_map, feats.shape[0])
    name = BACKENDS.resolve(backend, feats, weight)
    if name == "triton":
        from .triton import sparse_conv_triton  # lazy: triton is imported only when this backend runs

        return sparse_conv_triton(feats, kmap, weight, bias)
    if name == "torch":
        return sparse_conv_ref(feats, kmap.map, weight, bias)
    raise AssertionError(f"unhandled conv backend {name}")  # every registered backend is dispatched above


__all__ = ["sparse_conv", "sparse_conv_ref", "KernelMap", "submanifold_kernel_map", "subdivided_kernel_map",
           "down_kernel_map", "downsample_coords", "transpose_kernel_map", "kernel_map_pairs", "BACKENDS"]
