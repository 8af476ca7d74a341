"""Triton kernels of the SSA compressed branch: attention to compressed blocks, block scoring with a fused top-k,
and a deterministic backward. Imported only when the ``triton`` backend runs (it imports triton).

Dimension legend: N tokens, Hq / Hkv query / kv heads, Hs = Hq / Hkv, D head dim, NBc compression blocks,
NBs selection blocks, S = top-k; see :mod:`d3s2.ops.ssa.reference` for the semantics these kernels implement.

Tiles: a program owns ``BLOCK_T`` consecutive tokens of one sample and one kv head; its rows are the
``BLOCK_T × Hs`` (token, query head) pairs of that GQA group (heads padded to a power of two), so one load of a
compressed key tile serves the whole group. Compressed keys of a sample are few (N/64 … N/512 per sample), so
every pass streams them all.

- ``_cmp_fwd_kernel``: softmax attention → ``o_cmp`` and the natural-log LSE; the shift per row is the online
  running max or (``shift: "bound"``, the default) fixed before the loop at ``scale · |q| · max ‖k_cmp‖`` over
  the sample (no logit exceeds it: no max, no rescaling; rows whose sum stays below 2⁻⁶⁴ rerun online).
- ``_cmp_topk_kernel``: recomputes the probabilities from the LSE, sums them over the group's heads and over
  the compression blocks of each selection block, and keeps a running top-k per (token, kv head) in registers.
  Working memory beyond the inputs is the ``[N, Hkv, S]`` output: no ``[H, N, NBc]`` score tensor exists.
  A candidate is one int64 ``(float32 score bits << 32) | (2³¹ − 1 − local block id)``: scores are ≥ 0, so
  integer order is score order, and ties go to the lower block id.
  The ``dot`` variant (default) with ``skip``: a tile whose best score beats no token's weakest kept score (one
  float max) skips the insertion rounds. Options of the ``dot`` variant (``CONFIG``): ``key32``, one int32 key
  ``(score bits, low id bits cleared) | (id_mask − local id)`` instead of the int64 (half the registers and
  integer work per round; the score keeps 23 − id_bits ≥ 11 mantissa bits, float16's precision, which the
  probabilities already have); ``m_split`` 2 or 4, the logit tile in two or four row chunks (a half or a quarter
  of its registers); ``counted``, the insertion rounds of a tile counted once; ``lse_dot``, the rows' LSE shift
  added by the logit matmul (two more K columns holding hi + lo of −LSE₂ / scale against columns of ones)
  instead of one float32 register per row and thread: ptxas for sm_90 counts 254 registers per thread for session
  4's kernel, 92 with key32 + m_split 4 + lse_dot (2 → 5 CTAs of 4 warps per SM). The v1.1 default (``topk``):
  all four options, no float pre-test (counted rounds skip a quiet tile anyway): 2.21 ms against 4.86 ms at
  N = 134k on an H200. ``lists`` (v1.1 default 32, capped at BLOCK_J / 2): each token's running top-k in that
  many lists (``_topk_insert_lists``; at BLOCK_J / 2 a list holds the two rows of a tile that one thread holds, so
  an insertion round stays in registers), merged once at the end: 1.94 ms. v1.0's (``topk_seg``: m_cmp < m_slc)
  sums each selection block's compression blocks by a matmul with a 0/1 matrix, in float16 for 16-bit inputs:
  10.6 ms against 18.0 with session 15's tf32x3 sum and int64 keys. ``head_sum: "regs"`` (both defaults; 16-bit
  inputs): the query rows of a chunk ordered so that every thread's accumulator registers hold all the chunk's
  heads of its tokens (``_token_rows_lanes``), summed there in float32 instead of by the group matmul: v1.1 1.74
  ms, v1.0 8.74.
- ``_cmp_bwd_dq_kernel`` / ``_cmp_bwd_dkdv_kernel``: FlashAttention-2 style backward. dK/dV split the sample's
  queries into ``n_chunks`` chunks (enough programs to fill the GPU although NBc is small) and write per-chunk
  partial sums that are added in a fixed order afterwards: deterministic, no atomics.

Limits: D ≤ 128 (one register tile), top-k ≤ 32, float16 / bfloat16 / float32 (float32 dots run in IEEE
precision so that float32 results match a float32 reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._exp2 import exp2, fast_math, log2, resolve_mode
from ..block_attn.triton import (
    max_registers,
    row_dot,
    rowsum_init,
    rowsum_mode,
    rowsum_total,
    segment_max_norm,
    softmax_update,
)
from .layout import SSALayout

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_TOPK = 32
MAX_HEAD_DIM = 128
KEY32_MAX_ID_BITS = 12  # int32 top-k keys for samples of at most 4096 selection blocks (else int64)


# Tile configuration per kernel; the benchmark may override entries to compare variants.
CONFIG = {
    # "exp2": exp mode of the softmax probabilities (d3s2.ops._exp2); "split": only the last tile of compressed
    # blocks is masked. H200, N = 134k (session 4 sweep): split 11 % faster (2 or 4 stages: +3 %, +1 %); FMA-pipe
    # exps slower in all three kernels (fwd mix4 +7 %, mix +20 %, poly +65 %; top-k mix4 +4 %, mix +12 %, poly +23 %)
    # "shift": "online" (running max) or "bound" (fixed per-row shift from |q| and the sample's largest compressed-key
    # norm: no max, no rescaling); "rowsum": "reduce" (per-row adds and shuffles per tile), "lanes" (per-lane partial
    # sums, finished after the loop) or with "bound" "dot" (P · ones, tensor cores);
    # "maxnreg" (optional, here and in the top-k configs): registers per thread capped (ptxas), more CTAs per SM
    # H200, N = 134k (session 6, ms): online 128 rows 1.95 (session 5's default); bound + dot 128 rows 2.11 (200
    # registers per thread), 64 rows 1.86-1.88; bound + reduce 64 rows 1.85 (this default), online 64 rows 2.00
    # Session 10: 2 stages with registers capped at 80 (ptxas sm_90: 126 → 80, no spill; 6 CTAs per SM instead of 4)
    # 1.738 against 1.844 ms (3 stages capped at 96: 1.820; 32-block tiles 1.916, capped at 80 1.863). The cap holds
    # for 16-bit inputs, D ≤ 32 and 16 heads per group only (other shapes: no cap)
    # Session 18 (interleaved, scripts/gpu/ssa18.sh): rowsum "lanes" (ptxas sm_90: 212 → 204 instructions per key
    # tile, no shuffle) 1.79-1.83 against 1.83-1.84 ms; v1.0 7.71-7.82 against 7.78-8.33
    # Session 19 (interleaved, scripts/gpu/ssa19.sh, ssa19_2.sh): 128-row tiles of two warpgroups (8 warps, sharing
    # each K/V tile; ptxas sm_90 at 3 stages: 195 instructions per key tile against 203, 8 bytes of spill against 16)
    # with 3 stages 1.72-1.73 against 1.74-1.84 ms (2 stages 1.78, 4 stages 1.74-1.75, 32-block tiles 1.87); v1.0
    # 7.27-7.61 against 7.71-7.85. FMA-pipe exps (mix4) 1.99-2.01 against 1.80-1.83
    "fwd": {"rows": 128, "BLOCK_C": 64, "num_warps": 8, "num_stages": 3, "exp2": "mufu", "split": True,
            "shift": "bound", "rowsum": "lanes", "maxnreg": 80},
    # top-k with m_cmp == m_slc ("topk") and m_cmp < m_slc ("topk_seg", one-hot segment sum over compression
    # blocks); variant "reshape": head sum by tl.reshape + tl.sum; "dot": transposed tiles, head sum by tl.dot
    # "skip": a float test per tile before the key insertion (dot variant); "key32": int32 keys (int64 otherwise),
    # "m_split": row chunks per logit tile (2 or 4: a half / quarter of its registers), "counted": rounds counted
    # once per tile, "lse_dot": the LSE shift inside the logit matmul (no float32 LSE registers per row)
    # v1.1 top-k, H200, N = 134k (session 5 sweep, ms): session 4's kernel 4.86; key32 3.45; m_split 2 4.41; key32 +
    # m_split 2 + counted 3.31; + lse_dot 2.41; m_split 4 2.32; without the float pre-test (skip False: counted
    # rounds cost nothing on a tile nobody improves on) 2.21 (this default; k = 1: 1.72); rows 512 3.06, BLOCK_J 128
    # 2.92, BLOCK_J 16 8.25. v1.0 ("topk_seg", session 5 round 2): session 4's 18.89 ms; key32 + counted + lse_dot
    # with m_split 4: 19.41 (no pre-test 18.54), m_split 2 without the pre-test 18.15 (this default).
    # Session 6: registers capped at 80 per thread (6 CTAs per SM instead of 5, no spill) 2.12 against 2.23 ms, but
    # ptxas then fails on other shapes (the sparse DiT's top-k needs 94): no cap
    # Session 9 ("lists": the running top-k of a token kept in that many lists, at most BLOCK_J / 2: list = the
    # two rows of the transposed tile that one thread holds, so an insertion round needs no shuffle, no shared
    # memory and no barrier; merged once at the end; ncu: the rounds had been 37 % of the kernel, 3 barriers each):
    # H200, N = 134k (ms): 2.212 (one list); 4 lists 2.134, 16 2.375, 32 2.069 (120 registers: 4 CTAs per SM),
    # 32 with registers capped at 96 1.938 (this default; k = 1: 1.670)
    # Session 16 (v1.0, N = 134k, top-k 8; scripts/gpu/topk_old_new.py): the segment sum in float16 (one wgmma, was
    # tf32x3) and int32 keys (they had been sized by compression blocks: int64 here) 18.03 → 13.32 ms; with 4 row
    # chunks 11.74, capped at 128 registers (4 CTAs per SM) 10.74, at 112 10.71, at 96 11.89 (spills), 3 stages
    # 10.60-10.65 (this default; the cap only for the tuned shape, as "topk"); top-k 32 (512³): 24.76 → 12.97 ms,
    # 17.2-17.3 without the cap
    # "head_sum": the group's head sum by the 0/1 group matmul on float16 probabilities ("dot") or by float32 adds
    # in each thread's registers ("regs", rows in _token_rows_lanes's order: no conversion, no second matmul and
    # its wait; ptxas sm_90 96 registers, no spill). Session 17 (H200, N = 134k, scripts/gpu/ssa17.sh, ssa17_2.sh):
    # v1.1 1.94 → 1.79 ms at the 96 cap, 1.74 at 88 (this default; 80: 1.74-1.78, uncapped 1.74); v1.0 10.64 →
    # 8.74 ms (cap 112: 8.82, uncapped 8.75)
    # "fixed_rounds" (with lists = BLOCK_J / 2): two insertion rounds per key tile, no CTA-wide count of the rounds
    # (its reduction through shared memory and two barriers per tile; 32 lists of 8 keys need both rounds on almost
    # every tile anyway). ptxas sm_90, v1.1 key tile: 796 instructions and 3 barriers → 686 and 1. Session 18 (H200,
    # N = 134k, interleaved: scripts/gpu/ssa18.sh, ssa18_2.sh): v1.1 1.72-1.74 → 1.55 ms at the 88 cap, 1.52-1.53 at
    # 80 (this default: 6 CTAs per SM, 32 bytes of spill); v1.0 with 32 lists 8.68-8.70 → 8.24-8.26 ms (cap 112:
    # 8.29-8.31). Session 19 (scripts/gpu/ssa19.sh, ssa19_2.sh; not kept): each key tile's candidates inserted one
    # tile later, so that the integer rounds can fill the next tile's matmul and exp latency (ptxas then interleaves
    # them), 1.68 ms at the 80 cap (56 bytes of spill), 1.58 at 88, against 1.54; 128-block tiles of two warpgroups
    # (64 lists) 1.80 (cap 88: 1.89); FMA-pipe exps (mix4) 1.66
    "topk": {"variant": "dot", "skip": False, "rows": 256, "BLOCK_J": 64, "BLOCK_C": 64, "num_warps": 4,
             "num_stages": 3, "exp2": "mufu", "key32": True, "m_split": 4, "counted": True, "lse_dot": True,
             "lists": 32, "fixed_rounds": True, "head_sum": "regs", "maxnreg": 80},
    "topk_seg": {"variant": "dot", "skip": False, "rows": 256, "BLOCK_J": 64, "BLOCK_C": 64, "num_warps": 4,
                 "num_stages": 3, "exp2": "mufu", "key32": True, "m_split": 4, "counted": True, "lse_dot": True,
                 "lists": 32, "fixed_rounds": True, "head_sum": "regs", "maxnreg": 128},
    "bwd_dq": {"rows": 128, "BLOCK_C": 64, "num_warps": 4, "num_stages": 2},
    # Session 16 (H200, N = 134k, dQ + dK/dV + chunk sum; scripts/gpu/ssa16_3.sh, ssa16_4.sh): dK/dV stepping over
    # 32 query rows with 3 stages (ptxas sm_90: 92 registers, 5 CTAs per SM; 64 rows took 145, 3 CTAs) v1.1 6.24-6.30
    # against 7.01-7.02 ms, v1.0 25.2-25.6 against 26.3-26.6 (64 rows with 3 stages 6.31-6.35; 16 rows 7.44; dQ on
    # 64-row tiles capped at 96 or on 32-block tiles: within 1 % on v1.1, slower on v1.0)
    "bwd_dkdv": {"rows": 32, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 8},
}


@triton.jit
def _program_tokens(CU_SEQ, BLOCK_T: tl.constexpr):
    """This program's (sample b, kv head g, first token, the sample's token end) on the grid (token tile, sample, kv
    head); the tile is empty when the first token is not before the end."""
    b = tl.program_id(1)
    t1 = tl.load(CU_SEQ + b + 1)
    return b, tl.program_id(2), tl.load(CU_SEQ + b) + tl.program_id(0) * BLOCK_T, t1


@triton.jit
def _token_rows(start, t1, g, r0, HS: tl.constexpr, HS_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Rows ``r0 … r0 + ROWS`` of a tile of tokens from ``start`` × the HS query heads of kv head g (padded to HS_PAD):
    (token, query head, row mask: token before ``t1`` and head not padding)."""
    rows = r0 + tl.arange(0, ROWS)
    tok = start + rows // HS_PAD
    hh = rows % HS_PAD
    return tok, g * HS + hh, (tok < t1) & (hh < HS)


