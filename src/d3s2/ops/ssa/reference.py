"""Spatial Sparse Attention (SSA, Direct3D-S2 §4.1) in plain PyTorch. This file is the spec.

Dimension legend: N tokens of a ragged batch (all samples), B batch, Hq query heads, Hkv key/value heads,
Hs = Hq / Hkv query heads per kv head (GQA group), D head dim, NBc compression blocks, NBs selection blocks,
S = top-k selected blocks per (query, kv head), NW windows.

Tokens are in selection-block order and the block structure is an :class:`~d3s2.ops.ssa.layout.SSALayout`.
Query head ``h`` uses kv head ``h // Hs``. Every branch is softmax attention with scale ``D ** -0.5`` unless given.

1. **Compressed branch.** ``k_cmp, v_cmp [NBc, Hkv, D]`` hold one key/value per compression block (made by the
   module's compression function). Each query attends to all compression blocks of its own sample:
   ``o_cmp [N, Hq, D]`` and the natural-log log-sum-exp of its logits ``lse [N, Hq]`` (float32).
2. **Block scores and top-k.** The score of selection block j for query t and kv head g is the sum of the
   compressed attention probabilities ``exp(scale·q·k_cmp − lse)`` over the compression blocks inside j and
   over the Hs query heads of group g. Each (t, g) keeps its ``min(topk, #selection blocks of its sample)``
   best blocks of its own sample: ``block_idx [N, Hkv, topk]`` int32 global block ids, best first, -1 padding.
   Top-k is piecewise constant: no gradient flows through the choice of blocks, only through the attention
   over the chosen tokens (and through ``o_cmp``). The choice is made from detached inputs.
3. **Selection branch.** Each query head attends to all tokens of the blocks its kv head selected: ``o_slc``.
4. **Window branch.** Each query attends to the tokens of its ``m_win³`` window (coordinates shifted by
   ``layout.shift``): ``o_win``.
5. **Output.** ``o = g[:, 0]·o_cmp + g[:, 1]·o_slc + g[:, 2]·o_win`` with gates ``g [N, 3]`` (already passed
   through a sigmoid by the caller), broadcast over heads and D.

Precision: products run in the input dtype (accumulating in at least float32 as torch matmuls do); softmax and
log-sum-exp run in float32 (or float64 for float64 inputs), probabilities are cast back for ``p @ v``.
"""

from __future__ import annotations

import torch

