"""Ragged block layouts and a brute-force dense masked attention shared by the block_attn tests."""

from __future__ import annotations

import torch


def ragged_offsets(sizes: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [len(sizes) + 1] offsets of consecutive blocks of the given sizes."""
    off = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0).to(torch.int32)
    return off.to(device)


def random_selection(n: int, hkv: int, s: int, num_blocks: int, *, empty_frac: float = 0.2,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [n, hkv, s] distinct random block ids per (query, kv head); a fraction of slots is -1."""
    keys = torch.rand(n, hkv, max(num_blocks, 1), generator=generator)
    idx = keys.argsort(-1)[..., :s].to(torch.int32)  # distinct ids
    if s > num_blocks:
        idx = torch.cat([idx[..., :num_blocks], torch.full((n, hkv, s - num_blocks), -1, dtype=torch.int32)], -1)
    drop = torch.rand(n, hkv, s, generator=generator) < empty_frac
    idx = torch.where(drop, -1, idx)
    shuffle = torch.rand(n, hkv, s, generator=generator).argsort(-1)  # any slot order
    return torch.gather(idx, 2, shuffle)


def dense_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
                           block_idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full [Hq, N, N] attention with a boolean mask built from the block selection (queries without keys → 0)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    block_of_key = torch.searchsorted(block_offsets.long(), torch.arange(n), right=True) - 1  # [N]
    allowed = torch.zeros(n, hkv, n, dtype=torch.bool)
    for i in range(n):
        for h in range(hkv):
            for b in block_idx[i, h].tolist():
                if b >= 0:
                    allowed[i, h] |= block_of_key == b
    mask = allowed.repeat_interleave(g, dim=1).permute(1, 0, 2)  # [Hq, N, N]
    kh = k.repeat_interleave(g, dim=1).permute(1, 0, 2)  # [Hq, N, D]
    vh = v.repeat_interleave(g, dim=1).permute(1, 0, 2)
    scores = torch.einsum("hid,hjd->hij", q.permute(1, 0, 2), kh) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # all-masked rows give NaN → 0
    return torch.einsum("hij,hjd->ihd", p, vh)
