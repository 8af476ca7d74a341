"""Transformer pieces shared by the dense and sparse DiTs: norms, attention, MLP and the adaLN block.

Parameter names follow the published checkpoints (``to_qkv``, ``q_rms_norm.gamma``, ``cross_attn.to_kv``,
``mlp.mlp.0``, ``adaLN_modulation.1``, ...), so loading them is a key-for-key copy.

Dimension legend: B batch, T dense tokens per sample, N sparse tokens (all samples), L condition tokens,
H heads, Hkv key/value heads, D head dim, C channels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.dit_norm import add_norm, no_autograd, qk_rms_norm_
from ...ops.linear_gelu import linear_gelu
from ...sparse import SparseTensor
from .condition import ConditionTokens

Tokens = torch.Tensor | SparseTensor


def layer_norm32(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm with float32 statistics and arithmetic, returned in ``x``'s dtype."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and all(
            p is None or p.dtype == x.dtype for p in (weight, bias)):
        # CUDA's half-precision kernel already computes in float32 and rounds once: skip the float32 copies.
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), normalized_shape, w, b, eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (stable under fp16/bf16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm32(x, self.normalized_shape, self.weight, self.bias, self.eps)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm on ``[..., H, D]``: ``normalize(x)·gamma·sqrt(D)``; parameter ``gamma [H, D]``."""

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 arithmetic without a float32 copy of x: the norm reads x once, one product writes float32.
        acc = torch.promote_types(x.dtype, torch.float32)
        inv = self.scale / torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).clamp_min(1e-12)
        return (x * inv).mul_(self.gamma.to(acc)).to(x.dtype)


class FeedForward(nn.Module):
    """``Linear(C→r·C) → GELU(tanh) → Linear(r·C→C)``, keys ``mlp.0`` / ``mlp.2``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        if no_autograd(x, fc1.weight, fc1.bias):  # inference: the GELU may run in the GEMM epilogue
            return fc2(linear_gelu(x, fc1.weight, fc1.bias))
        return self.mlp(x)


def _split_heads(channels: int, num_heads: int) -> int:
    if channels % num_heads:
        raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
    return channels // num_heads


@dataclass(frozen=True)
class RaggedPadPlan:
    """Where the rows of a ragged batch go when padded to ``[B, Lmax]`` (see :func:`ragged_pad_plan`).

    Attributes:
        rows: int64 ``[2, N]`` (sample, position) of each row.
        valid: bool ``[B, Lmax]`` key mask, True on real rows.
        max_len: Lmax.
        uniform: every sample has Lmax rows, so padding is a reshape.
    """

    rows: torch.Tensor
    valid: torch.Tensor
    max_len: int
    uniform: bool


def ragged_pad_plan(cu_seqlens: torch.Tensor) -> RaggedPadPlan:
    """The :class:`RaggedPadPlan` of ragged rows with sample offsets ``cu_seqlens [B+1]`` (one host sync)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    b = counts.numel()
    lmin, lmax = torch.stack([counts.min(), counts.max()]).tolist() if b else (0, 0)
    dev = cu_seqlens.device
    sample = torch.repeat_interleave(torch.arange(b, device=dev), counts)  # [N]
    pos = torch.arange(sample.numel(), device=dev) - cu_seqlens.long()[sample]  # [N]
    valid = torch.arange(lmax, device=dev)[None] < counts[:, None]
    return RaggedPadPlan(torch.stack([sample, pos]), valid, int(lmax), lmin == lmax)


def sparse_pad_plan(x: SparseTensor) -> RaggedPadPlan:
    """:func:`ragged_pad_plan` of x's samples, cached on x's structure (built once per token layout)."""
    return x.cached("ragged_pad_plan", lambda: ragged_pad_plan(x.cu_seqlens))


