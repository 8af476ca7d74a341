"""Spatial Sparse Attention (SSA) op: compressed, selection and window branches with sigmoid gates.

Backends, chosen per call (argument → ``use_backend("ssa", ...)`` → ``D3S2_SSA_BACKEND`` → auto):
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): compressed attention and block scoring with top-k in
:mod:`.triton_compress` (two kernels), selection and window attention from
:mod:`d3s2.ops.block_attn`, the gate combine in :mod:`.triton_combine`; ``torch``: the reference in
:mod:`.reference` (any device; the spec, memory-hungry at large N).
"""

from __future__ import annotations

import torch

from .._backend import needs_float_dtype, needs_head_dim_at_most, needs_triton, op_backends
from .layout import SSALayout, build_ssa_layout
from .reference import (
    combine_ref,
    compressed_attention_ref,
    select_blocks_ref,
    selection_attention_ref,
    ssa_ref,
    window_attention_ref,
)

BACKENDS = op_backends("ssa")
# Gate combine of the triton backend: the fused kernel (True) or the torch reference (the benchmark's A/B).
FUSED_COMBINE = True


BACKENDS.register("triton", needs_triton, needs_float_dtype(torch.float16, torch.bfloat16, torch.float32),
                  needs_head_dim_at_most(128))
BACKENDS.register("torch")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, layout: SSALayout, *,
                         scale: float | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_cmp [N, Hq, D], lse [N, Hq] float32)``; differentiable in q, k_cmp, v_cmp. See the reference."""
    name = BACKENDS.resolve(backend, q, k_cmp, v_cmp)
    if name == "triton":
        from . import triton_compress

        return triton_compress.compressed_attention(q, k_cmp, v_cmp, layout, _scale(q, scale))
    return compressed_attention_ref(q, k_cmp, v_cmp, layout, scale=scale)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SSALayout, *, topk: int,
                  scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """int32 ``[N, Hkv, topk]`` selected blocks (best first, -1 padding); never differentiable."""
    name = BACKENDS.resolve(backend, q, k_cmp)
    if name == "triton":
        from . import triton_compress

        return triton_compress.select_blocks(q, k_cmp, lse, layout, topk, _scale(q, scale))
    return select_blocks_ref(q.detach(), k_cmp.detach(), lse.detach(), layout, topk=topk, scale=scale)


def spatial_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor,
                             v_cmp: torch.Tensor, gates: torch.Tensor, layout: SSALayout, *, topk: int,
                             scale: float | None = None, backend: str | None = None,
                             return_block_idx: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The whole SSA op: ``o [N, Hq, D]`` in block order (and the selection int32 ``[N, Hkv, topk]`` if asked).

    Shapes and semantics: :func:`.reference.ssa_ref`.
    """
    if gates.shape != (q.shape[0], 3):
        raise ValueError(f"expected gates of shape [{q.shape[0]}, 3], got {tuple(gates.shape)}")
    name = BACKENDS.resolve(backend, q, k, v, k_cmp, v_cmp)
    if name == "torch":
        return ssa_ref(q, k, v, k_cmp, v_cmp, gates, layout, topk=topk, scale=scale,
                       return_block_idx=return_block_idx)
    from ..block_attn import selection_attention, window_attention
    from . import triton_combine, triton_compress

    sc = _scale(q, scale)
    o_cmp, lse = triton_compress.compressed_attention(q, k_cmp, v_cmp, layout, sc)
    block_idx = triton_compress.select_blocks(q, k_cmp, lse, layout, topk, sc)
    o_slc = selection_attention(q, k, v, layout.slc_offsets, block_idx, scale=sc,
                                max_block_len=layout.m_slc**3)  # a selection block spans m_slc³ voxels
    if layout.win_perm is None:
        o_win = window_attention(q, k, v, layout.win_offsets, scale=sc)
    else:
        p = layout.win_perm
        o_win = window_attention(q[p], k[p], v[p], layout.win_offsets, scale=sc)[layout.win_inverse]
    combine = triton_combine.gate_combine if FUSED_COMBINE else combine_ref
    o = combine(gates, o_cmp, o_slc, o_win)
    return (o, block_idx) if return_block_idx else o


__all__ = [
    "BACKENDS", "SSALayout", "build_ssa_layout", "compressed_attention", "select_blocks",
    "spatial_sparse_attention", "ssa_ref", "compressed_attention_ref", "select_blocks_ref",
    "selection_attention_ref", "window_attention_ref",
]
