"""Triton kernels for block attention (selection and window), forward and deterministic backward.

Dimension legend: N tokens, Hq / Hkv heads, G = Hq // Hkv query heads per kv head, D head dim, NB blocks,
S slots per (query, kv head), E = N·Hkv·S entries, one per (query i, kv head g, slot s) with flat index
``f = (i·Hkv + g)·S + s``.

Design (key-stationary, "block-major"). The (query, slot) entries are grouped into one list per (kv head g,
block b): the queries that selected b through g, in ascending query order (a stable sort on GPU). A tile is
``BLOCK_M`` rows = ``BLOCK_M // G_PAD`` entries of one list × the G query heads of kv head g, so ``tl.dot``
gets M = 64…128 even though every query has its own selection, and each block's keys are read once per tile
instead of once per query.

- Forward: one program per tile loops over the block's keys in ``BLOCK_N`` chunks (exp2, fp32 accumulation)
  and writes the tile's normalised partial output and LSE per entry; a combine kernel merges the S partials of
  each (query, kv head) by their LSEs. Window attention is the case S = 1, where the partial is the output and
  no combine runs. The softmax shift is the online running max, or (``shift: "bound"``) fixed per row before the
  loop at ``scale · |q| · max ‖k‖`` over the block (``segment_max_norm``): no logit exceeds it (Cauchy–Schwarz),
  so nothing is rescaled; a tile whose row sum stays below 2⁻⁶⁴ reruns with the online softmax. With
  ``shift: "first"`` (the selection's and the window's default) the fixed shift is each row's largest logit of the
  block's first key chunk: every row sum is ≥ 1, no norms are needed, and a tile whose sums overflow (a later logit
  more than 127 binades above it) reruns with the online softmax. By default that first chunk is the block's
  masked remainder and every later chunk is whole (one special chunk per block).
- Backward: Δ = rowsum(O·dO); dQ mirrors the forward (partial dQ per entry, then a sum over slots); dK/dV
  runs one program per (block key tile, kv head) that loops over the block's whole entry list, so each key
  row is written by exactly one program: deterministic, no atomics, no per-head replicated buffers. A long list
  (``DKDV_SPLIT``) runs in chunks, one program each, whose float32 partials a second kernel sums in chunk order.

Partial outputs (selection forward) are stored in 16 bits for 16-bit inputs: float16, whose 2⁻¹¹ rounding is
8× finer than the bfloat16 output's; a partial output is a convex combination of value rows, so it overflows
float16 only if some |v| does, and for bfloat16 inputs with max |v| > 60000 (checked on the device, no host
sync) the same buffer holds bfloat16 bits instead. float32 inputs keep float32 partials. The backward's partial
dQ (unbounded range: no float16) is bfloat16 for bfloat16 inputs, else float32.

Limits: D ≤ 128 (tiles shrink for D > 64); block ids outside [0, NB) are treated as empty slots; the partial
buffers take ``E·G·D`` elements (selection only), e.g. 2.2 GB in 16 bits (4.4 GB in float32) at N = 134k,
Hq 32 / Hkv 2 / D 32, S 8. Offsets are trusted (not synced to the host): they must lie in [0, N].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._exp2 import exp2, fast_math, log2, resolve_mode

LOG2E = 1.4426950408889634

# Launch parameters: rows (entries × query heads) per tile, keys per chunk, warps, pipeline depth.
# Tuned on an H200 at N = 134k, Hq 32 / Hkv 2 / D 32 (benchmarks/bench_block_attn.py --sweep): 32-key chunks
# waste less on ~135-token blocks than 64 or 128.
# exp2: the forward's exp mode (d3s2.ops._exp2); split: only the keys after a block's last whole BLOCK_N chunk are
# masked, in chunks of TAIL_N (None: BLOCK_N). H200, N = 134k (bench_ssa.py --sweep slc, session 4): split 2 %
# faster, then 3 stages another 5 % (1 stage +11 %, 8 warps +16 %, BLOCK_M 64 +1 %); FMA-pipe exps slower (mix4
# +2 %, mix +21 %, poly +32 %), 64-key chunks with a 16-key tail +34 %.
# shift: "online" (running max, rescaled sums), "bound" (a fixed per-row shift from |q| and the block's largest
# key norm: no max, no rescaling) or "first" (fixed at each row's largest logit of the block's first key chunk: no
# norms, no key-norm pass; with split); rowsum: "reduce" (per-row adds, each chunk's row sums finished across the
# four lanes of a quad by shuffles), "lanes" (per-lane partial row sums, finished once after the key loop:
# ``lane_row_sums``) or, with a fixed shift, "dot" (P · ones on the tensor cores, in the P·V pass); maxnreg
# (optional): registers per thread capped (ptxas), for more CTAs per SM; tile_table: each tile's rows and key range
# from one row of a per-tile table (fewer dependent loads per tile); masked_chunk (shift "first"): "last" (the first
# chunk whole when the block has BLOCK_N keys, a masked tail) or "first" (the first chunk is the block's masked
# remainder: one special chunk per block instead of two).
# H200, N = 134k, selection forward (session 6, ms): online 4.77; bound + dot 5.29 (149 registers per thread: 3 CTAs
# per SM); bound + reduce 4.61-4.64 (122: 4 CTAs), with registers capped at 96 (5 CTAs, no spill in the loop) 4.45;
# + 16-key tails 4.54; 16-key chunks 5.14; + the tile table 4.44 (a wash). Session 15 (interleaved, 4 rounds):
# first 4.109-4.134 against bound 4.181-4.208 (this default; the window: first 0.649-0.652 against online 0.617-0.622)
# Session 18 (interleaved, scripts/gpu/ssa18.sh, ssa18_3.sh): rowsum "lanes" (ptxas sm_90: 204 → 191 instructions
# per key chunk, no shuffle) 4.045-4.053 against 4.082-4.085 ms (the online window with "lanes": 0.624-0.627 against
# 0.611-0.614, its rescale factor converted between layouts by shuffles); then masked_chunk "first" (1928 against
# 2380 lines of SASS) 3.81-3.84 against 4.02-4.05 ms.
FWD_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "exp2": "mufu", "split": True,
              "TAIL_N": None, "shift": "first", "rowsum": "lanes", "masked_chunk": "first", "tile_table": False,
              "maxnreg": 96}
# Window attention's forward (S = 1: outputs written directly); None: FWD_CONFIG. H200, N = 134k, 8³ windows
# (bench_ssa.py --sweep win, session 5): BLOCK_M 64 0.682 ms against FWD_CONFIG's 0.732 (2 stages 0.713, BLOCK_M 64
# with 2 warps 0.712, BLOCK_M 256 0.915).
# Session 6: the window stays online (bound + dot 0.81, bound + reduce 0.73 against 0.68-0.72 ms: 66 registers, its
# occupancy is not the limit); the tile table 0.672 against 0.682 and 16-key tails 0.676: within the spread.
# Session 18 (interleaved, scripts/gpu/ssa18_4.sh): the selection's shift from the first chunk with that chunk the
# window's masked remainder 0.589-0.594 ms, with per-lane row sums 0.581-0.582 (this default), against the online
# softmax's 0.618-0.620 (session 15, with the masked chunk last: 0.649-0.652).
# Session 19 (interleaved, scripts/gpu/ssa19_3.sh): 128-row tiles of two warpgroups (8 warps) capped at 64 registers
# (4 CTAs, 32 warps per SM) 0.556-0.557 ms against 0.581-0.585 (8 warps at 80 or 96 registers: 0.63; the selection
# at 8 warps: 4.20-5.85 against 3.83). "maxnreg_max_d": the cap only up to that head dim (ptxas cannot fit a
# 128-row D = 128 accumulator in 64 registers).
WIN_FWD_CONFIG: dict | None = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3, "exp2": "mufu",
                               "split": True, "TAIL_N": None, "shift": "first", "rowsum": "lanes",
                               "masked_chunk": "first", "maxnreg": 64, "maxnreg_max_d": 32}
# Backward, shared by the selection and the window. H200, v1.1, N = 134k (session 16, scripts/gpu/ssa16_5.sh, autograd
# backward incl. the partial-dQ sum and the chunk sums): dQ with 3 stages selection 11.76-11.83 against 12.06-12.12
# ms, window 2.47 against 2.55; dK/dV on fewer query rows per step is slower despite the occupancy (ptxas sm_90: 252
# registers per thread at 128 rows, 126 at 32): 64 rows 12.16-12.21, 32 14.35-14.48, 16 with 3 stages 17.62-17.82
BWD_DQ_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
BWD_DKDV_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# dK/dV of the selection: a list longer than ``split_entries`` entries is cut into up to ``max_chunks`` chunks, one
# program each, whose float32 partials a second kernel sums in chunk order (deterministic). Without it one program
# loops over the whole list: a sparse DiT at initialisation selects some blocks from most queries (longest list 89k
# entries against a mean of 1.1k at N = 134k), and that program alone set the kernel's time.
DKDV_SPLIT = {"split_entries": 4096, "max_chunks": 16}
# Combine of the S partials per (query, kv head): (pair, head) rows per program, warps, and "unroll": the slot loop
# unrolled at compile time (S a constexpr: all S loads of a program in flight at once) or a runtime loop.
# Session 6 (selection forward, ms): unrolled 4.61 against 4.67 (the combine alone 0.64 against 0.68: 2.6 GB at
# 4.1 TB/s); 128-row programs 4.94, 32-row 4.40 against 4.42.
# Session 10: 32-row programs 4.275 against 4.320 ms (the sweep's 1 % rule; session 6: 4.40 against 4.42).
COMBINE_CONFIG = {"rows": 32, "num_warps": 4, "unroll": True}
ROW_DOT_ELEMS = 8192  # elements per program of the Δ = rowsum(O·dO) kernel
PLAN_BLOCK = 1024  # entries per program of the selection plan's key kernel
SEGMENT_NORM_TOKENS = 64  # tokens per step of the segment max-norm kernel (the BOUND forwards' shift)
BIG_VALUES_BLOCK = 8192  # values per program of the |v| check of 16-bit partials
# Storage of the forward's partial outputs for 16-bit inputs: torch.float16 (see the module docstring: float16,
# or bfloat16 bits when |v| is out of float16's range) or torch.float32; float32 inputs always use float32.
PARTIAL_DTYPE = torch.float16
F16_SAFE_ABS = 60000.0  # largest |v| stored as float16 partials (float16 max 65504, minus rounding of P)
# Partial dQ per entry for bfloat16 inputs: bfloat16 (half the 2·E·G·D partial traffic of float32; each partial
# is rounded like the bfloat16 dq it sums into) or torch.float32. Other inputs always use float32.
DQ_PARTIAL_DTYPE = torch.bfloat16


@triton.jit
def _list_head_block(lst_c, NB, HKV: tl.constexpr):
    """(kv head, block) of list ``lst_c = head · NB + block`` by comparisons: no runtime integer division (a ~20
    instruction sequence through the float reciprocal) on the tile's dependent-load path."""
    g = lst_c * 0
    for h in tl.static_range(1, HKV):
        g += (lst_c >= h * NB).to(g.dtype)
    return g, lst_c - g * NB


