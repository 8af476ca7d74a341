"""Block-sparse attention over contiguous token blocks, in plain PyTorch. This file is the spec.

Dimension legend: N tokens, Hq query heads, Hkv key/value heads (GQA: query head h uses kv head
``h // (Hq // Hkv)``), D head dim, NB blocks, S selected blocks per query and kv head, L tokens of a block.

Tokens are sorted so that every block is a contiguous run of rows: block j is rows
``[block_offsets[j], block_offsets[j + 1])``. Two ops:

- :func:`selection_attention_ref`: query i, for kv head g, attends to the union of the tokens of the blocks
  ``block_idx[i, g, :]`` (global block ids, -1 = empty slot, no duplicates, any order). This is SSA's
  selection branch (Direct3D-S2 Algorithm 1).
- :func:`window_attention_ref`: query i attends to all tokens of its own window (block). It is selection
  attention in which every query selects exactly the block that holds it.

Numerics (both ops): scores ``q·k`` and ``p·v`` in the inputs' dtype, the softmax in float32 (float64 inputs:
float64). A query with no key (only empty slots, or only empty blocks) outputs 0 and has LSE ``-inf``.
"""

from __future__ import annotations

import torch

# Rows per chunk bound the gathered [rows, Hkv, S·Lmax, D] key tensor to about this many elements.
_GATHER_ELEMS = 1 << 24


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
           block_idx: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [N, Hq, D], k and v [N, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected k and v [N, Hkv, D] matching q [N, Hq, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"expected Hq divisible by Hkv, got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        raise ValueError(f"expected q, k, v of one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_offsets.dim() != 1 or block_offsets.numel() < 1 or block_offsets.is_floating_point():
        raise ValueError(f"expected integer block_offsets [NB + 1], got {block_offsets.dtype} "
                         f"{tuple(block_offsets.shape)}")
    if block_idx is not None:
        n, hkv = k.shape[:2]
        if block_idx.dim() != 3 or block_idx.shape[:2] != (n, hkv) or block_idx.is_floating_point():
            raise ValueError(f"expected integer block_idx [N, Hkv, S] = [{n}, {hkv}, S], got {block_idx.dtype} "
                             f"{tuple(block_idx.shape)}")


def selection_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
                            block_idx: torch.Tensor, *, scale: float | None = None,
                            return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to the tokens of its selected blocks.

    Args:
        q: ``[N, Hq, D]`` queries, tokens sorted by block.
        k, v: ``[N, Hkv, D]`` keys and values, same order; ``Hq % Hkv == 0``.
        block_offsets: int ``[NB + 1]``; block j is rows ``[block_offsets[j], block_offsets[j + 1])``.
        block_idx: int ``[N, Hkv, S]``; the blocks query i attends to through kv head g (-1 = empty slot).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scaled scores.

    Returns:
        o ``[N, Hq, D]`` in q's dtype; with ``return_lse``, also lse float32 ``[N, Hq]`` (float64 inputs:
        float64), ``-inf`` for a query without keys.
    """
    _check(q, k, v, block_offsets, block_idx)
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    s_max = block_idx.shape[2]
    scale = d**-0.5 if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    offsets = block_offsets.long()
    idx = block_idx.long()
    starts = offsets[:-1]
    lengths = offsets[1:] - offsets[:-1]
    l_max = int(lengths.max()) if lengths.numel() else 0
    o = q.new_zeros(n, hq, d)
    lse = torch.full((n, hq), float("-inf"), dtype=acc_dtype, device=q.device)
    if n == 0 or s_max == 0 or l_max == 0:
        return (o, lse) if return_lse else o
    rows = max(1, _GATHER_ELEMS // max(1, hkv * s_max * l_max * d))
    lane = torch.arange(l_max, device=q.device)
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    for r0 in range(0, n, rows):
        sl = slice(r0, min(n, r0 + rows))
        bi = idx[sl]  # [R, Hkv, S]
        valid_slot = bi >= 0
        b = bi.clamp_min(0)
        tok = starts[b][..., None] + lane  # [R, Hkv, S, Lmax] candidate key rows
        valid = valid_slot[..., None] & (lane < lengths[b][..., None])
        tok = torch.where(valid, tok, 0).flatten(2)  # [R, Hkv, S·Lmax]
        valid = valid.flatten(2)
        kg = k[tok, heads]  # [R, Hkv, S·Lmax, D]
        vg = v[tok, heads]
        qg = q[sl].view(-1, hkv, g, d)  # [R, Hkv, G, D]
        scores = torch.einsum("rkgd,rkld->rkgl", qg, kg).to(acc_dtype) * scale  # [R, Hkv, G, S·Lmax]
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows without keys: keep exp() at 0
        p = torch.exp(scores - m)
        l_sum = p.sum(-1, keepdim=True)
        p = p / l_sum.clamp_min(torch.finfo(acc_dtype).tiny)
        og = torch.einsum("rkgl,rkld->rkgd", p.to(q.dtype), vg)  # [R, Hkv, G, D]
        o[sl] = og.reshape(-1, hq, d)
        lse[sl] = (m + torch.log(l_sum)).reshape(-1, hq)
    return (o, lse) if return_lse else o


def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_offsets: torch.Tensor, *,
                         scale: float | None = None,
                         return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to all tokens of its own window.

    Args:
        q: ``[N, Hq, D]``; k, v: ``[N, Hkv, D]``, tokens in window order (``window_partition``'s perm applied).
        window_offsets: int ``[NW + 1]``; window w is rows ``[window_offsets[w], window_offsets[w + 1])``,
            ``window_offsets[-1] == N``.
        scale, return_lse: as :func:`selection_attention_ref`.

    Returns:
        o ``[N, Hq, D]`` (and lse ``[N, Hq]``), equal to :func:`selection_attention_ref` with
        ``block_idx[i, g, 0] = window of i``.
    """
    _check(q, k, v, window_offsets, None)
    n, hkv = q.shape[0], k.shape[1]
    if int(window_offsets[-1]) != n or int(window_offsets[0]) != 0:
        raise ValueError(f"expected window_offsets from 0 to N={n}, got {int(window_offsets[0])} to "
                         f"{int(window_offsets[-1])}")
    window_of = torch.searchsorted(window_offsets.long(), torch.arange(n, device=q.device), right=True) - 1
    block_idx = window_of.to(torch.int32)[:, None, None].expand(n, hkv, 1)  # [N, Hkv, 1]
    return selection_attention_ref(q, k, v, window_offsets, block_idx, scale=scale, return_lse=return_lse)
