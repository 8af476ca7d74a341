"""Attention over contiguous token blocks: SSA's selection branch and (shifted) window attention.

Backends, chosen per call (``backend=`` → ``use_backend("block_attn", ...)`` → ``D3S2_BLOCK_ATTN_BACKEND`` →
auto): ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32, D ≤ 128) and ``torch`` (the
reference, any device and dtype). Semantics and shapes: :mod:`d3s2.ops.block_attn.reference`.
"""

from __future__ import annotations

import torch

from .._backend import needs_float_dtype, needs_head_dim_at_most, needs_triton, op_backends
from .reference import selection_attention_ref, window_attention_ref

BACKENDS = op_backends("block_attn")


BACKENDS.register("triton", needs_triton, needs_float_dtype(torch.float16, torch.bfloat16, torch.float32),
                  needs_head_dim_at_most(128))
BACKENDS.register("torch")


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
                        block_idx: torch.Tensor, *, scale: float | None = None, backend: str | None = None,
                        return_lse: bool = False, max_block_len: int | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Query i attends, through kv head g, to the tokens of blocks ``block_idx[i, g, :]``.

    q ``[N, Hq, D]``, k/v ``[N, Hkv, D]``, block_offsets int ``[NB + 1]``, block_idx int ``[N, Hkv, S]``
    (-1 = empty slot). Returns o ``[N, Hq, D]`` (q's dtype), and with ``return_lse`` also the natural-log LSE
    float32 ``[N, Hq]`` (not differentiable). See :func:`selection_attention_ref`. ``max_block_len``: a bound on
    the tokens of any block, if known (the triton backward otherwise reads it from the offsets: one host sync).
    """
    name = BACKENDS.resolve(backend, q, k, v)
    if name == "torch":
        return selection_attention_ref(q, k, v, block_offsets, block_idx, scale=scale, return_lse=return_lse)
    if name == "triton":
        from .triton import selection_attention_triton

        return selection_attention_triton(q, k, v, block_offsets, block_idx, scale=scale, return_lse=return_lse,
                                          max_block_len=max_block_len)
    raise AssertionError(f"unhandled block_attn backend {name}")  # every registered backend is dispatched above


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_offsets: torch.Tensor, *,
                     scale: float | None = None, backend: str | None = None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to all tokens of its own window (rows ``[off[w], off[w + 1])``).

    q ``[N, Hq, D]``, k/v ``[N, Hkv, D]`` in window order, window_offsets int ``[NW + 1]`` from 0 to N.
    Returns o ``[N, Hq, D]`` (and lse ``[N, Hq]``). See :func:`window_attention_ref`.
    """
    name = BACKENDS.resolve(backend, q, k, v)
    if name == "torch":
        return window_attention_ref(q, k, v, window_offsets, scale=scale, return_lse=return_lse)
    if name == "triton":
        from .triton import window_attention_triton

        return window_attention_triton(q, k, v, window_offsets, scale=scale, return_lse=return_lse)
    raise AssertionError(f"unhandled block_attn backend {name}")  # every registered backend is dispatched above


__all__ = ["selection_attention", "window_attention", "selection_attention_ref", "window_attention_ref",
           "BACKENDS"]