@triton.jit
def _tile_rows(TILE_LIST, TILE_CUM, LIST_START, LIST_COUNT, t, num_lists, NB, HKV: tl.constexpr,
               G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of tile t: (list id, kv head, block, entry position per row, row mask, head per row)."""
    lst = tl.load(TILE_LIST + t)
    lst_c = tl.minimum(lst, num_lists - 1)
    chunk = t - tl.load(TILE_CUM + lst_c)
    e_lo = tl.load(LIST_START + lst_c)
    e_hi = e_lo + tl.load(LIST_COUNT + lst_c)
    rows = tl.arange(0, BLOCK_M)
    ent = e_lo + chunk * (BLOCK_M // G_PAD) + rows // G_PAD
    head = rows % G_PAD
    row_ok = (ent < e_hi) & (head < G) & (lst < num_lists)
    g, b = _list_head_block(lst_c, NB, HKV)
    return lst, g, b, ent, row_ok, head


@triton.jit
def _table_rows(TABLE, t, num_lists, NB, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """``_tile_rows`` from one row of the tile table (list, first entry, list end, first key, key end): one level
    of dependent loads instead of two before the rows' entries, and the block's key range with it."""
    row = TABLE + t.to(tl.int64) * 8
    lst = tl.load(row)
    e_lo = tl.load(row + 1)
    e_hi = tl.load(row + 2)
    k_lo = tl.load(row + 3)
    k_hi = tl.load(row + 4)
    lst_c = tl.minimum(lst, num_lists - 1)
    rows = tl.arange(0, BLOCK_M)
    ent = e_lo + rows // G_PAD
    head = rows % G_PAD
    row_ok = (ent < e_hi) & (head < G) & (lst < num_lists)
    g, b = _list_head_block(lst_c, NB, HKV)
    return lst, g, b, ent, row_ok, head, k_lo, k_hi


@triton.jit(do_not_specialize=["NB"])  # block counts change with every batch: no recompiles on their value
def _tile_table_kernel(TABLE, CUM, LIST_START, LIST_COUNT, BLOCK_OFF, NB, PER_TILE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Rows CUM[l] … CUM[l + 1] of the tile table for list l: (l, first entry of the tile, list end, block's first
    key, block's key end, 3 × padding)."""
    lst = tl.program_id(0)
    c0 = tl.load(CUM + lst)
    c1 = tl.load(CUM + lst + 1)
    start = tl.load(LIST_START + lst)
    end = start + tl.load(LIST_COUNT + lst)
    b = lst % NB
    k_lo = tl.load(BLOCK_OFF + b)
    k_hi = tl.load(BLOCK_OFF + b + 1)
    for t0 in range(c0, c1, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        ok = t < c1
        row = TABLE + t.to(tl.int64) * 8
        zero = tl.zeros([BLOCK], tl.int32)
        tl.store(row, zero + lst, mask=ok)
        tl.store(row + 1, start + (t - c0) * PER_TILE, mask=ok)
        tl.store(row + 2, zero + end, mask=ok)
        tl.store(row + 3, zero + k_lo, mask=ok)
        tl.store(row + 4, zero + k_hi, mask=ok)


@triton.jit
def _fwd_chunk(q, K, V, start, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV: tl.constexpr, D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, EXP2: tl.constexpr, MASK: tl.constexpr,
               BOUND: tl.constexpr, ROWSUM: tl.constexpr):
    """One softmax step over keys [start, start + BLOCK_N); MASK: the chunk may run past ``k_hi``.

    Online (BOUND False): the scale is folded into the exponent's FMA (max taken over raw logits: the scale is
    positive). BOUND: ``m_i`` is a fixed per-row shift (no max, no rescaling); ROWSUM: see ``softmax_update``."""
    s, vv = _chunk_logits(q, K, V, start, k_hi, g, d, d_ok, HKV, D, BLOCK_N, DOT_PREC, MASK)
    return softmax_update(s, vv, m_i, l_i, acc, scale_log2, DOT_PREC, EXP2, BOUND, ROWSUM)


@triton.jit
def _chunk_logits(q, K, V, start, k_hi, g, d, d_ok, HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PREC: tl.constexpr, MASK: tl.constexpr):
    """Raw logits ``q·kᵀ`` [BLOCK_M, BLOCK_N] (−inf past ``k_hi`` with MASK) and values [BLOCK_N, BLOCK_D] of keys
    [start, start + BLOCK_N)."""
    kn = start + tl.arange(0, BLOCK_N)
    kv_off = (kn * HKV + g) * D
    if MASK:
        k_ok = kn < k_hi
        kt = tl.load(K + kv_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        s = tl.where(k_ok[None, :], s, float("-inf"))
    else:
        kt = tl.load(K + kv_off[None, :] + d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
    if MASK:
        vv = tl.load(V + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        vv = tl.load(V + kv_off[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)
    return s, vv


def rowsum_mode(cfg: dict, fixed_shift: bool) -> str:
    """The ``ROWSUM`` constexpr of a forward launch from its config's "rowsum" ("dot" needs a fixed shift: the online
    softmax falls back to "reduce")."""
    rowsum = cfg.get("rowsum", "reduce")
    if rowsum not in ("reduce", "lanes", "dot"):
        raise ValueError(f"expected rowsum 'reduce', 'lanes' or 'dot' in the attention config, got {rowsum!r}")
    return "reduce" if rowsum == "dot" and not fixed_shift else rowsum


@triton.jit
def lane_row_sums(p):
    """[M, 4] partial row sums of ``p`` [M, N] (N a multiple of 8): entry (r, c) sums the columns 8i + 2c + e, which
    lane c of a quad holds in the wgmma accumulator, so the sums stay in each thread's registers (no shuffle).
    ``tl.sum(·, 1)`` of the accumulated partials, once after the key loop, gives the row sums."""
    p4 = tl.reshape(p, [p.shape[0], p.shape[1] // 8, 4, 2])
    return tl.sum(tl.sum(p4, 3), 1)


@triton.jit
def rowsum_init(BLOCK_M: tl.constexpr, ROWSUM: tl.constexpr):
    """Zero row sums in ``softmax_update``'s form for ROWSUM: [BLOCK_M], or [BLOCK_M, 4] lane partials ("lanes"),
    or an [BLOCK_M, 16] ``P · ones`` accumulator ("dot")."""
    if ROWSUM == "dot":
        return tl.zeros([BLOCK_M, 16], tl.float32)
    elif ROWSUM == "lanes":
        return tl.zeros([BLOCK_M, 4], tl.float32)
    else:
        return tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def rowsum_total(l_i, ROWSUM: tl.constexpr):
    """[BLOCK_M] row sums from ``softmax_update``'s accumulated ``l_i``."""
    if ROWSUM == "reduce":
        return l_i
    else:
        return tl.sum(l_i, 1)


@triton.jit
def softmax_update(s, v, m_i, l_i, acc, scale_log2, DOT_PREC: tl.constexpr, EXP2: tl.constexpr,
                   BOUND: tl.constexpr, ROWSUM: tl.constexpr):
    """Fold one tile of raw logits ``s`` [M, N] and values ``v`` [N, D] into ``(m_i, l_i, acc)``; shared by the
    selection / window forwards and the compressed forward (d3s2.ops.ssa).

    Online (BOUND False): running max, the scale (> 0) folded into the exponent's FMA. BOUND: ``m_i`` is a fixed
    per-row shift ≥ every scaled logit (no max, no rescaling). ROWSUM (``rowsum_init`` makes ``l_i``): "reduce",
    [M] row sums; "lanes", [M, 4] per-lane partial sums (``lane_row_sums``: no shuffles in the loop); "dot" (BOUND
    only), an [M, 16] accumulator of ``P · ones`` (ones in column 0: the row sums on the tensor cores).
    ``rowsum_total`` turns ``l_i`` into row sums."""
    if BOUND:
        p = exp2(s * scale_log2 - m_i[:, None], EXP2)
        pv = p.to(v.dtype)
        if ROWSUM == "dot":
            ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0) + tl.zeros([v.shape[0], 16], tl.float32)
            l_i = tl.dot(pv, ones.to(pv.dtype), l_i, input_precision=DOT_PREC)
        elif ROWSUM == "lanes":
            l_i = l_i + lane_row_sums(p)
        else:
            l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(pv, v, acc, input_precision=DOT_PREC)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = exp2(s * scale_log2 - m_new[:, None], EXP2)
        if ROWSUM == "lanes":
            l_i = l_i * alpha[:, None] + lane_row_sums(p)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _shift_from_chunk(s, vv, l_i, acc, scale_log2, DOT_PREC: tl.constexpr, EXP2: tl.constexpr, ROWSUM: tl.constexpr):
    """The "first" shift: each row's largest scaled logit of chunk ``s`` (0 for a row with no key), then that chunk
    folded into ``(l_i, acc)`` under it. Returns (shift, l_i, acc)."""
    m_i = tl.max(s, 1) * scale_log2
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    return softmax_update(s, vv, m_i, l_i, acc, scale_log2, DOT_PREC, EXP2, True, ROWSUM)


@triton.jit
def _fwd_keys(q, K, V, k_lo, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, EXP2: tl.constexpr, SPLIT: tl.constexpr,
              TAIL_N: tl.constexpr, BOUND: tl.constexpr, ROWSUM: tl.constexpr, FIRST: tl.constexpr,
              MASK_FIRST: tl.constexpr = False):
    """Every key of the block [k_lo, k_hi); SPLIT: whole ``BLOCK_N`` chunks unmasked, the rest in ``TAIL_N``.

    FIRST (with BOUND and SPLIT): the fixed shift ``m_i`` is each row's largest scaled logit of the block's first
    chunk (0 for an empty block), set here: every row sum is then ≥ 1 (no underflow); later logits may exceed it
    (probabilities > 1, exact in float32 up to 2¹²⁷: the caller reruns a tile whose sums overflow).
    MASK_FIRST (with FIRST): the first chunk is the block's remainder, 1 … BLOCK_N keys masked, and every later
    chunk whole: one masked chunk per block that also sets the shift, instead of a first chunk and a masked tail."""
    k_next = k_lo
    if FIRST and MASK_FIRST:
        k_len = k_hi - k_lo
        first_end = tl.where(k_len > 0, k_hi - (k_len - 1) // BLOCK_N * BLOCK_N, k_hi)
        s, vv = _chunk_logits(q, K, V, k_lo, first_end, g, d, d_ok, HKV, D, BLOCK_N, DOT_PREC, True)
        m_i, l_i, acc = _shift_from_chunk(s, vv, l_i, acc, scale_log2, DOT_PREC, EXP2, ROWSUM)
        for start in range(first_end, k_hi, BLOCK_N):
            m_i, l_i, acc = _fwd_chunk(q, K, V, start, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV, D,
                                       BLOCK_N, DOT_PREC, EXP2, False, BOUND, ROWSUM)
        return m_i, l_i, acc
    if FIRST:
        if k_hi - k_lo >= BLOCK_N:
            s, vv = _chunk_logits(q, K, V, k_lo, k_hi, g, d, d_ok, HKV, D, BLOCK_N, DOT_PREC, False)
        else:
            s, vv = _chunk_logits(q, K, V, k_lo, k_hi, g, d, d_ok, HKV, D, BLOCK_N, DOT_PREC, True)
        m_i, l_i, acc = _shift_from_chunk(s, vv, l_i, acc, scale_log2, DOT_PREC, EXP2, ROWSUM)
        k_next = k_lo + BLOCK_N
    if SPLIT:
        k_full = k_lo + (k_hi - k_lo) // BLOCK_N * BLOCK_N
        for start in range(k_next, k_full, BLOCK_N):
            m_i, l_i, acc = _fwd_chunk(q, K, V, start, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV, D,
                                       BLOCK_N, DOT_PREC, EXP2, False, BOUND, ROWSUM)
        for start in range(tl.maximum(k_full, k_next), k_hi, TAIL_N):
            m_i, l_i, acc = _fwd_chunk(q, K, V, start, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV, D,
                                       TAIL_N, DOT_PREC, EXP2, True, BOUND, ROWSUM)
    else:
        for start in range(k_next, k_hi, BLOCK_N):
            m_i, l_i, acc = _fwd_chunk(q, K, V, start, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV, D,
                                       BLOCK_N, DOT_PREC, EXP2, True, BOUND, ROWSUM)
    return m_i, l_i, acc


# Token and block counts change with every batch: not specialised on their values, or each new (÷16, == 1)
# combination recompiles the kernel in the middle of training.
@triton.jit(do_not_specialize=["num_lists", "NB"])
def block_attn_fwd_kernel(
    Q, K, V, PO, PLSE, PBIG,  # q [N, Hq, D], k/v [N, Hkv, D], partial o [E, G, D], partial lse [E, G]
    ENTRY, TILE_LIST, TILE_CUM, LIST_START, LIST_COUNT, BLOCK_OFF, KMAX,  # KMAX [NB, Hkv] float32 (BOUND)
    TABLE,  # int32 [tiles, 8] tile table (TILE_TABLE)
    scale_log2, num_lists, NB,
    S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, PART16: tl.constexpr,
    EXP2: tl.constexpr, SPLIT: tl.constexpr, TAIL_N: tl.constexpr, BOUND: tl.constexpr, ROWSUM: tl.constexpr,
    TILE_TABLE: tl.constexpr, FAST_LOG2: tl.constexpr, FIRST: tl.constexpr, MASK_FIRST: tl.constexpr,
):
    """PART16: PO is int16 holding float16 bits, or bfloat16 bits where the flag ``PBIG[0]`` is set.
    EXP2: exp2 mode (:mod:`d3s2.ops._exp2`); SPLIT: the block's whole ``BLOCK_N``-key chunks run unmasked, the
    remaining keys in masked chunks of ``TAIL_N`` (≤ BLOCK_N: wide chunks without wide padding).
    BOUND: each row's softmax shift is fixed before the key loop, ``scale_log2 · |q| · KMAX[b, g]`` (KMAX: the
    block's largest key norm per kv head; by Cauchy–Schwarz no scaled logit exceeds it): no running max, no
    rescaling. A tile with a row whose sum stays below 2⁻⁶⁴ (the bound more than 64 binades above the row's
    largest logit) reruns with the online softmax. ROWSUM: see ``softmax_update``. TILE_TABLE: the tile's rows
    and key range from one row of ``TABLE`` (``_table_rows``) instead of the list tables. FAST_LOG2: the LSE's log2
    by the MUFU approximation (:func:`d3s2.ops._exp2.log2`). FIRST (with BOUND): the shift is each row's largest
    logit of the block's first key chunk instead (``_fwd_keys``; no KMAX, no |q|); a tile whose row sums overflow
    (a later logit more than 127 binades above it) reruns with the online softmax. MASK_FIRST (with FIRST): that
    first chunk is the block's masked remainder, every later one whole (``_fwd_keys``)."""
    t = tl.program_id(0)
    if TILE_TABLE:
        lst, g, b, ent, row_ok, head, k_lo, k_hi = _table_rows(TABLE, t, num_lists, NB, HKV, G, G_PAD, BLOCK_M)
    else:
        lst, g, b, ent, row_ok, head = _tile_rows(TILE_LIST, TILE_CUM, LIST_START, LIST_COUNT, t, num_lists, NB,
                                                  HKV, G, G_PAD, BLOCK_M)
        k_lo = tl.load(BLOCK_OFF + b)
        k_hi = tl.load(BLOCK_OFF + b + 1)
    if lst < num_lists:
        f = tl.load(ENTRY + ent, mask=row_ok, other=0)
        if BOUND and not FIRST:  # issued before the query rows' loads: its latency overlaps theirs
            shift_scale = tl.load(KMAX + b * HKV + g) * scale_log2
        qi = f // (HKV * S)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        qh = qi * (HKV * G) + g * G + head  # row of q viewed as [N·Hq, D]
        q = tl.load(Q + qh[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if BOUND:
            if FIRST:
                m_i = tl.zeros([BLOCK_M], tl.float32)  # set from the first chunk's logits
            else:
                qf = q.to(tl.float32)
                m_i = tl.sqrt(tl.sum(qf * qf, 1)) * shift_scale
            m_i, l_i, acc = _fwd_keys(q, K, V, k_lo, k_hi, g, d, d_ok, m_i, rowsum_init(BLOCK_M, ROWSUM), acc,
                                      scale_log2, HKV, D, BLOCK_N, DOT_PREC, EXP2, SPLIT, TAIL_N, True, ROWSUM, FIRST,
                                      MASK_FIRST)
            l_i = rowsum_total(l_i, ROWSUM)
            if FIRST:  # sums ≥ 1: only an overflow (inf) can spoil them
                rerun = tl.max(tl.where(row_ok, l_i, 0.0), 0) > 1e38
            else:  # a sum below 2^-64: the bound far above the row's logits (rare)
                rerun = (k_hi > k_lo) & (tl.min(tl.where(row_ok, l_i, 1.0), 0) < 5.421010862427522e-20)
            if rerun:
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                m_i, l_i, acc = _fwd_keys(q, K, V, k_lo, k_hi, g, d, d_ok, m_i, l_i, acc, scale_log2, HKV, D,
                                          BLOCK_N, DOT_PREC, EXP2, SPLIT, TAIL_N, False, "reduce", False)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # ROWSUM is not "dot" here (``rowsum_mode``)
            m_i, l_i, acc = _fwd_keys(q, K, V, k_lo, k_hi, g, d, d_ok, m_i, rowsum_init(BLOCK_M, ROWSUM), acc,
                                      scale_log2, HKV, D, BLOCK_N, DOT_PREC, EXP2, SPLIT, TAIL_N, False, ROWSUM, False)
            l_i = rowsum_total(l_i, ROWSUM)
        has = l_i > 0  # an empty block gives no keys: partial o 0, lse -inf
        l_safe = tl.where(has, l_i, 1.0)
        o = acc * (1.0 / l_safe)[:, None]  # one reciprocal per row, not a division per element
        lse = tl.where(has, (m_i + log2(l_safe, FAST_LOG2)) * 0.6931471805599453, float("-inf"))
        prow = f.to(tl.int64) * G + head
        po_ptrs = PO + prow[:, None] * D + d[None, :]
        po_mask = row_ok[:, None] & d_ok[None, :]
        if PART16:
            # a scalar branch: only one of the two conversions runs (conversions share the slow MUFU-rate pipe)
            if tl.load(PBIG) != 0:
                tl.store(po_ptrs, o.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=po_mask)
            else:
                tl.store(po_ptrs, o.to(tl.float16).to(tl.int16, bitcast=True), mask=po_mask)
        else:
            tl.store(po_ptrs, o.to(PO.dtype.element_ty), mask=po_mask)
        tl.store(PLSE + prow, lse, mask=row_ok)


@triton.jit
def _combine_slot(P, PLSE, IDX, pair, h, d, s, S, NB, row_ok, rd_ok, big, acc, m, w_sum, G: tl.constexpr,
                  D: tl.constexpr, IS_SUM: tl.constexpr, PART16: tl.constexpr):
    """Slot s of every row's pair merged into (acc, m, w_sum): summed (IS_SUM) or softmax-weighted by its LSE."""
    bi = tl.load(IDX + pair * S + s, mask=row_ok, other=-1)
    ok = row_ok & (bi >= 0) & (bi < NB)
    prow = (pair.to(tl.int64) * S + s) * G + h
    if PART16:
        raw = tl.load(P + prow[:, None] * D + d[None, :], mask=ok[:, None] & rd_ok, other=0)
        part = tl.where(big, raw.to(tl.bfloat16, bitcast=True).to(tl.float32),
                        raw.to(tl.float16, bitcast=True).to(tl.float32))
    else:
        part = tl.load(P + prow[:, None] * D + d[None, :], mask=ok[:, None] & rd_ok, other=0.0)
    if IS_SUM:
        acc += part
    else:  # online merge: rescale what was summed so far to the running max
        lse_s = tl.load(PLSE + prow, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * part
        w_sum = w_sum * alpha + w
        m = m_new
    return acc, m, w_sum


@triton.jit(do_not_specialize=["num_pairs", "NB"])
def block_attn_combine_kernel(
    P, PLSE, PBIG, IDX, OUT, LSE,  # partial [E, G, D], partial lse [E, G], block_idx [N·Hkv, S], out [N, Hq, D]
    num_pairs, S, NB,
    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    IS_SUM: tl.constexpr, PART16: tl.constexpr, S_UNROLL: tl.constexpr,
):
    """Merge the S partials of each (query, kv head) pair: softmax-weighted by LSE (forward) or summed (dQ).

    A program takes ``BLOCK_R // G_PAD`` pairs × G heads as rows. PART16: as in the forward kernel. S_UNROLL:
    0, or S itself as a compile-time constant (the slot loop unrolled)."""
    rows = tl.arange(0, BLOCK_R)
    pair = tl.program_id(0) * (BLOCK_R // G_PAD) + rows // G_PAD  # i·Hkv + g
    h = rows % G_PAD
    d = tl.arange(0, BLOCK_D)
    row_ok = (pair < num_pairs) & (h < G)
    rd_ok = row_ok[:, None] & (d < D)[None, :]
    out_row = pair.to(tl.int64) * G + h  # row of out viewed as [N·Hq, D]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_R], tl.float32)
    big = tl.load(PBIG) != 0 if PART16 else False
    if S_UNROLL:
        for s in tl.static_range(S_UNROLL):
            acc, m, w_sum = _combine_slot(P, PLSE, IDX, pair, h, d, s, S, NB, row_ok, rd_ok, big, acc, m, w_sum, G, D,
                                          IS_SUM, PART16)
    else:
        for s in range(S):
            acc, m, w_sum = _combine_slot(P, PLSE, IDX, pair, h, d, s, S, NB, row_ok, rd_ok, big, acc, m, w_sum, G, D,
                                          IS_SUM, PART16)
    if not IS_SUM:
        has = w_sum > 0
        acc = acc / tl.where(has, w_sum, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, w_sum, 1.0)), float("-inf"))
        tl.store(LSE + out_row, lse, mask=row_ok)
    tl.store(OUT + out_row[:, None] * D + d[None, :], acc.to(OUT.dtype.element_ty), mask=rd_ok)


@triton.jit
def _segment_max_norm_kernel(K, OFF, OUT, HKV: tl.constexpr, HKV_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """OUT[s, g] = max over tokens i of segment s of ‖K[i, g, :]‖ (0 if empty); K contiguous [N, HKV, D]."""
    seg = tl.program_id(0)
    lo = tl.load(OFF + seg)
    hi = tl.load(OFF + seg + 1)
    t = tl.arange(0, BLOCK_T)[:, None, None]
    g = tl.arange(0, HKV_PAD)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    best = tl.zeros([BLOCK_T, HKV_PAD], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tok = t0 + t
        x = tl.load(K + (tok.to(tl.int64) * HKV + g) * D + d, mask=(tok < hi) & (g < HKV) & (d < D),
                    other=0.0).to(tl.float32)
        best = tl.maximum(best, tl.sum(x * x, 2))
    gg = tl.arange(0, HKV_PAD)
    tl.store(OUT + seg * HKV + gg, tl.sqrt(tl.max(best, 0)), mask=gg < HKV)


@triton.jit(do_not_specialize=["R"])
def row_dot_kernel(A, B, OUT, R, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[r] = Σ_d A[r, d]·B[r, d] in float32 for contiguous [R, D] A, B (Δ of the attention backward)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < R
    ptrs = r.to(tl.int64)[:, None] * D + d[None, :]
    mask = r_ok[:, None] & (d < D)[None, :]
    a = tl.load(A + ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r, tl.sum(a * b, 1), mask=r_ok)


@triton.jit(do_not_specialize=["num_lists", "NB"])
def block_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PDQ,  # lse/delta [N, Hq] fp32, partial dq [E, G, D]
    ENTRY, TILE_LIST, TILE_CUM, LIST_START, LIST_COUNT, BLOCK_OFF,
    scale, scale_log2, num_lists, NB,
    S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    t = tl.program_id(0)
    lst, g, b, ent, row_ok, head = _tile_rows(TILE_LIST, TILE_CUM, LIST_START, LIST_COUNT, t, num_lists, NB, HKV,
                                              G, G_PAD, BLOCK_M)
    if lst < num_lists:
        f = tl.load(ENTRY + ent, mask=row_ok, other=0)
        qi = f // (HKV * S)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        qh = qi * (HKV * G) + g * G + head
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + qh[:, None] * D + d[None, :], mask=qd_ok, other=0.0)
        do = tl.load(DO + qh[:, None] * D + d[None, :], mask=qd_ok, other=0.0)
        lse2 = tl.load(LSE + qh, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + qh, mask=row_ok, other=0.0)
        k_lo = tl.load(BLOCK_OFF + b)
        k_hi = tl.load(BLOCK_OFF + b + 1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(k_lo, k_hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            k_ok = kn < k_hi
            kv_off = (kn * HKV + g) * D
            kk = tl.load(K + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(V + kv_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale_log2
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(row_ok[:, None] & k_ok[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=DOT_PREC)
        prow = f.to(tl.int64) * G + head
        tl.store(PDQ + prow[:, None] * D + d[None, :], (dq * scale).to(PDQ.dtype.element_ty), mask=qd_ok)


@triton.jit
def _key_tile(KT_CUM, BLOCK_OFF, t, b, g, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Key tile t of block b for kv head g: (block's first key, key rows, key mask, d, d mask, [N, D] mask, offsets
    of the rows in k/v viewed flat)."""
    k_lo = tl.load(BLOCK_OFF + b)
    k_hi = tl.load(BLOCK_OFF + b + 1)
    kn = k_lo + (t - tl.load(KT_CUM + b)) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kn < k_hi
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    return k_lo, kn, k_ok, d, d_ok, k_ok[:, None] & d_ok[None, :], (kn * HKV + g) * D


@triton.jit(do_not_specialize=["NB", "MAXLEN"])
def block_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PART_K, PART_V,  # PART_K/V float32 [chunk rows · MAXLEN, D] (split lists)
    ENTRY, KT_BLOCK, KT_CUM, LIST_START, LIST_COUNT, BLOCK_OFF, N_CHUNKS, PART_OFF,  # N_CHUNKS/PART_OFF [Hkv·NB]
    scale, scale_log2, NB, MAXLEN,
    S: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """One program per (key tile of a block, kv head, chunk): loops over the chunk's entries of the block's list.

    SPLIT: list l runs in ``N_CHUNKS[l]`` equal chunks (program axis 2; programs past them exit); a list of one chunk
    writes dK/dV, a longer one float32 partials at rows ``(PART_OFF[l] + chunk) · MAXLEN + key − k_lo``."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2)
    b = tl.load(KT_BLOCK + t)
    if b < NB:
        lst = g * NB + b
        e_lo = tl.load(LIST_START + lst)
        e_hi = e_lo + tl.load(LIST_COUNT + lst)
        chunks = tl.load(N_CHUNKS + lst) if SPLIT else 1
        if c < chunks:
            size = (e_hi - e_lo + chunks - 1) // chunks
            e_end = tl.minimum(e_lo + (c + 1) * size, e_hi)
            e_lo = e_lo + c * size
            k_lo, kn, k_ok, d, d_ok, kd_ok, kv_off = _key_tile(KT_CUM, BLOCK_OFF, t, b, g, HKV, D, BLOCK_D, BLOCK_N)
            kk = tl.load(K + kv_off[:, None] + d[None, :], mask=kd_ok, other=0.0)
            vv = tl.load(V + kv_off[:, None] + d[None, :], mask=kd_ok, other=0.0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            rows = tl.arange(0, BLOCK_M)
            head = rows % G_PAD
            for e0 in range(e_lo, e_end, BLOCK_M // G_PAD):
                ent = e0 + rows // G_PAD
                row_ok = (ent < e_end) & (head < G)
                f = tl.load(ENTRY + ent, mask=row_ok, other=0)
                qh = (f // (HKV * S)) * (HKV * G) + g * G + head
                qd_ok = row_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + qh[:, None] * D + d[None, :], mask=qd_ok, other=0.0)
                do = tl.load(DO + qh[:, None] * D + d[None, :], mask=qd_ok, other=0.0)
                lse2 = tl.load(LSE + qh, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + qh, mask=row_ok, other=0.0)
                s = tl.dot(q, tl.trans(kk), input_precision=DOT_PREC) * scale_log2  # [M, N]
                p = tl.exp2(s - lse2[:, None])
                p = tl.where(row_ok[:, None] & k_ok[None, :], p, 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
                dp = tl.dot(do, tl.trans(vv), input_precision=DOT_PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
            if chunks == 1:
                tl.store(DK + kv_off[:, None] + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
                tl.store(DV + kv_off[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=kd_ok)
            else:
                prow = (tl.load(PART_OFF + lst) + c).to(tl.int64) * MAXLEN + (kn - k_lo)
                tl.store(PART_K + prow[:, None] * D + d[None, :], dk * scale, mask=kd_ok)
                tl.store(PART_V + prow[:, None] * D + d[None, :], dv, mask=kd_ok)


@triton.jit(do_not_specialize=["NB", "MAXLEN"])
def _dkdv_chunk_sum_kernel(PART_K, PART_V, DK, DV, KT_BLOCK, KT_CUM, BLOCK_OFF, N_CHUNKS, PART_OFF, NB, MAXLEN,
                           HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK/dV of the key tiles whose list ran in several chunks: the chunks' float32 partials summed in chunk order."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.load(KT_BLOCK + t)
    if b < NB:
        lst = g * NB + b
        chunks = tl.load(N_CHUNKS + lst)
        if chunks > 1:
            k_lo, kn, _, d, _, kd_ok, kv_off = _key_tile(KT_CUM, BLOCK_OFF, t, b, g, HKV, D, BLOCK_D, BLOCK_N)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            base = tl.load(PART_OFF + lst)
            for c in range(chunks):
                prow = (base + c).to(tl.int64) * MAXLEN + (kn - k_lo)
                dk += tl.load(PART_K + prow[:, None] * D + d[None, :], mask=kd_ok, other=0.0)
                dv += tl.load(PART_V + prow[:, None] * D + d[None, :], mask=kd_ok, other=0.0)
            tl.store(DK + kv_off[:, None] + d[None, :], dk.to(DK.dtype.element_ty), mask=kd_ok)
            tl.store(DV + kv_off[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=kd_ok)


# Host side --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockAttnPlan:
    """Entry lists per (kv head, block) and tile tables; built once per call, reused by the backward.

    Attributes:
        entry: int32 ``[E]`` flat entry indices grouped by list (lists in order g·NB + b), valid ones first.
        list_start, list_count: int32 ``[Hkv·NB]`` first position in ``entry`` and length of each list.
        num_slots: S.
        num_blocks: NB.
        max_block_len: a bound on the longest block's tokens, if the caller knows it (else read when needed).
    """

    entry: torch.Tensor
    list_start: torch.Tensor
    list_count: torch.Tensor
    num_slots: int
    num_blocks: int
    max_block_len: int | None = None


@triton.jit(do_not_specialize=["E", "NB"])
def _entry_keys_kernel(IDX, KEY, E, NB, S: tl.constexpr, HKV: tl.constexpr, BLOCK: tl.constexpr):
    """KEY[f] = g·NB + IDX[f] for entry f = (i·HKV + g)·S + s, or HKV·NB (after every list) for an empty slot."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = f < E
    b = tl.load(IDX + f, mask=ok, other=-1)
    g = (f // S) % HKV
    key = tl.where((b >= 0) & (b < NB), g * NB + b, HKV * NB)
    tl.store(KEY + f, key.to(KEY.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["E"])
def _list_ends_kernel(KEYS, ORDER, ENTRY, END, E, BLOCK: tl.constexpr):
    """From the sorted keys [E]: ``END[key] = p + 1`` at the last position p of each key present, and ``ENTRY[p]`` =
    the sort's int64 index as int32 (one pass for what took a cast, an arange and a binary search per list)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = p < E
    key = tl.load(KEYS + p, mask=ok, other=0).to(tl.int32)
    after = tl.load(KEYS + p + 1, mask=ok & (p + 1 < E), other=-1).to(tl.int32)  # keys are >= 0
    tl.store(END + key, p + 1, mask=ok & (key != after))
    tl.store(ENTRY + p, tl.load(ORDER + p, mask=ok, other=0).to(tl.int32), mask=ok)


@triton.jit
def _int_max(a, b):
    return tl.maximum(a, b)


@triton.jit(do_not_specialize=["L"])
def _list_bounds_kernel(END, START, COUNT, L, BLOCK: tl.constexpr):
    """One program: ``START[l]`` = the largest ``END`` of the lists before l (where l begins, empty or not) and
    ``COUNT[l] = max(END[l] − START[l], 0)``; ``END`` is 0 for an empty list."""
    carry = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, L, BLOCK):
        i = c0 + tl.arange(0, BLOCK)
        ok = i < L
        end = tl.load(END + i, mask=ok, other=0)
        before = tl.load(END + i - 1, mask=ok & (i > 0), other=0)
        start = tl.maximum(tl.associative_scan(before, 0, _int_max), carry)
        tl.store(START + i, start, mask=ok)
        tl.store(COUNT + i, tl.maximum(end - start, 0), mask=ok)
        carry = tl.maximum(carry, tl.max(end, 0))


def selection_plan(block_idx: torch.Tensor, num_blocks: int, max_block_len: int | None = None) -> BlockAttnPlan:
    """Group the entries of ``block_idx`` [N, Hkv, S] by (kv head, block) with a stable GPU sort."""
    n, hkv, s = block_idx.shape
    idx = block_idx.to(torch.int32).contiguous()
    sentinel = hkv * num_blocks
    # 16-bit keys where the lists fit (N = 134k: 1989 lists): the radix sort makes half the passes of int32 keys
    kdt = torch.int16 if sentinel <= torch.iinfo(torch.int16).max else torch.int32
    e = idx.numel()
    key = torch.empty(e, dtype=kdt, device=idx.device)  # [E]
    if e:  # one launch for what took seven torch ops (the plan is launch-bound: session 11)
        _entry_keys_kernel[(triton.cdiv(e, PLAN_BLOCK),)](idx, key, e, num_blocks, S=s, HKV=hkv, BLOCK=PLAN_BLOCK,
                                                          num_warps=4)
    keys, order = torch.sort(key, stable=True)  # ascending query order within a list
    # list bounds from where the sorted keys change (no host sync, no binary search per list)
    entry = torch.empty(e, dtype=torch.int32, device=idx.device)
    end = torch.zeros(sentinel + 1, dtype=torch.int32, device=idx.device)  # + the empty slots' key
    start, count = torch.empty(2, sentinel, dtype=torch.int32, device=idx.device)
    if e:
        _list_ends_kernel[(triton.cdiv(e, PLAN_BLOCK),)](keys, order, entry, end, e, BLOCK=PLAN_BLOCK, num_warps=4)
    if sentinel:
        _list_bounds_kernel[(1,)](end, start, count, sentinel, BLOCK=1024, num_warps=4)
    return BlockAttnPlan(entry, start, count, s, num_blocks, max_block_len)


def window_plan(window_offsets: torch.Tensor, n: int, hkv: int) -> BlockAttnPlan:
    """Entries of window attention (S = 1, f = i·Hkv + g); windows are already contiguous, so no sort."""
    dev = window_offsets.device
    nw = window_offsets.numel() - 1
    i = torch.arange(n, device=dev, dtype=torch.int64)
    g = torch.arange(hkv, device=dev, dtype=torch.int64)[:, None]
    entry = (i[None, :] * hkv + g).flatten().to(torch.int32)  # position g·N + i
    off = window_offsets.long()
    start = (g * n + off[None, :-1]).flatten()
    count = (off[1:] - off[:-1]).repeat(hkv)
    return BlockAttnPlan(entry, start.to(torch.int32), count.to(torch.int32), 1, nw)


def max_registers(cfg: dict, device: torch.device, head_dim: int | None = None) -> dict:
    """Launch option capping registers per thread (``cfg["maxnreg"]``: more resident CTAs per SM), for CUDA; with
    ``cfg["maxnreg_max_d"]`` only for a (padded) ``head_dim`` up to that value."""
    if cfg.get("maxnreg") and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        if head_dim is None or head_dim <= cfg.get("maxnreg_max_d", head_dim):
            return {"maxnreg": cfg["maxnreg"]}
    return {}


def segment_max_norm(k: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 ``[S, Hkv]``: the largest row norm ‖k[i, g]‖ over each segment ``[offsets[s], offsets[s + 1])`` of
    ``k`` [N, Hkv, D] (0 for an empty segment): with ``|q|`` a bound of every logit q·k of the segment, the fixed
    softmax shift of the ``BOUND`` forward kernels. One kernel, no host sync (CUDA-graph safe)."""
    k = k.contiguous()
    n_seg = offsets.numel() - 1
    out = torch.empty(max(n_seg, 0), k.shape[1], dtype=torch.float32, device=k.device)
    if n_seg > 0:
        _segment_max_norm_kernel[(n_seg,)](k, offsets, out, HKV=k.shape[1], HKV_PAD=triton.next_power_of_2(k.shape[1]),
                                           D=k.shape[2], BLOCK_D=triton.next_power_of_2(k.shape[2]),
                                           BLOCK_T=SEGMENT_NORM_TOKENS, num_warps=4)
    return out


def _tile_table(plan: BlockAttnPlan, per_tile: int, bound: int, block_offsets: torch.Tensor) -> torch.Tensor:
    """int32 ``[bound, 8]`` tile table of the forward (``_table_rows``); tiles past the last list's are idle (list id
    ``Hkv·NB``, no rows). No host sync."""
    num_lists = plan.list_count.numel()
    cum = _tile_cumsum(plan.list_count, per_tile)
    table = torch.full((bound, 8), num_lists, dtype=torch.int32, device=block_offsets.device)
    if num_lists:
        _tile_table_kernel[(num_lists,)](table, cum, plan.list_start, plan.list_count, block_offsets,
                                         plan.num_blocks, PER_TILE=per_tile, BLOCK=256, num_warps=4)
    return table


@triton.jit(do_not_specialize=["L"])
def _tile_cumsum_kernel(COUNTS, CUM, L, PER_TILE: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``CUM`` [L + 1] = the exclusive cumsum of ceil(COUNTS[l] / PER_TILE), in int32."""
    tl.store(CUM, 0)
    carry = 0
    for c0 in range(0, L, BLOCK):
        i = c0 + tl.arange(0, BLOCK)
        tiles = (tl.load(COUNTS + i, mask=i < L, other=0).to(tl.int32) + (PER_TILE - 1)) // PER_TILE
        tl.store(CUM + 1 + i, tl.cumsum(tiles, 0) + carry, mask=i < L)
        carry += tl.sum(tiles, 0)


@triton.jit(do_not_specialize=["L", "T"])
def _tile_owner_kernel(CUM, OWNER, L, T, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """``OWNER[t]`` for t < T: the number of lists whose tiles end at or before t (``CUM[1:]`` ≤ t: the list that
    holds tile t, or L when t is past the last list's), by a binary search of ``STEPS`` ≥ log2(L + 1) rounds."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + L
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        active = lo < hi
        below = tl.load(CUM + 1 + mid, mask=active, other=0) <= t
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    tl.store(OWNER + t, lo, mask=t < T)


def _tile_cumsum(counts: torch.Tensor, per_tile: int) -> torch.Tensor:
    """int32 ``[L + 1]`` exclusive cumsum of each list's tiles, ceil(count / per_tile) (one launch)."""
    cum = torch.empty(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    _tile_cumsum_kernel[(1,)](counts, cum, counts.numel(), PER_TILE=per_tile, BLOCK=1024, num_warps=4)
    return cum


def _tiles(counts: torch.Tensor, per_tile: int, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile table without a host sync: tile t → its list (or len(counts) if idle), and tiles' cumsum; int32
    (two launches)."""
    cum = _tile_cumsum(counts, per_tile)
    owner = torch.empty(bound, dtype=torch.int32, device=counts.device)
    if bound:
        _tile_owner_kernel[(triton.cdiv(bound, 1024),)](cum, owner, counts.numel(), bound,
                                                        STEPS=counts.numel().bit_length(), BLOCK=1024, num_warps=4)
    return owner, cum


def _meta(q: torch.Tensor, k: torch.Tensor) -> dict:
    g = q.shape[1] // k.shape[1]
    d = q.shape[2]
    return {"G": g, "D": d, "G_PAD": triton.next_power_of_2(g), "BLOCK_D": max(16, triton.next_power_of_2(d)),
            "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32"}


def _block_m(cfg: dict, g_pad: int) -> int:
    return max(cfg["BLOCK_M"], g_pad, 16)


def _fit(cfg: dict, user: dict | None, block_d: int) -> dict:
    """Defaults shrunk for wide heads (fp32 accumulators of [BLOCK_M, D] tiles must fit in registers; 64 rows are
    one warpgroup's)."""
    cfg = dict(cfg)
    if block_d > 64:
        cfg["BLOCK_M"], cfg["BLOCK_N"] = min(cfg["BLOCK_M"], 64), min(cfg["BLOCK_N"], 32)
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    return {**cfg, **(user or {})}


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ``[...]`` = Σ over the last dim of a·b, for a, b ``[..., D]`` of one shape (fp32 products).

    One read of each input: the torch expression ``(a.float() * b.float()).sum(-1)`` moves ≈ 7× the bytes.
    """
    a, b = a.contiguous(), b.contiguous()
    d = a.shape[-1]
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    rows = out.numel()
    if rows:
        block_d = triton.next_power_of_2(d)
        block_r = max(1, ROW_DOT_ELEMS // block_d)
        row_dot_kernel[(triton.cdiv(rows, block_r),)](a, b, out, rows, D=d, BLOCK_R=block_r, BLOCK_D=block_d,
                                                      num_warps=4)
    return out


def _combine(part, part_lse, big, block_idx, out, lse, plan, meta, *, is_sum, part16=False):
    pairs = block_idx.shape[0] * block_idx.shape[1]
    cfg = COMBINE_CONFIG
    block_r = max(cfg["rows"], meta["G_PAD"])
    block_attn_combine_kernel[(triton.cdiv(pairs, block_r // meta["G_PAD"]),)](
        part, part_lse, big, block_idx, out, lse, pairs, plan.num_slots, plan.num_blocks, G=meta["G"],
        D=meta["D"], G_PAD=meta["G_PAD"], BLOCK_D=meta["BLOCK_D"], BLOCK_R=block_r, IS_SUM=is_sum,
        PART16=part16, S_UNROLL=plan.num_slots if cfg["unroll"] else 0, num_warps=cfg["num_warps"])


def _partial_buffer(q: torch.Tensor, v: torch.Tensor, rows: int, g: int, partial_dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(partial o buffer [rows, g, D], int32 flag [1] = store bfloat16 bits, whether 16-bit storage is used, whether
    the flag still has to be set from |v|).

    ``partial_dtype`` float16 (the default for 16-bit inputs) stores float16 unless |v| may overflow it (bfloat16
    values: the flag starts at 0 and the caller sets it on the device, see :func:`_flag_big_values`); bfloat16 always
    stores bfloat16 bits (the benchmark's comparison); float32 stores float32.
    """
    pdt = torch.float32 if q.dtype == torch.float32 else (partial_dtype or PARTIAL_DTYPE)
    if pdt == torch.float32:
        return (torch.empty(rows, g, q.shape[2], dtype=torch.float32, device=q.device),
                torch.zeros(1, dtype=torch.int32, device=q.device), False, False)
    if pdt not in (torch.float16, torch.bfloat16):
        raise ValueError(f"expected partial_dtype float16, bfloat16 or float32, got {pdt}")
    big = (torch.ones if pdt == torch.bfloat16 else torch.zeros)(1, dtype=torch.int32, device=q.device)
    # float16 values cannot exceed float16's range; bfloat16 values are checked on the device (no host sync)
    check = pdt == torch.float16 and v.dtype == torch.bfloat16
    return torch.empty(rows, g, q.shape[2], dtype=torch.int16, device=q.device), big, True, check


@triton.jit(do_not_specialize=["n"])
def _big_values_kernel(V, FLAG, n, limit, BLOCK: tl.constexpr):
    """``FLAG[0] = 1`` if some |V[i]| of this program's ``BLOCK`` values exceeds ``limit`` (FLAG left as is
    otherwise)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if tl.max(tl.abs(tl.load(V + i, mask=i < n, other=0.0).to(tl.float32)), 0) > limit:
        tl.store(FLAG, 1)  # every writer stores the same value


def _flag_big_values(v: torch.Tensor, big: torch.Tensor) -> None:
    """``big[0] = 1`` if some |v| exceeds ``F16_SAFE_ABS`` (``big`` zeroed by the caller; one kernel, no host
    sync)."""
    v = v.contiguous()
    if v.numel():
        _big_values_kernel[(triton.cdiv(v.numel(), BIG_VALUES_BLOCK),)](v, big, v.numel(), F16_SAFE_ABS,
                                                                        BLOCK=BIG_VALUES_BLOCK, num_warps=4)


def block_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_offsets: torch.Tensor,
                   block_idx: torch.Tensor | None, plan: BlockAttnPlan, scale: float,
                   cfg: dict | None = None, partial_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: o [N, Hq, D] (q's dtype) and natural-log lse float32 [N, Hq].

    ``block_idx`` is None for window attention (S = 1: the partials are the outputs).
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    s = plan.num_slots
    meta = _meta(q, k)
    base = WIN_FWD_CONFIG if block_idx is None and WIN_FWD_CONFIG is not None else FWD_CONFIG
    cfg = _fit(base, cfg, meta["BLOCK_D"])
    block_m = _block_m(cfg, meta["G_PAD"])
    num_lists = hkv * plan.num_blocks
    o = torch.empty_like(q)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    if n == 0:
        return o, lse
    if block_idx is None:
        po, plse, big, part16, check_v = o, lse, lse, False, False
    else:
        po, big, part16, check_v = _partial_buffer(q, v, n * hkv * s, meta["G"], partial_dtype)
        plse = torch.empty(n * hkv * s, meta["G"], dtype=torch.float32, device=q.device)
    per_tile = block_m // meta["G_PAD"]
    bound = (plan.entry.numel() + per_tile - 1) // per_tile + num_lists
    if cfg.get("tile_table", False):
        table = _tile_table(plan, per_tile, bound, block_offsets)
        tile_list = tile_cum = table
    else:
        tile_list, tile_cum = _tiles(plan.list_count, per_tile, bound)
        table = tile_list
    shift = cfg.get("shift", "online")
    if shift not in ("online", "bound", "first"):
        raise ValueError(f"expected shift 'online', 'bound' or 'first' in the block attention config, got {shift!r}")
    if q.dtype == torch.float16:
        # float16 probabilities underflow below 2^-24: the fixed shift can sit far above a row's largest logit
        # (measured: 15x the torch error at D = 128), so float16 keeps the running max
        shift = "online"
    if shift == "first" and not cfg["split"]:
        shift = "bound"  # the first chunk's shift is set up for the split key loop
    kmax = segment_max_norm(k, block_offsets) if shift == "bound" else lse
    rowsum = rowsum_mode(cfg, shift != "online")
    masked = cfg.get("masked_chunk", "last")
    if masked not in ("first", "last"):
        raise ValueError(f"expected masked_chunk 'first' or 'last' in the block attention config, got {masked!r}")
    if check_v:
        _flag_big_values(v, big)
    block_attn_fwd_kernel[(bound,)](
        q, k, v, po, plse, big, plan.entry, tile_list, tile_cum, plan.list_start, plan.list_count, block_offsets,
        kmax, table, scale * LOG2E, num_lists, plan.num_blocks, S=s, HKV=hkv, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        PART16=part16, EXP2=resolve_mode(cfg["exp2"], q.device), SPLIT=cfg["split"],
        BOUND=shift in ("bound", "first"), FIRST=shift == "first",
        ROWSUM=rowsum, TILE_TABLE=cfg.get("tile_table", False),
        MASK_FIRST=shift == "first" and masked == "first",
        FAST_LOG2=fast_math(q.device), TAIL_N=min(cfg["TAIL_N"] or cfg["BLOCK_N"], cfg["BLOCK_N"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **max_registers(cfg, q.device, meta["BLOCK_D"]),
        **meta)
    if block_idx is not None:
        _combine(po, plse, big, block_idx, o, lse, plan, meta, is_sum=False, part16=part16)
    return o, lse


def block_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, block_offsets: torch.Tensor, block_idx: torch.Tensor | None,
                   plan: BlockAttnPlan, scale: float, dq_cfg: dict | None = None, dkdv_cfg: dict | None = None,
                   dq_partial_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: dq [N, Hq, D], dk, dv [N, Hkv, D] in the inputs' dtype.

    ``dq_partial_dtype`` overrides the partial dQ storage (default: see ``DQ_PARTIAL_DTYPE``).
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    s = plan.num_slots
    nb = plan.num_blocks
    meta = _meta(q, k)
    dq_cfg = _fit(BWD_DQ_CONFIG, dq_cfg, meta["BLOCK_D"])
    dkdv_cfg = _fit(BWD_DKDV_CONFIG, dkdv_cfg, meta["BLOCK_D"])
    do = do.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if n == 0:
        return dq, dk, dv
    delta = row_dot(o, do)  # [N, Hq]
    num_lists = hkv * nb
    # dQ: tiles as in the forward.
    block_m = _block_m(dq_cfg, meta["G_PAD"])
    per_tile = block_m // meta["G_PAD"]
    bound = (plan.entry.numel() + per_tile - 1) // per_tile + num_lists
    tile_list, tile_cum = _tiles(plan.list_count, per_tile, bound)
    if dq_partial_dtype is None:
        dq_partial_dtype = DQ_PARTIAL_DTYPE if q.dtype == torch.bfloat16 else torch.float32
    pdq = dq if block_idx is None else torch.empty(n * hkv * s, meta["G"], d, dtype=dq_partial_dtype,
                                                   device=q.device)
    block_attn_bwd_dq_kernel[(bound,)](
        q, k, v, do, lse, delta, pdq, plan.entry, tile_list, tile_cum, plan.list_start, plan.list_count,
        block_offsets, scale, scale * LOG2E, num_lists, nb, S=s, HKV=hkv,
        BLOCK_M=block_m, BLOCK_N=dq_cfg["BLOCK_N"], num_warps=dq_cfg["num_warps"],
        num_stages=dq_cfg["num_stages"], **max_registers(dq_cfg, q.device), **meta)
    if block_idx is not None:
        _combine(pdq, pdq, pdq, block_idx, dq, dq, plan, meta, is_sum=True)
    # dK/dV: one program per (key tile of a block, kv head, chunk of a long list).
    block_n = dkdv_cfg["BLOCK_N"]
    lengths = block_offsets[1:] - block_offsets[:-1]
    kt_bound = n // block_n + nb + 1
    kt_block, kt_cum = _tiles(lengths, block_n, kt_bound)
    split = _dkdv_split(plan, block_offsets, n, d) if block_idx is not None else None
    n_chunks, part_off, part_k, part_v, max_chunks, maxlen = split or (lengths, lengths, dk, dv, 1, 0)
    block_attn_bwd_dkdv_kernel[(kt_bound, hkv, max_chunks)](
        q, k, v, do, lse, delta, dk, dv, part_k, part_v, plan.entry, kt_block, kt_cum, plan.list_start,
        plan.list_count, block_offsets, n_chunks, part_off, scale, scale * LOG2E, nb, maxlen, S=s, HKV=hkv,
        BLOCK_M=_block_m(dkdv_cfg, meta["G_PAD"]), BLOCK_N=block_n, SPLIT=split is not None,
        num_warps=dkdv_cfg["num_warps"], num_stages=dkdv_cfg["num_stages"], **max_registers(dkdv_cfg, q.device),
        **meta)
    if split is not None:
        _dkdv_chunk_sum_kernel[(kt_bound, hkv)](part_k, part_v, dk, dv, kt_block, kt_cum, block_offsets, n_chunks,
                                                part_off, nb, maxlen, HKV=hkv, D=d, BLOCK_D=meta["BLOCK_D"],
                                                BLOCK_N=block_n, num_warps=4)
    return dq, dk, dv


def _dkdv_split(plan: BlockAttnPlan, block_offsets: torch.Tensor, n: int, d: int) -> tuple | None:
    """The selection dK/dV's list chunks (``DKDV_SPLIT``), or None when no list can need two (N ≤ split_entries).

    Returns int32 chunks per list ``[Hkv·NB]``, each split list's first partial chunk ``[Hkv·NB]``, the float32
    partial buffers for dK and dV ``[rows, D]``, the most chunks of a list and the partial rows per chunk: the
    longest block, ``plan.max_block_len`` or else read from the offsets (one host sync)."""
    entries = DKDV_SPLIT["split_entries"]
    max_chunks = min(DKDV_SPLIT["max_chunks"], -(-n // entries))  # a list holds a query once per slot it fills
    if max_chunks <= 1 or plan.list_count.numel() == 0:
        return None
    # int32 like list_count: the kernels read both tables as int32
    chunks = torch.div(plan.list_count + (entries - 1), entries, rounding_mode="floor").clamp_(1, max_chunks)
    own = torch.where(chunks > 1, chunks, 0)  # partial chunks belong to split lists only
    part_off = torch.cumsum(own, 0, dtype=torch.int32) - own
    maxlen = plan.max_block_len
    if maxlen is None:
        maxlen = int((block_offsets[1:] - block_offsets[:-1]).max())
    # a split list has more than `entries` entries and at most count / entries + 1 chunks
    rows = 2 * (plan.entry.numel() // entries + 1) * maxlen
    part_k = torch.empty(rows, d, dtype=torch.float32, device=block_offsets.device)
    return chunks, part_off, part_k, torch.empty_like(part_k), max_chunks, maxlen


class BlockAttnFunction(torch.autograd.Function):
    """Autograd wrapper; ``block_idx`` None means window attention."""

    @staticmethod
    def forward(ctx, q, k, v, block_offsets, block_idx, plan, scale):
        o, lse = block_attn_fwd(q, k, v, block_offsets, block_idx, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_offsets, block_idx)
        ctx.plan = plan
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, block_offsets, block_idx = ctx.saved_tensors
        dq, dk, dv = block_attn_bwd(do, q, k, v, o, lse, block_offsets, block_idx, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _prepare(q, k, v, offsets):
    from .reference import _check

    _check(q, k, v, offsets, None)
    if q.shape[2] > 128:
        raise ValueError(f"expected head dim <= 128 for the triton backend, got {q.shape[2]}")
    if not (k.device == q.device == v.device == offsets.device):
        raise ValueError(f"expected q, k, v, offsets on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{offsets.device}")
    return q.contiguous(), k.contiguous(), v.contiguous(), offsets.to(torch.int32).contiguous()


def selection_attention_triton(q, k, v, block_offsets, block_idx, *, scale=None, return_lse=False,
                               max_block_len=None):
    """Triton selection attention; same contract as :func:`~.reference.selection_attention_ref`."""
    from .reference import _check

    _check(q, k, v, block_offsets, block_idx)
    q, k, v, block_offsets = _prepare(q, k, v, block_offsets)
    block_idx = block_idx.to(torch.int32).contiguous()
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    plan = selection_plan(block_idx, block_offsets.numel() - 1, max_block_len)
    o, lse = BlockAttnFunction.apply(q, k, v, block_offsets, block_idx, plan, scale)
    return (o, lse) if return_lse else o


def window_attention_triton(q, k, v, window_offsets, *, scale=None, return_lse=False):
    """Triton window attention; same contract as :func:`~.reference.window_attention_ref`."""
    q, k, v, window_offsets = _prepare(q, k, v, window_offsets)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    plan = window_plan(window_offsets, q.shape[0], k.shape[1])
    o, lse = BlockAttnFunction.apply(q, k, v, window_offsets, None, plan, scale)
    return (o, lse) if return_lse else o