@triton.jit
def _load_rows(ptr, tok, head, offs_d, row_ok, d_ok, stride_n, stride_h):
    """[BLOCK_M, BLOCK_D] tile of rows (tok, head) of a [N, H, D] tensor (zeros outside)."""
    ptrs = ptr + tok.to(tl.int64)[:, None] * stride_n + head[:, None] * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _cmp_fwd_step(q, K, V, c_start, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i, l_i, acc, qk_scale,
                  DOT_PREC: tl.constexpr, EXP2: tl.constexpr, MASK: tl.constexpr, BOUND: tl.constexpr,
                  ROWSUM: tl.constexpr):
    """Softmax step over compressed blocks [c_start, c_start + BLOCK_C); MASK: the tile may pass ``c1``.

    BOUND: ``m_i`` is a fixed per-row shift ≥ every scaled logit of the row (no running max, no rescaling of
    ``l_i`` and ``acc``); ROWSUM: the row sums' form (``softmax_update``)."""
    cols = c_start + offs_c
    kv_off = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
    if MASK:
        col_ok = cols < c1
        kv_mask = col_ok[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_C], unscaled
    if MASK:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    return softmax_update(s, v, m_i, l_i, acc, qk_scale, DOT_PREC, EXP2, BOUND, ROWSUM)