def pad_ragged(x: torch.Tensor, cu_seqlens: torch.Tensor, plan: RaggedPadPlan | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ragged rows ``x [N, ...]`` (sample b = rows ``cu[b]:cu[b+1]``) to ``[B, Lmax, ...]``.

    Returns ``(padded, rows, valid)``: ``rows = (sample, position)`` int64 ``[2, N]`` to gather back with
    ``padded[rows[0], rows[1]]``, and the bool key mask ``valid [B, Lmax]``. ``plan`` (from
    :func:`ragged_pad_plan` of the same ``cu_seqlens``) skips rebuilding the indices.
    """
    plan = ragged_pad_plan(cu_seqlens) if plan is None else plan
    b = plan.valid.shape[0]
    if plan.uniform:  # equal lengths (e.g. the two halves of a CFG batch): no scatter needed
        return x.reshape(b, plan.max_len, *x.shape[1:]), plan.rows, plan.valid
    padded = x.new_zeros(b, plan.max_len, *x.shape[1:])
    padded[plan.rows[0], plan.rows[1]] = x
    return padded, plan.rows, plan.valid


def _unpad(y: torch.Tensor, plan: RaggedPadPlan) -> torch.Tensor:
    """Inverse of :func:`pad_ragged`: ``[B, Lmax, ...]`` → ``[N, ...]``."""
    if plan.uniform:
        return y.reshape(-1, *y.shape[2:])
    return y[plan.rows[0], plan.rows[1]]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention on ``q [B, Tq, H, D]``, ``k, v [B, Tk, Hkv, D]`` (GQA when Hkv < H) → ``[B, Tq, H, D]``.

    ``key_mask`` bool ``[B, Tk]`` (True = attend). A sample whose keys are all masked attends to its first
    key, so padding rows stay finite; those rows are discarded by the caller.
    """
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        if h % hkv:
            raise ValueError(f"query heads {h} are not a multiple of key/value heads {hkv}")
        # Query head i uses key/value head i // (H / Hkv), the usual GQA grouping.
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    mask = None
    if key_mask is not None:
        key_mask = key_mask.clone()
        key_mask[:, 0] |= ~key_mask.any(1)
        mask = key_mask[:, None, None, :]  # [B, 1, 1, Tk]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    """Dense multi-head self-attention with optional QK RMS norm; ``[B, T, C] → [B, T, C]``."""

    def __init__(self, channels: int, num_heads: int, *, qk_rms_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _split_heads(channels, num_heads)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.to_qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # rows [q | k | v]
        if self.qk_rms_norm and no_autograd(qkv, self.q_rms_norm.gamma, self.k_rms_norm.gamma):
            # inference: q and k normalised in place in one launch, so the split stays three views
            q, k, v = qk_rms_norm_(qkv, self.q_rms_norm.gamma, self.k_rms_norm.gamma).unbind(2)
            return self.to_out(attention(q, k, v).reshape(b, t, c))
        q, k, v = qkv.unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(attention(q, k, v).reshape(b, t, c))


class SparseFullAttention(nn.Module):
    """Full (per-sample) GQA self-attention on a SparseTensor, with the SSA projection names.

    ``proj_q`` C→H·D, ``proj_k``/``proj_v`` C→Hkv·D, ``proj_o``, all without bias (as the published SSA).
    Cost is quadratic in the tokens of a sample: meant for small models, tests, and as a reference.
    """

    def __init__(self, channels: int, num_heads: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = _split_heads(channels, num_heads)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.proj_q = nn.Linear(channels, channels, bias=False)
        self.proj_k = nn.Linear(channels, self.num_kv_heads * self.head_dim, bias=False)
        self.proj_v = nn.Linear(channels, self.num_kv_heads * self.head_dim, bias=False)
        self.proj_o = nn.Linear(channels, channels, bias=False)

    def forward(self, x: SparseTensor) -> SparseTensor:
        f = x.feats
        n = f.shape[0]
        q = self.proj_q(f).view(n, self.num_heads, self.head_dim)
        k = self.proj_k(f).view(n, self.num_kv_heads, self.head_dim)
        v = self.proj_v(f).view(n, self.num_kv_heads, self.head_dim)
        plan = sparse_pad_plan(x)
        qkv, _, valid = pad_ragged(torch.cat([q, k, v], 1), x.cu_seqlens, plan)  # [B, Lmax, H + 2Hkv, D]
        qp, kp, vp = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        out = _unpad(attention(qp, kp, vp, valid), plan)  # [N, H, D]
        return x.replace(self.proj_o(out.reshape(n, -1)))


class CrossAttention(nn.Module):
    """Attention from tokens to condition tokens: ``to_q`` C→C, ``to_kv`` Cc→2C (rows ``[k | v]``), ``to_out``."""

    def __init__(self, channels: int, cond_channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _split_heads(channels, num_heads)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(cond_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def project_kv(self, cond: ConditionTokens, dtype: torch.dtype) -> torch.Tensor:
        """Keys and values of the condition tokens ``[B, L, 2, H, D]`` (``[:, :, 0]`` keys), in ``dtype``."""
        ctx = cond.tokens.to(dtype)
        b, l, _ = ctx.shape
        return self.to_kv(ctx).view(b, l, 2, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cond: ConditionTokens, cu_seqlens: torch.Tensor | None = None, *,
                pad_plan: RaggedPadPlan | None = None, kv: torch.Tensor | None = None,
                constant: tuple[bool, ...] | None = None) -> torch.Tensor:
        """``x [B, T, C]`` dense, or ragged ``[N, C]`` with ``cu_seqlens [B+1]`` (and optionally its cached
        ``pad_plan``, see :func:`sparse_pad_plan`); returns the same shape. ``kv``: :meth:`project_kv` of
        ``cond`` computed beforehand (a constant condition over sampling steps). ``constant`` (dense ``x``):
        per sample, whether all its condition tokens are equal (see :meth:`_constant_aware`)."""
        kv = self.project_kv(cond, x.dtype) if kv is None else kv
        b = kv.shape[0]
        k, v = kv.unbind(2)
        if cu_seqlens is None and constant is not None and any(constant):
            return self._constant_aware(x, k, v, cond.mask, constant)
        q = self.to_q(x).view(*x.shape[:-1], self.num_heads, self.head_dim)
        if cu_seqlens is None:
            return self.to_out(attention(q, k, v, cond.mask).flatten(-2))
        if cu_seqlens.numel() - 1 != b:
            raise ValueError(f"expected {cu_seqlens.numel() - 1} condition samples, got {b}")
        if b == 1:  # no padding needed
            return self.to_out(attention(q[None], k, v, cond.mask)[0].flatten(-2))
        plan = ragged_pad_plan(cu_seqlens) if pad_plan is None else pad_plan
        qp, _, _ = pad_ragged(q, cu_seqlens, plan)
        return self.to_out(_unpad(attention(qp, k, v, cond.mask), plan).flatten(-2))

    def _constant_aware(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        constant: tuple[bool, ...]) -> torch.Tensor:
        """Dense ``x [B, T, C]`` where the samples flagged in ``constant`` have all their key/value rows equal
        (the zero tokens of the CFG unconditional pass): softmax weights then average equal values, so every
        query of such a sample gets the value row, and only the other samples run attention."""
        if len(constant) != x.shape[0]:
            raise ValueError(f"expected {x.shape[0]} constant flags, got {len(constant)}")
        parts, start = [], 0
        for flag, run in itertools.groupby(constant):  # runs of equal flags: one call per run
            end = start + len(list(run))
            if flag:
                row = self.to_out(v[start:end, 0].flatten(-2))  # [n, C]: one row per sample, not per query
                parts.append(row[:, None].expand(-1, x.shape[1], -1))
            else:
                q = self.to_q(x[start:end]).view(end - start, x.shape[1], self.num_heads, self.head_dim)
                m = None if mask is None else mask[start:end]
                parts.append(self.to_out(attention(q, k[start:end], v[start:end], m).flatten(-2)))
            start = end
        return torch.cat(parts, 0)


class ModulatedCrossBlock(nn.Module):
    """The published DiT block, for dense ``[B, T, C]`` tokens or a SparseTensor:

    ``x += gate1 · SelfAttn(LN1(x)·(1+scale1) + shift1)``; ``x += CrossAttn(LN2(x), cond)`` (LN2 affine);
    ``x += gate2 · MLP(LN3(x)·(1+scale2) + shift2)``, with ``(shift1, scale1, gate1, shift2, scale2, gate2)``
    from ``adaLN_modulation = SiLU → Linear(C→6C)`` of the timestep embedding, per sample.

    ``self_attn`` maps ``[B, T, C]`` (dense) or a SparseTensor (sparse) to the same kind.
    """

    def __init__(self, channels: int, cond_channels: int, num_heads: int, self_attn: nn.Module, *,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = self_attn
        self.cross_attn = CrossAttention(channels, cond_channels, num_heads)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: Tokens, t_emb: torch.Tensor, cond: ConditionTokens, kv: torch.Tensor | None = None,
                constant: tuple[bool, ...] | None = None) -> Tokens:
        """``x`` dense ``[B, T, C]`` or SparseTensor ``[N, C]``; ``t_emb [B, C]``; ``kv``: the cross-attention's
        :meth:`CrossAttention.project_kv` of ``cond``, when computed beforehand; ``constant``: per sample, whether
        its condition tokens are all equal (:class:`~d3s2.models.dit.condition.PreparedCondition`). Returns the
        same kind as x."""
        mod = self.adaLN_modulation(t_emb)  # [B, 6C]
        # Inference (nothing records a graph) takes the fused norms of d3s2.ops.dit_norm; training the torch path.
        fused = no_autograd(x.feats if isinstance(x, SparseTensor) else x, mod)
        if not isinstance(x, SparseTensor):
            def cross(y: torch.Tensor) -> torch.Tensor:
                return self.cross_attn(y, cond, kv=kv, constant=constant)
            if fused:
                b, t, c = x.shape
                h = self._forward_fused(x.reshape(b * t, c), mod.to(x.dtype), t, x.shape, self.self_attn, cross)
                return h.view(x.shape)
            return self._forward(x, mod.to(x.dtype)[:, None, :], self.self_attn, cross)
        n, c = x.feats.shape
        plan = sparse_pad_plan(x)
        if plan.uniform:  # equal-length samples (one sample, a CFG pair): a [B, L, C] view, broadcast modulation
            def self_attn(y: torch.Tensor) -> torch.Tensor:
                return self.self_attn(x.replace(y.reshape(n, c))).feats.reshape(y.shape)

            def cross_uniform(y: torch.Tensor) -> torch.Tensor:
                return self.cross_attn(y, cond, kv=kv, constant=constant)
            shape = (x.batch_size, plan.max_len, c)
            if fused:
                return x.replace(self._forward_fused(x.feats, mod.to(x.dtype), plan.max_len, shape, self_attn,
                                                     cross_uniform))
            h = self._forward(x.feats.reshape(shape), mod.to(x.dtype)[:, None, :], self_attn, cross_uniform)
            return x.replace(h.reshape(n, c))

        def self_attn_ragged(y: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x.replace(y)).feats

        def cross_ragged(y: torch.Tensor) -> torch.Tensor:
            return self.cross_attn(y, cond, x.cu_seqlens, pad_plan=plan, kv=kv)
        if fused:  # a modulation row per token, gathered inside the kernels
            return x.replace(self._forward_fused(x.feats, mod.to(x.dtype), x.batch_index, (n, c), self_attn_ragged,
                                                 cross_ragged))
        h = self._forward(x.feats, mod.to(x.dtype).index_select(0, x.batch_index),  # a modulation row per token
                          self_attn_ragged, cross_ragged)
        return x.replace(h)

    def _forward(self, h: torch.Tensor, mod: torch.Tensor, self_attn: Callable[[torch.Tensor], torch.Tensor],
                 cross_attn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block on features ``h [..., C]`` with modulation ``mod [..., 6C]`` broadcastable to ``h``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = torch.addcmul(h, gate1, self_attn(torch.addcmul(shift1, self.norm1(h), 1 + scale1)))
        h = h + cross_attn(self.norm2(h))
        return torch.addcmul(h, gate2, self.mlp(torch.addcmul(shift2, self.norm3(h), 1 + scale2)))

    def _forward_fused(self, h: torch.Tensor, mod: torch.Tensor, sample: int | torch.Tensor,
                       shape: tuple[int, ...], self_attn: Callable[[torch.Tensor], torch.Tensor],
                       cross_attn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """:meth:`_forward` without autograd, with each residual update fused into the norm after it.

        ``h [M, C]`` token rows, ``mod [B, 6C]``, ``sample``: rows per sample (int) or the sample index ``[M]``
        of each row; ``self_attn`` / ``cross_attn`` take and return their input reshaped to ``shape``.
        Returns ``[M, C]``.
        """
        c = h.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # [B, C] views
        _, y = add_norm(h, shift=shift1, scale=scale1, eps=self.norm1.eps, sample=sample)
        h, y = add_norm(h, self_attn(y.view(shape)).reshape(-1, c), gate1, weight=self.norm2.weight,
                        bias=self.norm2.bias, eps=self.norm2.eps, sample=sample)
        h, y = add_norm(h, cross_attn(y.view(shape)).reshape(-1, c), shift=shift2, scale=scale2,
                        eps=self.norm3.eps, sample=sample)
        h, _ = add_norm(h, self.mlp(y.view(shape)).reshape(-1, c), gate2, normalize=False, sample=sample)
        return h
