"""Block structure of a ragged token batch for Spatial Sparse Attention (SSA).

Dimension legend: N tokens (all samples), B batch, NBs selection blocks, NBc compression blocks, NW windows.

Tokens are kept in *block order*: :func:`d3s2.sparse.block_sort` with ``m_slc`` (every ``m_slc³`` selection block
contiguous, blocks ordered (batch, bx, by, bz)), refined inside each selection block by compression cell
(``m_cmp³``, ``m_cmp`` divides ``m_slc``; cells ordered x, y, z) and then by (x, y, z). So compression blocks are
contiguous too, numbered in token order, and those of one selection block are consecutive. With
``m_cmp == m_slc`` the order is exactly ``block_sort(x, m_slc)``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...sparse.serialize import block_sort, window_partition
from ...sparse.tensor import SparseTensor


@dataclass(frozen=True)
class SSALayout:
    """Index structure shared by the SSA branches (all tensors on the tokens' device).

    Attributes:
        perm: int64 ``[N]``: position i of the block order holds caller token ``perm[i]``.
        inverse: int64 ``[N]``: caller token j sits at block-order position ``inverse[j]``.
        cu_seqlens: int32 ``[B + 1]`` first token of each sample (block order keeps samples contiguous).
        slc_offsets: int32 ``[NBs + 1]`` first token of each selection block, then N.
        cu_slc: int32 ``[B + 1]`` first selection block of each sample, then NBs.
        slc_cmp_offsets: int32 ``[NBs + 1]`` first compression block of each selection block, then NBc.
        cu_cmp: int32 ``[B + 1]`` first compression block of each sample, then NBc.
        cmp_offsets: int32 ``[NBc + 1]`` first token of each compression block, then N.
        cmp_slc: int32 ``[NBc]`` selection block (global id) of each compression block.
        cmp_coords: int32 ``[NBc, 4]`` (batch, x, y, z) of each compression block on the ``R / m_cmp`` grid.
        pe_index: int64 ``[N]`` in-block offset ``(x % m_cmp)·m_cmp² + (y % m_cmp)·m_cmp + z % m_cmp`` of each token.
        win_perm: int64 ``[N]`` block-order position of the i-th token in window order, or None when the windows
            are exactly the selection blocks in the same order (then window order = block order).
        win_inverse: int64 ``[N]`` window-order position of each block-order token, or None (see ``win_perm``).
        win_offsets: int32 ``[NW + 1]`` first token (window order) of each window, then N.
        max_seqlen, max_cmp, max_slc: the most tokens / compression blocks / selection blocks in one sample (kernel
            grid sizes, the top-k's key width).
        in_block_order: the caller's tokens are already in block order (``perm`` is the identity).
        m_cmp, m_slc, m_win, shift: the block sizes and window shift this layout was built for.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    slc_offsets: torch.Tensor
    cu_slc: torch.Tensor
    slc_cmp_offsets: torch.Tensor
    cu_cmp: torch.Tensor
    cmp_offsets: torch.Tensor
    cmp_slc: torch.Tensor
    cmp_coords: torch.Tensor
    pe_index: torch.Tensor
    win_perm: torch.Tensor | None
    win_inverse: torch.Tensor | None
    win_offsets: torch.Tensor
    max_seqlen: int
    max_cmp: int
    max_slc: int
    in_block_order: bool
    m_cmp: int
    m_slc: int
    m_win: int
    shift: int

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    @property
    def num_cmp(self) -> int:
        return self.cmp_slc.numel()

    @property
    def num_slc(self) -> int:
        return self.slc_offsets.numel() - 1

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    out[1:] = torch.cumsum(counts, 0)
    return out


def build_ssa_layout(x: SparseTensor, *, m_cmp: int, m_slc: int, m_win: int, shift: int = 0) -> SSALayout:
    """The :class:`SSALayout` of ``x`` (cached on ``x``'s structure cache, so every layer reuses it)."""
    if m_cmp <= 0 or m_slc % m_cmp:
        raise ValueError(f"expected m_slc to be a positive multiple of m_cmp, got m_cmp={m_cmp}, m_slc={m_slc}")
    if not 0 <= shift < m_win:
        raise ValueError(f"expected 0 <= shift < m_win, got shift={shift}, m_win={m_win}")
    key = f"ssa_layout_{m_cmp}_{m_slc}_{m_win}_{shift}"
    return x.cached(key, lambda: _build(x, m_cmp, m_slc, m_win, shift))


def _build(x: SparseTensor, m_cmp: int, m_slc: int, m_win: int, shift: int) -> SSALayout:
    dev = x.coords.device
    s = block_sort(x, m_slc)
    cs = x.coords[s.perm].long()  # [N, 4] coords in selection-block order
    r = m_slc // m_cmp
    sub = torch.div(cs[:, 1:], m_cmp, rounding_mode="floor") % r  # [N, 3] compression cell inside its slc block
    key = s.block_ids.long() * r**3 + (sub[:, 0] * r + sub[:, 1]) * r + sub[:, 2]
    order = torch.argsort(key, stable=True)  # group each selection block's tokens by compression cell
    perm = s.perm[order]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=dev)
    cs, key = cs[order], key[order]
    uniq, counts = torch.unique_consecutive(key, return_counts=True)
    cmp_offsets = _offsets(counts)
    cmp_slc = torch.div(uniq, r**3, rounding_mode="floor").to(torch.int32)
    slc_cmp_offsets = _offsets(torch.bincount(cmp_slc, minlength=s.num_blocks))
    cu_cmp = slc_cmp_offsets[s.cu_seqblocks.long()]
    first = cmp_offsets[:-1].long()
    cmp_coords = torch.cat([cs[first, :1], torch.div(cs[first, 1:], m_cmp, rounding_mode="floor")], 1).int()
    local = cs[:, 1:] % m_cmp
    pe_index = (local[:, 0] * m_cmp + local[:, 1]) * m_cmp + local[:, 2]

    if m_win == m_slc and shift == 0:
        # The windows are the selection blocks, already contiguous (the order inside a window is irrelevant).
        win_perm = win_inverse = None
        win_offsets = s.block_offsets
    else:
        w = window_partition(x, m_win, shift)
        win_perm = inverse[w.perm]
        win_inverse = torch.empty_like(win_perm)
        win_inverse[win_perm] = torch.arange(win_perm.numel(), device=dev)
        win_offsets = w.block_offsets

    cu_seqlens = x.cu_seqlens
    n = cu_seqlens.numel() - 1
    stats = torch.stack([
        (cu_seqlens[1:] - cu_seqlens[:-1]).max() if n else cu_seqlens.new_zeros(()),
        (cu_cmp[1:] - cu_cmp[:-1]).max() if n else cu_seqlens.new_zeros(()),
        (s.cu_seqblocks[1:] - s.cu_seqblocks[:-1]).max() if n else cu_seqlens.new_zeros(()),
        (perm != torch.arange(perm.numel(), device=dev)).any().to(cu_seqlens.dtype),
    ]).tolist()  # one host sync for the grid sizes and the identity check
    return SSALayout(
        perm=perm, inverse=inverse, cu_seqlens=cu_seqlens, slc_offsets=s.block_offsets, cu_slc=s.cu_seqblocks,
        slc_cmp_offsets=slc_cmp_offsets, cu_cmp=cu_cmp, cmp_offsets=cmp_offsets, cmp_slc=cmp_slc,
        cmp_coords=cmp_coords, pe_index=pe_index, win_perm=win_perm, win_inverse=win_inverse,
        win_offsets=win_offsets, max_seqlen=int(stats[0]), max_cmp=int(stats[1]),
        max_slc=int(stats[2]), in_block_order=not stats[3], m_cmp=m_cmp, m_slc=m_slc, m_win=m_win, shift=shift,
    )