@triton.jit
def _cmp_fwd_loop(q, K, V, c0, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i, l_i, acc, qk_scale,
                  BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr, EXP2: tl.constexpr, SPLIT: tl.constexpr,
                  BOUND: tl.constexpr, ROWSUM: tl.constexpr):
    """All compressed blocks [c0, c1) of the sample; SPLIT: whole ``BLOCK_C`` tiles unmasked, the last one masked."""
    if SPLIT:
        c_full = c0 + (c1 - c0) // BLOCK_C * BLOCK_C
        for c_start in range(c0, c_full, BLOCK_C):
            m_i, l_i, acc = _cmp_fwd_step(q, K, V, c_start, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i,
                                          l_i, acc, qk_scale, DOT_PREC, EXP2, False, BOUND, ROWSUM)
        if c_full < c1:
            m_i, l_i, acc = _cmp_fwd_step(q, K, V, c_full, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i,
                                          l_i, acc, qk_scale, DOT_PREC, EXP2, True, BOUND, ROWSUM)
    else:
        for c_start in range(c0, c1, BLOCK_C):
            m_i, l_i, acc = _cmp_fwd_step(q, K, V, c_start, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i,
                                          l_i, acc, qk_scale, DOT_PREC, EXP2, True, BOUND, ROWSUM)
    return m_i, l_i, acc


