"""Weight converters between d3s2's sparse-conv layout and torchsparse, spconv and ``F.conv3d`` layouts.

d3s2 (= torchsparse 2.x) layout: ``weight[k, c_in, c_out]``, ``k = x + s·y + s²·z`` over kernel positions with x
fastest (s = kernel size; the offset is position - 1 for s = 3); see :mod:`d3s2.ops.conv.reference`.

- torchsparse: ``[k³, C_in, C_out]`` (identity), or ``[C_in, C_out]`` for a 1×1×1 kernel.
- ``F.conv3d`` on a dense grid laid out ``[B, C, X, Y, Z]``: ``[C_out, C_in, s(x), s(y), s(z)]``.
- spconv 2.x: ``[C_out, s, s, s, C_in]`` whose three kernel axes follow the index columns of the
  SparseConvTensor: ``index_order="xyz"`` when its indices are d3s2's ``(b, x, y, z)``, ``"zyx"`` for the
  spconv-customary ``(b, z, y, x)``. spconv's submanifold conv equals ``F.conv3d`` with
  ``weight.permute(0, 4, 1, 2, 3)`` on the grid in index order.
"""

from __future__ import annotations

import torch


def _kernel_size(num_offsets: int) -> int:
    s = round(num_offsets ** (1 / 3))
    if s**3 != num_offsets:
        raise ValueError(f"expected a cubic number of kernel offsets (1, 8, 27, ...), got {num_offsets}")
    return s


def _check_ndim(weight: torch.Tensor, ndims: tuple[int, ...], what: str) -> None:
    if weight.ndim not in ndims:
        raise ValueError(f"expected a {what} weight, got shape {tuple(weight.shape)}")


def from_torchsparse(weight: torch.Tensor) -> torch.Tensor:
    """torchsparse ``[K, C_in, C_out]`` or ``[C_in, C_out]`` (1×1×1) → d3s2 ``[K, C_in, C_out]``."""
    _check_ndim(weight, (2, 3), "torchsparse [K, C_in, C_out] or [C_in, C_out]")
    return weight[None] if weight.ndim == 2 else weight


def to_torchsparse(weight: torch.Tensor) -> torch.Tensor:
    """d3s2 ``[K, C_in, C_out]`` → torchsparse (``[C_in, C_out]`` when K = 1, as torchsparse stores 1×1×1)."""
    _check_ndim(weight, (3,), "d3s2 [K, C_in, C_out]")
    return weight[0] if weight.shape[0] == 1 else weight


def to_conv3d(weight: torch.Tensor) -> torch.Tensor:
    """d3s2 ``[s³, C_in, C_out]`` → ``F.conv3d`` ``[C_out, C_in, s, s, s]`` for a ``[B, C, X, Y, Z]`` grid."""
    _check_ndim(weight, (3,), "d3s2 [K, C_in, C_out]")
    k, c_in, c_out = weight.shape
    s = _kernel_size(k)
    return weight.reshape(s, s, s, c_in, c_out).permute(4, 3, 2, 1, 0)  # [z, y, x, i, o] -> [o, i, x, y, z]


def from_conv3d(weight: torch.Tensor) -> torch.Tensor:
    """``F.conv3d`` ``[C_out, C_in, s, s, s]`` (grid ``[B, C, X, Y, Z]``) → d3s2 ``[s³, C_in, C_out]``."""
    _check_ndim(weight, (5,), "F.conv3d [C_out, C_in, s, s, s]")
    c_out, c_in, sx, sy, sz = weight.shape
    if not sx == sy == sz:
        raise ValueError(f"expected a cubic kernel, got {(sx, sy, sz)}")
    return weight.permute(4, 3, 2, 1, 0).reshape(sx**3, c_in, c_out)


def _spconv_perm(index_order: str) -> tuple[int, ...]:
    # spconv [o, a0, a1, a2, i] -> F.conv3d [o, i, x, y, z]
    if index_order == "xyz":
        return (0, 4, 1, 2, 3)
    if index_order == "zyx":
        return (0, 4, 3, 2, 1)
    raise ValueError(f"expected index_order 'xyz' or 'zyx', got {index_order!r}")


def from_spconv(weight: torch.Tensor, index_order: str = "xyz") -> torch.Tensor:
    """spconv ``[C_out, s, s, s, C_in]`` → d3s2 ``[s³, C_in, C_out]``."""
    _check_ndim(weight, (5,), "spconv [C_out, s, s, s, C_in]")
    return from_conv3d(weight.permute(*_spconv_perm(index_order)))


def to_spconv(weight: torch.Tensor, index_order: str = "xyz") -> torch.Tensor:
    """d3s2 ``[s³, C_in, C_out]`` → spconv ``[C_out, s, s, s, C_in]``."""
    perm = _spconv_perm(index_order)
    inverse = tuple(perm.index(i) for i in range(5))
    return to_conv3d(weight).permute(*inverse)
