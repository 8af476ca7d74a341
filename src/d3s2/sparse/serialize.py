"""Token orderings used by attention: by 3D block (SSA) and by (shifted) window.

Dimension legend: N voxels, B batch, m block size, W window size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tensor import SparseTensor


@dataclass(frozen=True)
class BlockSort:
    """Tokens grouped by ``m³`` block: ``coords[perm]`` has each block contiguous.

    Blocks are ordered by (batch, block x, block y, block z); tokens inside a block by (x, y, z), the order
    the published ``sort_block`` uses.

    Attributes:
        perm: int64 ``[N]``; sorted position i holds original token ``perm[i]``.
        inverse: int64 ``[N]``; original token j sits at sorted position ``inverse[j]``.
        block_offsets: int32 ``[num_blocks + 1]`` start of each block in sorted order, then N.
        block_ids: int32 ``[N]`` block of each token in sorted order (global over the batch).
        block_coords: int32 ``[num_blocks, 4]`` (batch, bx, by, bz) of each block.
        cu_seqblocks: int32 ``[B + 1]`` first block of each sample, then num_blocks.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    block_offsets: torch.Tensor
    block_ids: torch.Tensor
    block_coords: torch.Tensor
    cu_seqblocks: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.block_coords.shape[0]


def _group_sort(coords: torch.Tensor, batch_size: int, resolution: int, size: int, shift: int) -> BlockSort:
    c = coords.long()
    xyz = c[:, 1:] + shift
    grid = (resolution + shift) // size + 1  # groups per axis, room for the shifted border
    g = xyz // size
    local = xyz % size
    group_key = ((c[:, 0] * grid + g[:, 0]) * grid + g[:, 1]) * grid + g[:, 2]
    local_key = (local[:, 0] * size + local[:, 1]) * size + local[:, 2]
    key = group_key * size**3 + local_key
    perm = torch.argsort(key, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    sorted_group = group_key[perm]
    uniq, counts = torch.unique_consecutive(sorted_group, return_counts=True)
    offsets = torch.zeros(uniq.numel() + 1, dtype=torch.int32, device=coords.device)
    offsets[1:] = torch.cumsum(counts, 0)
    block_ids = torch.repeat_interleave(torch.arange(uniq.numel(), device=coords.device, dtype=torch.int32),
                                        counts)
    bz = uniq % grid
    by = (uniq // grid) % grid
    bx = (uniq // grid**2) % grid
    bb = uniq // grid**3
    block_coords = torch.stack([bb, bx, by, bz], 1).to(torch.int32)
    per_sample = torch.bincount(bb, minlength=batch_size)[:batch_size]
    cu_seqblocks = torch.zeros(batch_size + 1, dtype=torch.int32, device=coords.device)
    cu_seqblocks[1:] = torch.cumsum(per_sample, 0)
    return BlockSort(perm, inverse, offsets, block_ids, block_coords, cu_seqblocks)


def block_sort(x: SparseTensor, block_size: int) -> BlockSort:
    """Group tokens by ``block_size³`` block (cached on ``x``)."""
    if block_size <= 0:
        raise ValueError(f"expected a positive block size, got {block_size}")
    return x.cached(f"block_sort_{block_size}",
                    lambda: _group_sort(x.coords, x.batch_size, x.resolution, block_size, 0))


def window_partition(x: SparseTensor, window_size: int, shift: int = 0) -> BlockSort:
    """Group tokens by non-overlapping ``window_size³`` windows of coordinates shifted by ``shift``.

    Window w holds the tokens with ``(coord + shift) // window_size == w``. Returned as a :class:`BlockSort`
    whose blocks are the non-empty windows (cached on ``x``).
    """
    if window_size <= 0 or not 0 <= shift < window_size:
        raise ValueError(f"expected window_size > 0 and 0 <= shift < window_size, got {window_size}, {shift}")
    return x.cached(f"window_{window_size}_{shift}",
                    lambda: _group_sort(x.coords, x.batch_size, x.resolution, window_size, shift))


def sort_by_blocks(x: SparseTensor, block_size: int) -> SparseTensor:
    """A new SparseTensor whose rows are in :func:`block_sort` order (batch order is kept)."""
    s = block_sort(x, block_size)
    out = SparseTensor(x.feats[s.perm], x.coords[s.perm], resolution=x.resolution, batch_size=x.batch_size,
                       validate=False)
    # Already sorted: the identity sort is known without recomputation.
    n = x.num_voxels
    ident = torch.arange(n, device=x.coords.device)
    out.set_cache(f"block_sort_{block_size}", BlockSort(ident, ident, s.block_offsets, s.block_ids,
                                                        s.block_coords, s.cu_seqblocks))
    return out
