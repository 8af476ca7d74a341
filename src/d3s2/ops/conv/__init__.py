"""Sparse 3D convolution over a kernel map. Backends: ``torch`` (reference, any device) and faster GPU ones.

Public entry point: :func:`sparse_conv`; the layers in :mod:`d3s2.sparse.conv` route here.
"""

from __future__ import annotations

import torch

from .._backend import op_backends
from .reference import (
    down_kernel_map,
    downsample_coords,
    sparse_conv_ref,
    submanifold_kernel_map,
)

BACKENDS = op_backends("conv")
BACKENDS.register("torch")


def sparse_conv(feats: torch.Tensor, kernel_map: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``out[p] = bias + Σ_k feats[kernel_map[p, k]] @ weight[k]``; see :func:`sparse_conv_ref` for shapes."""
    name = BACKENDS.resolve(backend, feats, weight)
    if name == "torch":
        return sparse_conv_ref(feats, kernel_map, weight, bias)
    raise AssertionError(f"unhandled conv backend {name}")  # every registered backend is dispatched above


__all__ = ["sparse_conv", "sparse_conv_ref", "submanifold_kernel_map", "down_kernel_map", "downsample_coords",
           "BACKENDS"]