@triton.jit
def _cmp_fwd_kernel(Q, K, V, O, LSE, CU_SEQ, CU_CMP, KMAX,
                    stride_qn, stride_qh, stride_kn, stride_kh, stride_on, stride_oh,
                    qk_scale,
                    HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr,
                    EXP2: tl.constexpr, SPLIT: tl.constexpr, BOUND: tl.constexpr, ROWSUM: tl.constexpr,
                    FAST_LOG2: tl.constexpr):
    """SPLIT: whole ``BLOCK_C`` tiles of compressed blocks run unmasked, only the last partial one masked.

    BOUND: the softmax shift of a row is fixed before the loop, ``qk_scale · |q| · KMAX[b, g]`` (KMAX: the
    sample's largest compressed-key norm per kv head, so by Cauchy–Schwarz no scaled logit exceeds it): no running
    max, no rescaling. A row whose sum stays below 2⁻⁶⁴ (the bound more than 64 binades above its largest logit,
    where flushed terms could matter) reruns the whole tile with the online softmax."""
    b, g, start, t1 = _program_tokens(CU_SEQ, BLOCK_T)
    if start >= t1:
        return
    c0 = tl.load(CU_CMP + b)
    c1 = tl.load(CU_CMP + b + 1)
    BLOCK_M: tl.constexpr = BLOCK_T * HS_PAD
    tok, head, row_ok = _token_rows(start, t1, g, 0, HS, HS_PAD, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(Q, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BOUND:
        qf = q.to(tl.float32)
        m_i = tl.sqrt(tl.sum(qf * qf, 1)) * (tl.load(KMAX + b * HKV + g) * qk_scale)
        m_i, l_i, acc = _cmp_fwd_loop(q, K, V, c0, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i,
                                      rowsum_init(BLOCK_M, ROWSUM), acc, qk_scale, BLOCK_C, DOT_PREC, EXP2, SPLIT,
                                      True, ROWSUM)
        l_i = rowsum_total(l_i, ROWSUM)
        if tl.min(tl.where(row_ok, l_i, 1.0), 0) < 5.421010862427522e-20:  # 2^-64: rare, see the docstring
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            m_i, l_i, acc = _cmp_fwd_loop(q, K, V, c0, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i, l_i,
                                          acc, qk_scale, BLOCK_C, DOT_PREC, EXP2, SPLIT, False, "reduce")
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # ROWSUM is not "dot" here (``rowsum_mode``)
        m_i, l_i, acc = _cmp_fwd_loop(q, K, V, c0, c1, g, offs_c, offs_d, d_ok, stride_kn, stride_kh, m_i,
                                      rowsum_init(BLOCK_M, ROWSUM), acc, qk_scale, BLOCK_C, DOT_PREC, EXP2, SPLIT,
                                      False, ROWSUM)
        l_i = rowsum_total(l_i, ROWSUM)
    o = acc * (1.0 / l_i)[:, None]  # one reciprocal per row, not a division per element
    o_ptrs = O + tok.to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + log2(l_i, FAST_LOG2)) * 0.6931471805599453  # natural log
    tl.store(LSE + tok.to(tl.int64) * HQ + head, lse, mask=row_ok)


@triton.jit
def _cmp_topk_kernel(Q, K, LSE, IDX, CU_SEQ, CU_SLC, SLC_CMP_OFF, CMP_SLC,
                     stride_qn, stride_qh, stride_kn, stride_kh,
                     qk_scale,
                     HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                     TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, ONE_CMP_PER_SLC: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    b, g, start, t1 = _program_tokens(CU_SEQ, BLOCK_T)
    if start >= t1:
        return
    s0 = tl.load(CU_SLC + b)
    s1 = tl.load(CU_SLC + b + 1)
    BLOCK_M: tl.constexpr = BLOCK_T * HS_PAD
    tok, head, row_ok = _token_rows(start, t1, g, 0, HS, HS_PAD, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(Q, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
    # log2-domain LSE; +inf on padding rows makes their probabilities 0
    lse2 = tl.load(LSE + tok.to(tl.int64) * HQ + head, mask=row_ok, other=float("inf")) * 1.4426950408889634

    NEG: tl.constexpr = -4611686018427387904  # below every candidate key and every empty slot
    slot = tl.arange(0, TOPK_PAD)
    # empty slots hold distinct negatives; padding slots (>= TOPK) hold int64 max so they are never replaced
    init = tl.where(slot < TOPK, -1 - slot.to(tl.int64), 9223372036854775807)
    best = tl.zeros([BLOCK_T, TOPK_PAD], tl.int64) + init[None, :]
    offs_j = tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    for j_start in range(s0, s1, BLOCK_J):
        jj = j_start + offs_j
        j_ok = jj < s1
        if ONE_CMP_PER_SLC:
            # compression block id == selection block id
            k_off = jj.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
            k = tl.load(K + k_off, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_J]
            p = tl.exp2(s * qk_scale - lse2[:, None])
            p = tl.where(j_ok[None, :], p, 0.0)
            score = tl.sum(tl.reshape(p, [BLOCK_T, HS_PAD, BLOCK_J]), 1)  # [BLOCK_T, BLOCK_J] summed over heads
        else:
            c_a = tl.load(SLC_CMP_OFF + j_start)
            c_b = tl.load(SLC_CMP_OFF + tl.minimum(j_start + BLOCK_J, s1))
            score = tl.zeros([BLOCK_T, BLOCK_J], tl.float32)
            for c_start in range(c_a, c_b, BLOCK_C):
                cols = c_start + offs_c
                col_ok = cols < c_b
                k_off = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
                k = tl.load(K + k_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_C]
                p = tl.exp2(s * qk_scale - lse2[:, None])
                p = tl.where(col_ok[None, :], p, 0.0)
                p_tok = tl.sum(tl.reshape(p, [BLOCK_T, HS_PAD, BLOCK_C]), 1)  # [BLOCK_T, BLOCK_C]
                # one-hot [BLOCK_C, BLOCK_J]: which selection block of this tile each compression block is in
                local = tl.load(CMP_SLC + cols, mask=col_ok, other=-1) - j_start
                onehot = (local[:, None] == offs_j[None, :]).to(tl.float32)
                score += tl.dot(p_tok, onehot, input_precision="tf32x3")
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = (bits << 32) + (2147483647 - (jj - s0)).to(tl.int64)[None, :]
        cand = tl.where(j_ok[None, :], key, NEG)
        # Insert the tile's best candidates while any row still improves (usually few rounds after the first tiles).
        c_max = tl.max(cand, 1)
        t_min = tl.min(best, 1)
        better = c_max > t_min
        n_better = tl.sum(better.to(tl.int32), 0)
        while n_better > 0:
            best = tl.where((best == t_min[:, None]) & better[:, None], c_max[:, None], best)
            cand = tl.where(cand == c_max[:, None], NEG, cand)
            c_max = tl.max(cand, 1)
            t_min = tl.min(best, 1)
            better = c_max > t_min
            n_better = tl.sum(better.to(tl.int32), 0)

    best = tl.where(slot[None, :] < TOPK, best, NEG)
    best = tl.sort(best, 1, descending=True)
    local_id = 2147483647 - (best - ((best >> 32) << 32))
    out = tl.where(best >= 0, local_id + s0, -1).to(tl.int32)
    toks = start + tl.arange(0, BLOCK_T)
    ptrs = IDX + (toks.to(tl.int64)[:, None] * HKV + g) * TOPK + slot[None, :]
    tl.store(ptrs, out, mask=(toks < t1)[:, None] & (slot < TOPK)[None, :])


@triton.jit
def _topk_insert(best, score, jj, j_ok, s0, id_mask, NEG: tl.constexpr, KEY32: tl.constexpr,
                 COUNTED: tl.constexpr, TOPK: tl.constexpr):
    """Merge a [BLOCK_J, BLOCK_T] score tile into the running top-k ``best`` [TOPK_PAD, BLOCK_T].

    Keys: int64 ``(score bits << 32) | (2³¹ − 1 − local id)``, or with KEY32 one int32
    ``(score bits with the low id bits cleared) | (id_mask − local id)`` (scores ≥ 0, so integer order is score
    order; ties go to the lower id). One round per insertion: every token whose tile maximum beats its weakest
    kept key swaps them. COUNTED: the number of rounds (the most keys of one token that beat its weakest kept
    key, at most TOPK) is counted once instead of testing after every round (one reduction less per round).
    """
    if KEY32:
        key = (score.to(tl.int32, bitcast=True) & (-1 - id_mask)) | (id_mask - (jj - s0))[:, None]
    else:
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = (bits << 32) + (2147483647 - (jj - s0)).to(tl.int64)[:, None]
    cand = tl.where(j_ok[:, None], key, NEG)
    t_min = tl.min(best, 0)
    if COUNTED:
        n_beat = tl.minimum(tl.sum((cand > t_min[None, :]).to(tl.int32), 0), TOPK)
        for _ in range(tl.max(n_beat, 0)):
            c_max = tl.max(cand, 0)
            better = c_max > t_min
            best = tl.where((best == t_min[None, :]) & better[None, :], c_max[None, :], best)
            cand = tl.where(cand == c_max[None, :], NEG, cand)
            t_min = tl.min(best, 0)
    else:
        c_max = tl.max(cand, 0)
        better = c_max > t_min
        n_better = tl.sum(better.to(tl.int32), 0)
        while n_better > 0:
            best = tl.where((best == t_min[None, :]) & better[None, :], c_max[None, :], best)
            cand = tl.where(cand == c_max[None, :], NEG, cand)
            c_max = tl.max(cand, 0)
            t_min = tl.min(best, 0)
            better = c_max > t_min
            n_better = tl.sum(better.to(tl.int32), 0)
    return best


@triton.jit
def _lists_round(best, cand, t_min, NEG: tl.constexpr):
    """One insertion round of ``_topk_insert_lists``: each list's best candidate replaces its weakest kept key when
    it beats it. Returns (best, cand without that candidate, new weakest keys)."""
    c_max = tl.max(cand, 1)
    better = c_max > t_min
    best = tl.where((best == t_min[:, None, :]) & better[:, None, :], c_max[:, None, :], best)
    cand = tl.where(cand == c_max[:, None, :], NEG, cand)
    return best, cand, tl.min(best, 1)


@triton.jit
def _replace_weakest(best, t_min, c):
    """Candidate ``c`` [LISTS, BLOCK_T] into its list's weakest slot when it beats that key (keys are distinct:
    exactly one slot equals the minimum ``t_min``); returns (best, new minima)."""
    best = tl.where(best == t_min[:, None, :], tl.maximum(c, t_min)[:, None, :], best)
    return best, tl.min(best, 1)


@triton.jit
def _topk_insert_lists(best, score, jj, j_ok, s0, id_mask, NEG: tl.constexpr, TOPK: tl.constexpr,
                       LISTS: tl.constexpr, FIXED_ROUNDS: tl.constexpr):
    """``_topk_insert`` (int32 keys) into LISTS independent lists ``best`` [LISTS, TOPK_PAD, BLOCK_T] of every
    token. LISTS = BLOCK_J / 2: list (16-row group, r) takes rows r and r + 8 of the group, the two rows that one
    thread holds in the transposed tile's layout, so a round's maxima and minima stay in registers (no shuffle, no
    shared memory, no barrier); otherwise list w takes the rows w·BLOCK_J/LISTS … (w + 1)·BLOCK_J/LISTS.
    The lists' union holds every token's top-k (each of its best blocks is among the best of its own list).

    Rounds: as many as the most candidates of one list that beat its weakest key, counted over the whole tile (a
    reduction across the warps: shared memory and two barriers), or with FIXED_ROUNDS (LISTS = BLOCK_J / 2 only)
    always two, one per candidate of a list: no count, no barrier. With 32 lists of 8 keys almost every tile needs
    both rounds anyway (a list sees ≈ 31 candidates per token over a sample of 994 blocks)."""
    BLOCK_J: tl.constexpr = score.shape[0]
    BLOCK_T: tl.constexpr = score.shape[1]
    key = (score.to(tl.int32, bitcast=True) & (-1 - id_mask)) | (id_mask - (jj - s0))[:, None]  # int32 keys only
    cand = tl.where(j_ok[:, None], key, NEG)
    if LISTS == BLOCK_J // 2:
        # list (16-row group, r) takes rows r and r + 8 of the group: the two rows one thread holds
        cand = tl.reshape(tl.permute(tl.reshape(cand, [BLOCK_J // 16, 2, 8, BLOCK_T]), (0, 2, 1, 3)),
                          [LISTS, 2, BLOCK_T])
    else:
        cand = tl.reshape(cand, [LISTS, BLOCK_J // LISTS, BLOCK_T])
    t_min = tl.min(best, 1)
    if FIXED_ROUNDS:
        tl.static_assert(LISTS == BLOCK_J // 2, "fixed rounds need two candidates per list")
        # the larger candidate, then the smaller
        best, t_min = _replace_weakest(best, t_min, tl.max(cand, 1))
        best, t_min = _replace_weakest(best, t_min, tl.min(cand, 1))
    else:
        n_beat = tl.minimum(tl.sum((cand > t_min[:, None, :]).to(tl.int32), 1), TOPK)
        for _ in range(tl.max(tl.max(n_beat, 1), 0)):
            best, cand, t_min = _lists_round(best, cand, t_min, NEG)
    return best


@triton.jit
def _token_rows_lanes(start, t1, g, chunk, HS: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr):
    """Row chunk ``chunk`` of a top-k tile for the in-register head sum: all BLOCK_T tokens × H_C = ROWS / BLOCK_T
    heads ``chunk·H_C …``, ordered so that in the wgmma accumulator (column n = 8i + 2c + e held by lane c of a quad,
    registers i, e) every thread holds all H_C heads of its tokens: token 4·(i // (H_C/2)) + c, head
    2·(i % (H_C/2)) + e. (token, query head, row mask) as ``_token_rows``."""
    H_C: tl.constexpr = ROWS // BLOCK_T
    n = tl.arange(0, ROWS)
    i = n // 8
    tok = start + 4 * (i // (H_C // 2)) + (n // 2) % 4
    hh = chunk * H_C + 2 * (i % (H_C // 2)) + n % 2
    return tok, g * HS + hh, (tok < t1) & (hh < HS)


@triton.jit
def _group_rows(Q, LSE, start, t1, g, r0, stride_qn, stride_qh, offs_d, d_ok, qk_scale,
                HQ: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                ROWS: tl.constexpr, P_FP16: tl.constexpr, LSE_DOT: tl.constexpr, SUM_REGS: tl.constexpr):
    """Rows ``r0 … r0 + ROWS`` of a top-k tile: (qᵀ [BLOCK_D, ROWS], shift, 0/1 group [ROWS, BLOCK_T]).

    shift: the log2 LSE [ROWS], or with LSE_DOT ``aᵀ`` [16, ROWS] in q's dtype whose rows 0 and 1 are a two-term
    split hi + lo of a = −LSE₂ / qk_scale, so that ``qk_scale · (q·k + hi + lo)`` is the log2 probability (to
    ~2⁻¹⁶ of a): the shift rides in the logit matmul instead of costing float32 registers per row (padding rows
    get a = −30000: probability 0). SUM_REGS: rows in ``_token_rows_lanes``'s order (chunk r0 / ROWS); the group
    matrix is then unused."""
    if SUM_REGS:
        tok, head, row_ok = _token_rows_lanes(start, t1, g, r0 // ROWS, HS, BLOCK_T, ROWS)
    else:
        tok, head, row_ok = _token_rows(start, t1, g, r0, HS, HS_PAD, ROWS)
    q_t = tl.trans(_load_rows(Q, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh))
    # log2-domain LSE; +inf on padding rows makes their probabilities 0
    lse2 = tl.load(LSE + tok.to(tl.int64) * HQ + head, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if LSE_DOT:
        a = tl.where(row_ok, -lse2 / qk_scale, -30000.0)
        hi = a.to(Q.dtype.element_ty)
        lo = (a - hi.to(tl.float32)).to(Q.dtype.element_ty)
        col = tl.arange(0, 16)[:, None]
        shift = tl.where(col == 0, hi[None, :], tl.where(col == 1, lo[None, :], 0.0)).to(Q.dtype.element_ty)
    else:
        shift = lse2
    # group[r, t] = 1 when row r is a valid head of token t
    group = (((tok - start)[:, None] == tl.arange(0, BLOCK_T)[None, :]) & row_ok[:, None]).to(tl.float32)
    if P_FP16:
        group = group.to(tl.float16)
    return q_t, shift, group


@triton.jit
def _group_scores(k, col_ok, q_t, shift, group, qk_scale, MASK: tl.constexpr, DOT_PREC: tl.constexpr,
                  P_FP16: tl.constexpr, EXP2: tl.constexpr, LSE_DOT: tl.constexpr, SUM_REGS: tl.constexpr):
    """[BLOCK_C, BLOCK_T] probabilities of compressed keys ``k`` [BLOCK_C, BLOCK_D] summed over the group's heads
    (MASK: rows outside ``col_ok`` contribute 0); ``shift`` from ``_group_rows``. SUM_REGS: the head sum by float32
    adds within each thread (rows in ``_token_rows_lanes``'s order): no conversion of the probabilities (it runs on
    the exponential's pipe) and no group matmul."""
    s = tl.dot(k, q_t, input_precision=DOT_PREC)  # [BLOCK_C, ROWS]
    if LSE_DOT:
        # ones in columns 0 and 1: adds each row's hi + lo to its logits
        ones = tl.where(tl.arange(0, 16)[None, :] < 2, 1.0, 0.0) + tl.zeros([k.shape[0], 16], tl.float32)
        s = tl.dot(ones.to(k.dtype), shift, s, input_precision=DOT_PREC)
        p_t = exp2(s * qk_scale, EXP2)
    else:
        p_t = exp2(s * qk_scale - shift[None, :], EXP2)
    if MASK:
        p_t = tl.where(col_ok[:, None], p_t, 0.0)
    if SUM_REGS:
        BLOCK_T: tl.constexpr = group.shape[1]
        H_C: tl.constexpr = p_t.shape[1] // BLOCK_T
        # [keys, token // 4, head // 2, token % 4, head % 2]: the token's heads are a thread's registers
        p5 = tl.reshape(p_t, [p_t.shape[0], BLOCK_T // 4, H_C // 2, 4, 2])
        return tl.reshape(tl.sum(tl.sum(p5, 4), 2), [p_t.shape[0], BLOCK_T])
    if P_FP16:
        p_t = p_t.to(tl.float16)
    return tl.dot(p_t, group, input_precision=DOT_PREC)


@triton.jit
def _cmp_topk_dot_kernel(Q, K, LSE, IDX, CU_SEQ, CU_SLC, SLC_CMP_OFF, CMP_SLC,
                         stride_qn, stride_qh, stride_kn, stride_kh,
                         qk_scale, id_bits,
                         HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_C: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                         ONE_CMP_PER_SLC: tl.constexpr, DOT_PREC: tl.constexpr, P_FP16: tl.constexpr,
                         SKIP: tl.constexpr, EXP2: tl.constexpr, KEY32: tl.constexpr, M_SPLIT: tl.constexpr,
                         COUNTED: tl.constexpr, LSE_DOT: tl.constexpr, LISTS: tl.constexpr,
                         FIXED_ROUNDS: tl.constexpr, SUM_REGS: tl.constexpr):
    """Same result as ``_cmp_topk_kernel``, computed transposed: logits ``[blocks, rows]`` = K·Qᵀ, and the sum
    over the GQA group is a second tl.dot with a 0/1 ``[rows, tokens]`` matrix (probabilities in float16 for
    16-bit inputs: ≤ 2⁻¹¹ relative error per term), so the probabilities stay in the matmul register layout
    (no reshape) and the candidate tiles are ``[blocks, tokens]``.

    M_SPLIT (1, 2 or 4): the rows are scored in that many chunks whose group sums accumulate into one score tile,
    so the fp32 logit tile in registers is ``[BLOCK_J, BLOCK_M / M_SPLIT]``. KEY32, COUNTED: see ``_topk_insert``
    (KEY32 needs ``id_bits`` ≥ the bits of the largest local block id)."""
    b, g, start, t1 = _program_tokens(CU_SEQ, BLOCK_T)
    if start >= t1:
        return
    s0 = tl.load(CU_SLC + b)
    s1 = tl.load(CU_SLC + b + 1)
    ROWS: tl.constexpr = BLOCK_T * HS_PAD // M_SPLIT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_t, sh, group = _group_rows(Q, LSE, start, t1, g, 0, stride_qn, stride_qh, offs_d, d_ok, qk_scale, HQ, HS,
                                 HS_PAD, BLOCK_T, ROWS, P_FP16, LSE_DOT, SUM_REGS)
    if M_SPLIT >= 2:
        q_t2, sh2, group2 = _group_rows(Q, LSE, start, t1, g, ROWS, stride_qn, stride_qh, offs_d, d_ok, qk_scale,
                                        HQ, HS, HS_PAD, BLOCK_T, ROWS, P_FP16, LSE_DOT, SUM_REGS)
    if M_SPLIT == 4:
        q_t3, sh3, group3 = _group_rows(Q, LSE, start, t1, g, 2 * ROWS, stride_qn, stride_qh, offs_d, d_ok,
                                        qk_scale, HQ, HS, HS_PAD, BLOCK_T, ROWS, P_FP16, LSE_DOT, SUM_REGS)
        q_t4, sh4, group4 = _group_rows(Q, LSE, start, t1, g, 3 * ROWS, stride_qn, stride_qh, offs_d, d_ok,
                                        qk_scale, HQ, HS, HS_PAD, BLOCK_T, ROWS, P_FP16, LSE_DOT, SUM_REGS)

    slot = tl.arange(0, TOPK_PAD)
    id_mask = (1 << id_bits) - 1
    if KEY32:
        NEG: tl.constexpr = -1073741824  # below every candidate key and every empty slot
        # empty slots hold distinct negatives; padding slots (>= TOPK) hold the int max so they are never replaced
        init = tl.where(slot < TOPK, -1 - slot, 2147483647)
        best = tl.zeros([TOPK_PAD, BLOCK_T], tl.int32) + init[:, None]  # [slot, token]
        if LISTS > 1:
            best = tl.zeros([LISTS, TOPK_PAD, BLOCK_T], tl.int32) + init[None, :, None]  # [list, slot, token]
    else:
        NEG: tl.constexpr = -4611686018427387904
        init = tl.where(slot < TOPK, -1 - slot.to(tl.int64), 9223372036854775807)
        best = tl.zeros([TOPK_PAD, BLOCK_T], tl.int64) + init[:, None]
    # SKIP: score of each token's weakest kept block (-1 while a slot is empty; scores are >= 0); later blocks
    # lose ties (higher ids), so a tile whose best score does not beat it for any token skips the insertion
    thr = tl.full([BLOCK_T], -1.0, tl.float32)
    offs_j = tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    for j_start in range(s0, s1, BLOCK_J):
        jj = j_start + offs_j
        j_ok = jj < s1
        if ONE_CMP_PER_SLC:
            # compression block id == selection block id; rows past s1 are dropped by the candidate mask
            k_off = jj.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
            k = tl.load(K + k_off, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            score = _group_scores(k, j_ok, q_t, sh, group, qk_scale, False, DOT_PREC, P_FP16, EXP2, LSE_DOT,
                                  SUM_REGS)
            if M_SPLIT >= 2:
                score += _group_scores(k, j_ok, q_t2, sh2, group2, qk_scale, False, DOT_PREC, P_FP16,
                                       EXP2, LSE_DOT, SUM_REGS)
            if M_SPLIT == 4:
                score += _group_scores(k, j_ok, q_t3, sh3, group3, qk_scale, False, DOT_PREC, P_FP16,
                                       EXP2, LSE_DOT, SUM_REGS)
                score += _group_scores(k, j_ok, q_t4, sh4, group4, qk_scale, False, DOT_PREC, P_FP16,
                                       EXP2, LSE_DOT, SUM_REGS)
        else:
            c_a = tl.load(SLC_CMP_OFF + j_start)
            c_b = tl.load(SLC_CMP_OFF + tl.minimum(j_start + BLOCK_J, s1))
            score = tl.zeros([BLOCK_J, BLOCK_T], tl.float32)
            for c_start in range(c_a, c_b, BLOCK_C):
                cols = c_start + offs_c
                col_ok = cols < c_b
                k_off = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
                k = tl.load(K + k_off, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                p_tok = _group_scores(k, col_ok, q_t, sh, group, qk_scale, True, DOT_PREC, P_FP16, EXP2, LSE_DOT,
                                      SUM_REGS)
                if M_SPLIT >= 2:
                    p_tok += _group_scores(k, col_ok, q_t2, sh2, group2, qk_scale, True, DOT_PREC, P_FP16,
                                           EXP2, LSE_DOT, SUM_REGS)
                if M_SPLIT == 4:
                    p_tok += _group_scores(k, col_ok, q_t3, sh3, group3, qk_scale, True, DOT_PREC, P_FP16,
                                           EXP2, LSE_DOT, SUM_REGS)
                    p_tok += _group_scores(k, col_ok, q_t4, sh4, group4, qk_scale, True, DOT_PREC, P_FP16,
                                           EXP2, LSE_DOT, SUM_REGS)
                local = tl.load(CMP_SLC + cols, mask=col_ok, other=-1) - j_start
                if P_FP16:
                    # float16 sums (≤ 2⁻¹¹ relative error: the probabilities' own and the int32 keys' precision)
                    # against an exact 0/1 matrix, one wgmma (tf32x3 took three, with a float32 one-hot held twice
                    # in registers: 232 against 183 registers per thread, ptxas sm_90)
                    onehot = (offs_j[:, None] == local[None, :]).to(tl.float16)  # [BLOCK_J, BLOCK_C]
                    score = tl.dot(onehot, p_tok.to(tl.float16), score)
                else:
                    onehot = (offs_j[:, None] == local[None, :]).to(tl.float32)  # [BLOCK_J, BLOCK_C]
                    score += tl.dot(onehot, p_tok, input_precision="tf32x3")
        if SKIP:
            enter = tl.max(tl.where(j_ok[:, None], score, -1.0), 0) > thr
            if tl.sum(enter.to(tl.int32), 0) > 0:
                best = _topk_insert(best, score, jj, j_ok, s0, id_mask, NEG, KEY32, COUNTED, TOPK)
                t_min = tl.min(best, 0)
                if KEY32:  # the score with its id bits cleared: a lower bound of the weakest kept score
                    thr = tl.where(t_min < 0, -1.0, (t_min & (-1 - id_mask)).to(tl.float32, bitcast=True))
                else:
                    thr = tl.where(t_min < 0, -1.0, (t_min >> 32).to(tl.int32).to(tl.float32, bitcast=True))
        elif LISTS > 1:
            best = _topk_insert_lists(best, score, jj, j_ok, s0, id_mask, NEG, TOPK, LISTS, FIXED_ROUNDS)
        else:
            best = _topk_insert(best, score, jj, j_ok, s0, id_mask, NEG, KEY32, COUNTED, TOPK)

    if LISTS > 1:  # the lists' union: its TOPK largest keys, taken one by one, best first
        union = tl.reshape(tl.where(slot[None, :, None] < TOPK, best, NEG), [LISTS * TOPK_PAD, BLOCK_T])
        best = tl.zeros([BLOCK_T, TOPK_PAD], union.dtype) + NEG
        for i in range(TOPK):
            top = tl.max(union, 0)
            best = tl.where(slot[None, :] == i, top[:, None], best)
            union = tl.where(union == top[None, :], NEG, union)
    else:
        best = tl.where(slot[:, None] < TOPK, best, NEG)
        best = tl.sort(tl.trans(best), 1, descending=True)  # [BLOCK_T, TOPK_PAD]
    if KEY32:
        local_id = id_mask - (best & id_mask)
    else:
        local_id = 2147483647 - (best - ((best >> 32) << 32))
    out = tl.where(best >= 0, local_id + s0, -1).to(tl.int32)
    toks = start + tl.arange(0, BLOCK_T)
    ptrs = IDX + (toks.to(tl.int64)[:, None] * HKV + g) * TOPK + slot[None, :]
    tl.store(ptrs, out, mask=(toks < t1)[:, None] & (slot < TOPK)[None, :])


@triton.jit
def _cmp_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQ, CU_CMP,
                       stride_qn, stride_qh, stride_kn, stride_kh,
                       qk_scale, sm_scale,
                       HQ: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr):
    b, g, start, t1 = _program_tokens(CU_SEQ, BLOCK_T)
    if start >= t1:
        return
    c0 = tl.load(CU_CMP + b)
    c1 = tl.load(CU_CMP + b + 1)
    BLOCK_M: tl.constexpr = BLOCK_T * HS_PAD
    tok, head, row_ok = _token_rows(start, t1, g, 0, HS, HS_PAD, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # q, do and dq share q's strides (the launcher makes them contiguous)
    q = _load_rows(Q, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
    do = _load_rows(DO, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
    row_off = tok.to(tl.int64) * HQ + head
    lse2 = tl.load(LSE + row_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for c_start in range(c0, c1, BLOCK_C):
        cols = c_start + offs_c
        col_ok = cols < c1
        kv_off = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq_ptrs = DQ + tok.to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _cmp_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_PART, DV_PART, CU_SEQ, CU_CMP,
                         stride_qn, stride_qh, stride_kn, stride_kh, stride_pc, stride_pn, stride_ph,
                         qk_scale, sm_scale,
                         HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr,
                         D: tl.constexpr, N_CHUNKS: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2) % HKV
    chunk = tl.program_id(2) // HKV
    c0 = tl.load(CU_CMP + b)
    c1 = tl.load(CU_CMP + b + 1)
    c_tile = c0 + pid_c * BLOCK_C
    if c_tile >= c1:
        return
    t0 = tl.load(CU_SEQ + b)
    t1 = tl.load(CU_SEQ + b + 1)
    chunk_len = tl.cdiv(tl.cdiv(t1 - t0, N_CHUNKS), BLOCK_T) * BLOCK_T
    q_a = t0 + chunk * chunk_len
    q_b = tl.minimum(q_a + chunk_len, t1)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = c_tile + tl.arange(0, BLOCK_C)
    col_ok = cols < c1
    kv_off = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    BLOCK_M: tl.constexpr = BLOCK_T * HS_PAD
    for t_start in range(q_a, q_b, BLOCK_T):
        tok, head, row_ok = _token_rows(t_start, q_b, g, 0, HS, HS_PAD, BLOCK_M)
        q = _load_rows(Q, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
        do = _load_rows(DO, tok, head, offs_d, row_ok, d_ok, stride_qn, stride_qh)
        row_off = tok.to(tl.int64) * HQ + head
        lse2 = tl.load(LSE + row_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_M]
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    part = chunk * stride_pc + cols.to(tl.int64)[:, None] * stride_pn + g * stride_ph + offs_d[None, :]
    tl.store(DK_PART + part, dk * sm_scale, mask=kv_mask)
    tl.store(DV_PART + part, dv, mask=kv_mask)


# ---------------------------------------------------------------------------------------------- launchers


def _check(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    n, hq, d = q.shape
    hkv = k_cmp.shape[1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"expected head dim <= {MAX_HEAD_DIM} for the triton SSA kernels, got {d}")
    if k_cmp.dtype != q.dtype or (v_cmp is not None and v_cmp.dtype != q.dtype):
        raise ValueError(f"expected q, k_cmp, v_cmp of one dtype, got {q.dtype}, {k_cmp.dtype}, "
                         f"{None if v_cmp is None else v_cmp.dtype}")
    return n, hq, hkv, d


def _common(q: torch.Tensor, hq: int, hkv: int, d: int) -> dict:
    hs = hq // hkv
    return {"HQ": hq, "HS": hs, "HS_PAD": triton.next_power_of_2(hs), "D": d,
            "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32"}


def _paper_heads(meta: dict) -> bool:
    """D ≤ 32 and 16 query heads per kv head (the paper's shape): where the register caps and the top-k's lists
    were tuned; ptxas spills several times more elsewhere, so other shapes run uncapped."""
    return meta["BLOCK_D"] <= 32 and meta["HS_PAD"] == 16


def _block_t(rows: int, hs_pad: int, minimum: int = 1) -> int:
    return max(minimum, rows // hs_pad)


def cmp_attention_fwd(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, layout: SSALayout,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_cmp [N, Hq, D], lse [N, Hq] float32)``; inputs contiguous, see ``compressed_attention_ref``."""
    n, hq, hkv, d = _check(q, k_cmp, v_cmp)
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    if n == 0:
        return o, lse
    meta = _common(q, hq, hkv, d)
    cfg = CONFIG["fwd"]
    block_t = _block_t(cfg["rows"], meta["HS_PAD"])
    grid = (triton.cdiv(layout.max_seqlen, block_t), layout.batch_size, hkv)
    shift = cfg.get("shift", "online")
    if shift not in ("online", "bound"):
        raise ValueError(f"expected shift 'online' or 'bound' in the compressed forward config, got {shift!r}")
    bound = shift == "bound" and q.dtype != torch.float16  # float16 probabilities underflow (see block_attn)
    kmax = segment_max_norm(k_cmp, layout.cu_cmp) if bound else lse
    tuned = q.element_size() == 2 and _paper_heads(meta)  # the register cap: 16-bit inputs of the paper's shape
    _cmp_fwd_kernel[grid](q, k_cmp, v_cmp, o, lse, layout.cu_seqlens, layout.cu_cmp, kmax,
                          q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), o.stride(0), o.stride(1),
                          scale * LOG2E, HKV=hkv, BLOCK_T=block_t, BLOCK_C=cfg["BLOCK_C"],
                          EXP2=resolve_mode(cfg.get("exp2", "mufu"), q.device), SPLIT=cfg.get("split", False),
                          BOUND=bound, ROWSUM=rowsum_mode(cfg, bound),
                          FAST_LOG2=fast_math(q.device),
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          **(max_registers(cfg, q.device) if tuned else {}), **meta)
    return o, lse


def cmp_select_topk(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SSALayout, topk: int,
                    scale: float) -> torch.Tensor:
    """int32 ``[N, Hkv, topk]`` best selection blocks per (token, kv head), best first, -1 padding."""
    n, hq, hkv, d = _check(q, k_cmp)
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"expected 1 <= topk <= {MAX_TOPK} for the triton SSA kernels, got {topk}")
    idx = torch.empty(n, hkv, topk, dtype=torch.int32, device=q.device)
    if n == 0:
        return idx
    meta = _common(q, hq, hkv, d)
    one = layout.m_cmp == layout.m_slc
    cfg = CONFIG["topk" if one else "topk_seg"]
    common = dict(HKV=hkv, BLOCK_J=cfg["BLOCK_J"], BLOCK_C=cfg["BLOCK_C"], TOPK=topk,
                  TOPK_PAD=triton.next_power_of_2(topk), ONE_CMP_PER_SLC=one, num_warps=cfg["num_warps"],
                  **max_registers(cfg, q.device), **meta)
    args = (q, k_cmp, lse, idx, layout.cu_seqlens, layout.cu_slc, layout.slc_cmp_offsets, layout.cmp_slc,
            q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), scale * LOG2E)
    if cfg["variant"] == "dot":
        m_split = cfg.get("m_split", 1)
        if m_split not in (1, 2, 4):
            raise ValueError(f"expected m_split 1, 2 or 4 in the top-k config, got {m_split}")
        # int32 keys keep 23 − id_bits mantissa bits of a score: used while that is at least float16's 11 (ids are
        # local selection-block ids)
        id_bits = max(1, (layout.max_slc - 1).bit_length())
        key32 = cfg.get("key32", False) and id_bits <= KEY32_MAX_ID_BITS
        limit = (torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
                 if q.device.type == "cuda" else None)
        _, stages, m_split, block_t = _topk_fit(
            cfg["rows"], cfg["num_stages"], m_split, meta["HS_PAD"], limit, block_d=meta["BLOCK_D"],
            block_j=cfg["BLOCK_J"], block_c=cfg["BLOCK_C"], esz=q.element_size(), lse_dot=cfg.get("lse_dot", False),
            one_cmp_per_slc=one)
        grid = (triton.cdiv(layout.max_seqlen, block_t), layout.batch_size, hkv)
        # several lists with counted rounds only (skip and round-by-round insertion keep one); a list takes at
        # least two rows of a tile. Lists and the register cap are tuned for int32 keys, D <= 32 and 16 heads per
        # group (the v1.1 shape): ptxas spills 3-6x more elsewhere, so other shapes keep one list and no cap
        lists = min(cfg.get("lists", 1), cfg["BLOCK_J"] // 2)
        if cfg.get("skip", True) or not cfg.get("counted", False):
            lists = 1
        tuned = key32 and _paper_heads(meta)
        if not tuned:
            lists = 1
        if not (tuned and q.element_size() == 2):  # float32 (IEEE dots, FMA pipe) spills 300+ bytes at the cap
            common.pop("maxnreg", None)
        if lists > 1 and (cfg["BLOCK_J"] % lists or (lists == cfg["BLOCK_J"] // 2 and cfg["BLOCK_J"] % 16)):
            raise ValueError(f"expected lists dividing BLOCK_J (lists = BLOCK_J / 2: BLOCK_J a multiple of 16) in "
                             f"the top-k config, got {cfg}")
        head_sum = cfg.get("head_sum", "dot")
        if head_sum not in ("dot", "regs"):
            raise ValueError(f"expected head_sum 'dot' or 'regs' in the top-k config, got {head_sum!r}")
        # the in-register head sum needs at least two heads of a chunk per thread (see _token_rows_lanes); 16-bit
        # inputs only: with float32 (IEEE dots on the FMA pipe, no wgmma layout) two GPU test cases at 16 heads per
        # group never finished on an H200 (session 17, not diagnosed), so float32 keeps the group matmul
        sum_regs = head_sum == "regs" and meta["HS_PAD"] // m_split >= 2 and q.element_size() == 2
        _cmp_topk_dot_kernel[grid](*args, id_bits, BLOCK_T=block_t, P_FP16=q.dtype != torch.float32,
                                   SKIP=cfg.get("skip", True), EXP2=resolve_mode(cfg.get("exp2", "mufu"), q.device),
                                   KEY32=key32, M_SPLIT=m_split, COUNTED=cfg.get("counted", False),
                                   LSE_DOT=cfg.get("lse_dot", False), LISTS=lists, SUM_REGS=sum_regs,
                                   FIXED_ROUNDS=cfg.get("fixed_rounds", False) and lists == cfg["BLOCK_J"] // 2,
                                   num_stages=stages, **common)
    else:
        # the one-hot segment sum is a tl.dot, whose M dimension must be >= 16
        block_t = _block_t(cfg["rows"], meta["HS_PAD"], 1 if one else 16)
        grid = (triton.cdiv(layout.max_seqlen, block_t), layout.batch_size, hkv)
        _cmp_topk_kernel[grid](*args, BLOCK_T=block_t, num_stages=cfg["num_stages"], **common)
    return idx


def _topk_block_t(rows: int, hs_pad: int, m_split: int) -> int:
    # tokens are the N dimension of the group-sum tl.dot: at least 16 (per row chunk: M_SPLIT · 16 rows)
    return max(_block_t(rows, hs_pad, 16), triton.next_power_of_2(triton.cdiv(16 * m_split, hs_pad)))


def _topk_smem_bytes(block_t: int, hs_pad: int, block_d: int, block_j: int, block_c: int, m_split: int, stages: int,
                     esz: int, lse_dot: bool, one_cmp_per_slc: bool) -> int:
    """Upper estimate of the dot top-k kernel's shared memory: the pipelined key tiles, the rows' operands (qᵀ, the
    LSE shift, the 0/1 group matrix), the one-hot segment operands (m_cmp < m_slc), reduction and staging scratch
    (ptxas for sm_90 at the bf16 v1.1 default: 36 KB against this 61 KB)."""
    block_m = block_t * hs_pad
    p_esz = 2 if esz == 2 else 4  # probabilities in float16 for 16-bit inputs
    width = block_j if one_cmp_per_slc else block_c
    keys = stages * width * block_d * esz
    operands = block_m * block_d * esz + (16 * block_m * esz if lse_dot else 0) + block_m * block_t * p_esz
    segment = 0 if one_cmp_per_slc else (block_j * block_c + block_c * block_t) * 4
    scratch = block_j * block_t * 8 + width * (block_m // m_split) * p_esz
    return keys + operands + segment + scratch


def _topk_fit(rows: int, stages: int, m_split: int, hs_pad: int, limit: int | None,
              **shape) -> tuple[int, int, int, int]:
    """(rows, stages, row chunks, tokens per program) of the dot top-k within ``limit`` bytes of shared memory
    (None: no limit). float32 operands, few heads per group (many tokens per program) or wide heads can exceed it
    with the default config, so fewer stages, then fewer rows, then fewer row chunks. Decided on the host from
    ``_topk_smem_bytes`` (``shape``: its other arguments): no failed launch, no sync, safe inside a CUDA-graph
    capture."""
    while True:
        block_t = _topk_block_t(rows, hs_pad, m_split)
        if limit is None or _topk_smem_bytes(block_t, hs_pad, m_split=m_split, stages=stages, **shape) <= limit:
            return rows, stages, m_split, block_t
        if stages > 1:
            stages = 1
        elif block_t > 16 and _topk_block_t(rows // 2, hs_pad, m_split) < block_t:
            rows //= 2
        elif m_split > 1:
            m_split //= 2
        else:
            return rows, stages, m_split, block_t


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few chunks keep it fast while still exercising the partial sums


def cmp_attention_bwd(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, do: torch.Tensor, layout: SSALayout,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [N, Hq, D], dk_cmp [NBc, Hkv, D], dv_cmp [NBc, Hkv, D])``; deterministic."""
    n, hq, hkv, d = _check(q, k_cmp, v_cmp)
    nbc = k_cmp.shape[0]
    do = do.contiguous()
    dq = torch.empty_like(q)
    if n == 0:
        return dq, torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    delta = row_dot(o, do)  # [N, Hq] rowsum(o · do)
    meta = _common(q, hq, hkv, d)

    cfg = CONFIG["bwd_dq"]
    block_t = _block_t(cfg["rows"], meta["HS_PAD"])
    grid = (triton.cdiv(layout.max_seqlen, block_t), layout.batch_size, hkv)
    _cmp_bwd_dq_kernel[grid](q, k_cmp, v_cmp, do, lse, delta, dq, layout.cu_seqlens, layout.cu_cmp,
                             q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), scale * LOG2E, scale,
                             BLOCK_T=block_t, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"], **max_registers(cfg, q.device), **meta)

    cfg = CONFIG["bwd_dkdv"]
    block_t = _block_t(cfg["rows"], meta["HS_PAD"])
    key_tiles = triton.cdiv(layout.max_cmp, cfg["BLOCK_C"])
    programs = key_tiles * layout.batch_size * hkv
    n_chunks = math.ceil(cfg["programs_per_sm"] * _num_sms(q.device) / programs)
    n_chunks = max(1, min(n_chunks, triton.cdiv(layout.max_seqlen, block_t)))
    dk_part = torch.zeros(n_chunks, nbc, hkv, d, dtype=torch.float32, device=q.device)
    dv_part = torch.zeros_like(dk_part)
    grid = (key_tiles, layout.batch_size, hkv * n_chunks)
    _cmp_bwd_dkdv_kernel[grid](q, k_cmp, v_cmp, do, lse, delta, dk_part, dv_part, layout.cu_seqlens, layout.cu_cmp,
                               q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
                               dk_part.stride(0), dk_part.stride(1), dk_part.stride(2), scale * LOG2E, scale,
                               HKV=hkv, N_CHUNKS=n_chunks, BLOCK_T=block_t, BLOCK_C=cfg["BLOCK_C"],
                               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                               **max_registers(cfg, q.device), **meta)
    # fixed-order sum over chunks: deterministic
    return dq, dk_part.sum(0).to(k_cmp.dtype), dv_part.sum(0).to(v_cmp.dtype)


class CompressedAttentionFunction(torch.autograd.Function):
    """Autograd for :func:`cmp_attention_fwd`; returns ``(o_cmp, lse)`` (lse carries no gradient)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, layout, scale):  # type: ignore[override]
        q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
        o, lse = cmp_attention_fwd(q, k_cmp, v_cmp, layout, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):  # type: ignore[override]
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = cmp_attention_bwd(q, k_cmp, v_cmp, o, lse, do, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, layout: SSALayout,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return CompressedAttentionFunction.apply(q, k_cmp, v_cmp, layout, scale)


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, layout: SSALayout, topk: int,
                  scale: float) -> torch.Tensor:
    return cmp_select_topk(q.detach().contiguous(), k_cmp.detach().contiguous(), lse.detach().contiguous(), layout,
                           topk, scale)