from .layout import SSALayout


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [N, Hq, D] and k, v [N', Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape[2] != d or hq % hkv:
        raise ValueError(f"expected k with head dim {d} and Hq={hq} divisible by Hkv, got {tuple(k.shape)}")
    return n, hq, hkv, d


def compressed_attention_ref(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, layout: SSALayout, *,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query to all compression blocks of its sample.

    Args:
        q: ``[N, Hq, D]`` queries in block order.
        k_cmp, v_cmp: ``[NBc, Hkv, D]`` compressed keys / values in ``layout``'s compression-block order.
        layout: block structure (``cu_seqlens``, ``cu_cmp``).
        scale: logit scale, default ``D ** -0.5``.
    Returns:
        ``o_cmp [N, Hq, D]`` (dtype of q) and ``lse [N, Hq]`` float32 (float64 for float64 q), natural log.
    """
    n, hq, hkv, d = _check_qkv(q, k_cmp, v_cmp)
    scale = d**-0.5 if scale is None else scale
    hs = hq // hkv
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=_acc_dtype(q.dtype), device=q.device)
    cu, cc = layout.cu_seqlens.tolist(), layout.cu_cmp.tolist()
    for b in range(len(cu) - 1):
        t0, t1, c0, c1 = cu[b], cu[b + 1], cc[b], cc[b + 1]
        if t1 == t0:
            continue
        qb = q[t0:t1]  # [n_b, Hq, D]
        kb = k_cmp[c0:c1].repeat_interleave(hs, dim=1)  # [c_b, Hq, D] GQA: query head h reads kv head h // Hs
        vb = v_cmp[c0:c1].repeat_interleave(hs, dim=1)
        s = torch.einsum("nhd,chd->hnc", qb, kb).to(lse.dtype) * scale  # [Hq, n_b, c_b]
        lse_b = torch.logsumexp(s, dim=-1)  # [Hq, n_b]
        p = torch.exp(s - lse_b[..., None])
        o[t0:t1] = torch.einsum("hnc,chd->nhd", p.to(q.dtype), vb)
        lse[t0:t1] = lse_b.transpose(0, 1)
    return o, lse


@torch.no_grad()
def block_scores_ref(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SSALayout, *,
                     scale: float | None = None) -> list[torch.Tensor]:
    """Selection-block scores of every query, one tensor per sample.

    Returns:
        list over samples b of float32 ``[Hkv, n_b, nbs_b]``: for query t of sample b, kv head g and the sample's
        j-th selection block, ``Σ_{h in group g} Σ_{c in block j} exp(scale·q[t,h]·k_cmp[c,g] − lse[t,h])``.
    """
    n, hq, hkv, d = _check_qkv(q, k_cmp, k_cmp)
    scale = d**-0.5 if scale is None else scale
    hs = hq // hkv
    cu, cc, cs = layout.cu_seqlens.tolist(), layout.cu_cmp.tolist(), layout.cu_slc.tolist()
    out = []
    for b in range(len(cu) - 1):
        t0, t1, c0, c1, s0, s1 = cu[b], cu[b + 1], cc[b], cc[b + 1], cs[b], cs[b + 1]
        kb = k_cmp[c0:c1].repeat_interleave(hs, dim=1)  # [c_b, Hq, D]
        s = torch.einsum("nhd,chd->hnc", q[t0:t1], kb).to(lse.dtype) * scale  # [Hq, n_b, c_b]
        p = torch.exp(s - lse[t0:t1].transpose(0, 1)[..., None])
        p = p.view(hkv, hs, t1 - t0, c1 - c0).sum(1)  # [Hkv, n_b, c_b] summed over the GQA group
        slc_of_cmp = (layout.cmp_slc[c0:c1] - s0).long()  # local selection block of each compression block
        scores = p.new_zeros(hkv, t1 - t0, s1 - s0).index_add_(2, slc_of_cmp, p)  # [Hkv, n_b, nbs_b]
        out.append(scores.float())
    return out


@torch.no_grad()
def select_blocks_ref(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SSALayout, *, topk: int,
                      scale: float | None = None) -> torch.Tensor:
    """Top-k selection blocks per (query, kv head) from :func:`block_scores_ref`.

    Returns:
        int32 ``[N, Hkv, topk]``: global selection-block ids of the query's own sample, highest score first,
        ``min(topk, #blocks of the sample)`` valid entries then -1.
    """
    if topk < 1:
        raise ValueError(f"expected topk >= 1, got {topk}")
    n, hkv = q.shape[0], k_cmp.shape[1]
    idx = torch.full((n, hkv, topk), -1, dtype=torch.int32, device=q.device)
    cu, cs = layout.cu_seqlens.tolist(), layout.cu_slc.tolist()
    for b, scores in enumerate(block_scores_ref(q, k_cmp, lse, layout, scale=scale)):
        kk = min(topk, scores.shape[-1])
        if kk == 0:
            continue
        top = torch.topk(scores, kk, dim=-1).indices  # [Hkv, n_b, kk]
        idx[cu[b]: cu[b + 1], :, :kk] = (top + cs[b]).transpose(0, 1).to(torch.int32)
    return idx


def gathered_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
                           block_idx: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention of each query to the tokens of a per-(query, kv head) list of token blocks.

    Args:
        q: ``[N, Hq, D]``; k, v: ``[N, Hkv, D]``, tokens grouped so block j is rows
            ``block_offsets[j] : block_offsets[j + 1]``.
        block_offsets: int32 ``[NB + 1]``.
        block_idx: int ``[N, Hkv, S]`` block ids per (query, kv head), -1 = no block. Every query needs at least
            one non-empty block.
    Returns:
        ``[N, Hq, D]`` in q's dtype.
    """
    n, hq, hkv, d = _check_qkv(q, k, v)
    scale = d**-0.5 if scale is None else scale
    hs = hq // hkv
    sizes = block_offsets[1:] - block_offsets[:-1]
    max_len = int(sizes.max()) if sizes.numel() else 0
    idx = block_idx.long()
    valid_block = idx >= 0
    safe = idx.clamp(min=0)
    start = block_offsets.long()[safe]  # [N, Hkv, S]
    length = torch.where(valid_block, sizes.long()[safe], 0)
    pos = torch.arange(max_len, device=q.device)
    tok = (start[..., None] + pos).flatten(2)  # [N, Hkv, S·L] token ids (L = max block length)
    valid = (pos < length[..., None]).flatten(2)  # [N, Hkv, S·L]
    tok = torch.where(valid, tok, 0)
    head = torch.arange(hkv, device=q.device)[None, :, None]
    kg, vg = k[tok, head], v[tok, head]  # [N, Hkv, S·L, D] gathered keys / values
    qg = q.view(n, hkv, hs, d)
    s = torch.einsum("nghd,ngkd->nghk", qg, kg).to(_acc_dtype(q.dtype)) * scale  # [N, Hkv, Hs, S·L]
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("nghk,ngkd->nghd", p.to(q.dtype), vg)
    return o.reshape(n, hq, d)


def selection_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SSALayout,
                            block_idx: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Selection branch: each query attends to the tokens of its kv head's selected blocks. ``[N, Hq, D]``."""
    return gathered_attention_ref(q, k, v, layout.slc_offsets, block_idx, scale=scale)


def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SSALayout, *,
                         scale: float | None = None) -> torch.Tensor:
    """Window branch: each query attends to the tokens of its own window. ``[N, Hq, D]`` in block order.

    A window is a block that every query of it selects alone, so this is :func:`gathered_attention_ref` in
    window order with ``block_idx[t, g, 0] = window of t``.
    """
    if layout.win_perm is not None:
        q, k, v = q[layout.win_perm], k[layout.win_perm], v[layout.win_perm]  # block order -> window order
    n, hkv = q.shape[0], k.shape[1]
    sizes = (layout.win_offsets[1:] - layout.win_offsets[:-1]).long()
    window = torch.repeat_interleave(torch.arange(sizes.numel(), device=q.device), sizes)  # [N] window of token
    o = gathered_attention_ref(q, k, v, layout.win_offsets, window[:, None, None].expand(n, hkv, 1), scale=scale)
    return o if layout.win_inverse is None else o[layout.win_inverse]


def combine_ref(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """``g0·o_cmp + g1·o_slc + g2·o_win`` with ``gates [N, 3]`` broadcast over heads and D."""
    g = gates.to(o_cmp.dtype)[:, :, None, None]  # [N, 3, 1, 1]
    return g[:, 0] * o_cmp + g[:, 1] * o_slc + g[:, 2] * o_win


def ssa_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
            gates: torch.Tensor, layout: SSALayout, *, topk: int, scale: float | None = None,
            return_block_idx: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The whole SSA op (see the module docstring).

    Args:
        q: ``[N, Hq, D]``; k, v: ``[N, Hkv, D]``; all in ``layout``'s block order.
        k_cmp, v_cmp: ``[NBc, Hkv, D]`` one key / value per compression block.
        gates: ``[N, 3]`` branch weights (after the sigmoid), order (compressed, selection, window).
        layout: the block structure.
        topk: selected blocks per (query, kv head).
        scale: logit scale, default ``D ** -0.5``.
        return_block_idx: also return the selection (int32 ``[N, Hkv, topk]``).
    Returns:
        ``o [N, Hq, D]`` in q's dtype (and ``block_idx`` if asked).
    """
    if gates.shape != (q.shape[0], 3):
        raise ValueError(f"expected gates of shape [{q.shape[0]}, 3], got {tuple(gates.shape)}")
    o_cmp, lse = compressed_attention_ref(q, k_cmp, v_cmp, layout, scale=scale)
    block_idx = select_blocks_ref(q.detach(), k_cmp.detach(), lse.detach(), layout, topk=topk, scale=scale)
    o_slc = selection_attention_ref(q, k, v, layout, block_idx, scale=scale)
    o_win = window_attention_ref(q, k, v, layout, scale=scale)
    o = combine_ref(gates, o_cmp, o_slc, o_win)
    return (o, block_idx) if return_block_idx else o
