"""Random ragged token batches and dense brute-force SSA pieces for the SSA tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d3s2.ops.ssa.layout import SSALayout, build_ssa_layout
from d3s2.sparse import SparseTensor


def random_batch(sizes: list[int], resolution: int, *, seed: int = 0, device: str = "cpu",
                 clustered: bool = True, compact: tuple[int, ...] = ()) -> SparseTensor:
    """A batch of samples with ``sizes[b]`` distinct random voxels each (features: zeros [N, 1]).

    Samples are noisy spherical shells (blocks hold varying numbers of tokens); samples listed in ``compact``
    are small balls of radius ~2 voxels instead (one or a few blocks).
    """
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(sizes):
        if b in compact:
            pts = torch.randn(4 * n + 8, 3, generator=g) * 1.2 + resolution / 3
            c = pts.round().long().clamp(0, resolution - 1)
        elif clustered:
            pts = torch.randn(4 * n + 8, 3, generator=g)
            pts = pts / pts.norm(dim=1, keepdim=True) * (0.35 * resolution) + resolution / 2
            pts = pts + torch.randn(pts.shape, generator=g) * 1.5
            c = pts.round().long().clamp(0, resolution - 1)
        else:
            c = torch.randint(0, resolution, (4 * n + 8, 3), generator=g)
        c = torch.unique(c, dim=0)
        c = c[torch.randperm(c.shape[0], generator=g)[:n]]
        assert c.shape[0] == n, "resolution too small for the requested sample size"
        coords.append(c.int())
    feats = [torch.zeros(n, 1) for n in sizes]
    return SparseTensor.from_samples(coords, feats, resolution=resolution).to(device)


def make_inputs(x: SparseTensor, layout: SSALayout, hq: int, hkv: int, d: int, *, dtype=torch.float32,
                seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    n, nc = layout.num_tokens, layout.num_cmp

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return r(n, hq, d), r(n, hkv, d), r(n, hkv, d), r(nc, hkv, d), r(nc, hkv, d), torch.rand(n, 3, generator=g).to(
        device=device, dtype=dtype)


def layout_for(x: SparseTensor, m_cmp: int, m_slc: int, m_win: int, shift: int) -> SSALayout:
    return build_ssa_layout(x, m_cmp=m_cmp, m_slc=m_slc, m_win=m_win, shift=shift)


def dense_attention(q, k, v, allowed, scale):
    """q [N, Hq, D], k/v [M, Hkv, D], allowed bool [Hkv, N, M] (or [N, M]) -> [N, Hq, D] via masked SDPA."""
    hq, hkv = q.shape[1], k.shape[1]
    hs = hq // hkv
    if allowed.ndim == 2:
        allowed = allowed.expand(hkv, *allowed.shape)
    qh = q.transpose(0, 1)  # [Hq, N, D]
    kh = k.transpose(0, 1).repeat_interleave(hs, 0)  # [Hq, M, D]
    vh = v.transpose(0, 1).repeat_interleave(hs, 0)
    mask = allowed.repeat_interleave(hs, 0)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


def brute_force(x: SparseTensor, layout: SSALayout, q, k, v, k_cmp, v_cmp, gates, topk: int):
    """Dense masked SSA from coordinates alone; returns (o, o_cmp, o_slc, o_win, selected) with ``selected`` a
    bool [N, Hkv, N] mask of the keys each (query, kv head) selected."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    hs = hq // hkv
    scale = d**-0.5
    c = x.coords[layout.perm].long()  # block-order coords
    b = c[:, 0]
    cc = layout.cmp_coords.long()
    # Compressed: all compression blocks of the query's sample.
    allowed_cmp = b[:, None] == cc[None, :, 0]  # [N, NBc]
    o_cmp = dense_attention(q, k_cmp, v_cmp, allowed_cmp, scale)
    # Scores from probabilities; a compression block belongs to selection block cc // r.
    r = layout.m_slc // layout.m_cmp
    logits = torch.einsum("nhd,chd->nhc", q, k_cmp.repeat_interleave(hs, 1)) * scale
    logits = logits.masked_fill(~allowed_cmp[:, None], float("-inf"))
    p = torch.softmax(logits, -1).view(n, hkv, hs, -1).sum(2)  # [N, Hkv, NBc]
    cmp_slc_key = torch.cat([cc[:, :1], cc[:, 1:] // r], 1)  # [NBc, 4] selection block coords of each cmp
    tok_slc_key = torch.cat([c[:, :1], c[:, 1:] // layout.m_slc], 1)  # [N, 4]
    same_slc = (cmp_slc_key[:, None, :] == tok_slc_key[None, :, :]).all(-1).to(p.dtype)  # [NBc, N]
    # score of the selection block holding key token j, for every (query, kv head): [N, Hkv, N]
    score_of_key = torch.einsum("ngc,cj->ngj", p, same_slc)
    same_sample = b[:, None] == b[None, :]
    selected = torch.zeros(n, hkv, n, dtype=torch.bool)
    key_block = torch.unique(tok_slc_key, dim=0, return_inverse=True)[1]  # [N] block id per key token
    for t in range(n):
        for g in range(hkv):
            keys = same_sample[t].nonzero().squeeze(1)
            blocks = key_block[keys]
            uniq, first = torch.unique(blocks, return_inverse=True)
            # every key of a block carries the block's score
            block_score = torch.zeros(uniq.numel(), dtype=p.dtype).scatter_(0, first, score_of_key[t, g, keys])
            chosen = uniq[torch.topk(block_score, min(topk, uniq.numel())).indices]
            selected[t, g] = torch.isin(key_block, chosen) & same_sample[t]
    o_slc = dense_attention(q, k, v, selected.transpose(0, 1), scale)
    win = (c[:, 1:] + layout.shift) // layout.m_win
    same_win = same_sample & (win[:, None, :] == win[None, :, :]).all(-1)
    o_win = dense_attention(q, k, v, same_win, scale)
    gg = gates[:, :, None, None]
    o = gg[:, 0] * o_cmp + gg[:, 1] * o_slc + gg[:, 2] * o_win
    return o, o_cmp, o_slc, o_win, selected


def selected_mask(layout: SSALayout, block_idx: torch.Tensor) -> torch.Tensor:
    """bool [N, Hkv, N]: key token j is in one of the blocks that (query t, kv head g) selected."""
    sizes = (layout.slc_offsets[1:] - layout.slc_offsets[:-1]).long().cpu()
    key_block = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # [N]; -1 entries match nothing
    return (block_idx.long().cpu()[:, :, :, None] == key_block[None, None, None, :]).any(2)
