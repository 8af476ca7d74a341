"""Triton kernels of the fused DiT-block normalisations (forward only; inference).

Same contracts as :mod:`d3s2.ops.dit_norm.reference`, computed in float32 with one rounding per output:

* ``_add_norm_kernel``: r = x + gate·u, then LayerNorm(r) (+ affine) (+ adaLN modulation), one pass over the
  rows. The torch path takes up to five passes (addcmul, layer_norm, 1 + scale, addcmul) over ``[M, C]``
  tensors, with broadcast modulation rows that defeat torch's vectorised elementwise kernels; this one reads
  x and u once and writes r and y once. The LayerNorm reads r as stored (rounded), like the torch path.
* ``_qk_rms_norm_kernel``: the per-head RMS norm of q and k in one launch, in place in the fused qkv output,
  so the q / k / v split stays a view and no normalised copies are allocated.

Both are CUDA-graph capturable (no host syncs) and launch one program per ``BLOCK_M`` rows.

Dimension legend: M token rows, C channels, B samples, H heads, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: rows × channels tiles of about this size keep registers without spilling at C = 1024.
TILE_ELEMS = {"add_norm": 4096, "qk_rms_norm": 2048}


@triton.jit
def _add_norm_kernel(X, U, GATE, W, BIAS, SHIFT, SCALE, SAMPLE, R, Y, M, C, rows_per_sample, eps,
                     stride_x, stride_u, stride_r, stride_y, stride_gate, stride_shift, stride_scale,
                     HAS_UPDATE: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr,
                     HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, SAMPLE_FROM_INDEX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if SAMPLE_FROM_INDEX:
        s = tl.load(SAMPLE + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        s = rows64 // rows_per_sample
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        u = tl.load(U + rows64[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = x + g * u
        else:
            x = x + u
        r = x.to(R.dtype.element_ty)
        tl.store(R + rows64[:, None] * stride_r + cols[None, :], r, mask=mask)
        x = r.to(tl.float32)  # the norm sees the residual as stored
    if NORMALIZE:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_AFFINE:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y * w[None, :] + b[None, :]
        if HAS_MOD:
            sc = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + s[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = y * (1.0 + sc) + sh
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def add_norm_triton(x: torch.Tensor, update: torch.Tensor | None, gate: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor | None,
                    scale: torch.Tensor | None, eps: float, normalize: bool, rows_per_sample: int,
                    sample_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher of ``_add_norm_kernel``; arguments validated by :func:`d3s2.ops.dit_norm.add_norm`.

    Rows of x / update / gate / shift / scale may be strided; their channels must be contiguous.
    """
    m, c = x.shape
    r = torch.empty_like(x, memory_format=torch.contiguous_format) if update is not None else x
    y = torch.empty((m, c), dtype=x.dtype, device=x.device) if normalize else None
    if m == 0:
        return r, y
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(TILE_ELEMS["add_norm"] // block_c, triton.next_power_of_2(m)))
    num_warps = 8 if block_m * block_c >= 4096 else 4
    dummy = x  # stands in for absent tensors: the kernel never reads it (constexpr flags)
    has_mod = shift is not None
    u, g = (update if update is not None else dummy), (gate if gate is not None else dummy)
    sh, sc = (shift if has_mod else dummy), (scale if has_mod else dummy)
    _add_norm_kernel[(triton.cdiv(m, block_m),)](
        x, u, g, weight if weight is not None else dummy, bias if bias is not None else dummy, sh, sc,
        sample_index if sample_index is not None else dummy, r, y if y is not None else dummy,
        m, c, rows_per_sample, eps,
        x.stride(0), u.stride(0), r.stride(0), c, g.stride(0), sh.stride(0), sc.stride(0),
        HAS_UPDATE=update is not None, HAS_GATE=gate is not None, NORMALIZE=normalize,
        HAS_AFFINE=weight is not None, HAS_MOD=has_mod, SAMPLE_FROM_INDEX=sample_index is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return r, y


@triton.jit
def _qk_rms_norm_kernel(QKV, GQ, GK, R, H, D, stride_tok, stride_part, stride_head, scale,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One tile row per (token, head): rows r = token·H + head, for q (part 0) and k (part 1).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (d < D)[None, :]
    tok = (rows // H).to(tl.int64)
    head = rows % H
    base = tok * stride_tok + head * stride_head
    g_off = head[:, None] * D + d[None, :]
    for part in tl.static_range(2):
        ptrs = QKV + (base + part * stride_part)[:, None] + d[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if part == 0:
            gamma = tl.load(GQ + g_off, mask=mask, other=0.0).to(tl.float32)
        else:
            gamma = tl.load(GK + g_off, mask=mask, other=0.0).to(tl.float32)
        inv = scale / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), 1e-12)
        tl.store(ptrs, (v * inv[:, None] * gamma).to(QKV.dtype.element_ty), mask=mask)


def qk_rms_norm_triton_(qkv: torch.Tensor, q_gamma: torch.Tensor, k_gamma: torch.Tensor) -> torch.Tensor:
    """Launcher of ``_qk_rms_norm_kernel`` on ``qkv [T, P, H, D]`` (strided tokens, parts and heads; D contiguous)."""
    t, _, h, d = qkv.shape
    rows = t * h
    if rows == 0:
        return qkv
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(TILE_ELEMS["qk_rms_norm"] // block_d, triton.next_power_of_2(rows)))
    _qk_rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        qkv, q_gamma.contiguous(), k_gamma.contiguous(), rows, h, d, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        d**0.5, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return qkv
