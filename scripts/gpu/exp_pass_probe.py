"""The leanest exponential pass over the compressed branch's logits that Triton compiles, timed next to the two
passes SSA runs (v1.1, N = 134k, bf16): an upper bound on how fast either compressed pass can get in Triton.

The probe kernel computes only each row's log-sum-exp (what the top-k needs from the first pass): per key chunk one
Q·Kᵀ wgmma, the fixed Cauchy–Schwarz shift folded into the exponent's FMA, the exp, per-lane row sums. No P·V, no
bf16 packs of P, no top-k: a kernel doing either pass's work does all of this and more. Its LSE is checked against
``cmp_attention_fwd``'s. Variants: key chunk, exp mode (``d3s2.ops._exp2``), register cap, stages, warps, mma.sync
instead of wgmma (Triton's ``DISABLE_MMA_V3``) and, with it, the next chunk's logits issued before this chunk's exps
(``PIPE``). Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/exp_pass_probe.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

from d3s2.ops._exp2 import exp2  # noqa: E402
from d3s2.ops.block_attn.triton import lane_row_sums, segment_max_norm  # noqa: E402
from d3s2.ops.ssa.triton_compress import _load_rows, _program_tokens, _token_rows  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _lse_pass_kernel(Q, K, LSE, CU_SEQ, CU_CMP, KMAX, stride_qn, stride_qh, stride_kn, stride_kh, qk_scale,
                     HQ: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr, EXP2: tl.constexpr, PIPE: tl.constexpr = False):
    """LSE [N, Hq] of one sample's (token, query head) rows over its compressed keys; 16 heads per group, D = 32."""
    b, g, start, t1 = _program_tokens(CU_SEQ, BLOCK_T)
    if start >= t1:
        return
    c0 = tl.load(CU_CMP + b)
    c1 = tl.load(CU_CMP + b + 1)
    tok, head, row_ok = _token_rows(start, t1, g, 0, HS, HS, BLOCK_T * HS)
    offs_d = tl.arange(0, D)
    q = _load_rows(Q, tok, head, offs_d, row_ok, offs_d < D, stride_qn, stride_qh)
    qf = q.to(tl.float32)
    m = tl.sqrt(tl.sum(qf * qf, 1)) * (tl.load(KMAX + b * (HQ // HS) + g) * qk_scale)
    l_lanes = tl.zeros([BLOCK_T * HS, 4], tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    c_full = c0 + (c1 - c0) // BLOCK_C * BLOCK_C
    if PIPE:
        # the next chunk's logits are computed before this chunk's exps: with mma.sync (DISABLE_MMA_V3) ptxas may
        # interleave the two; with wgmma Triton waits right after issuing
        if c0 < c_full:
            k = tl.load(K + (c0 + offs_c).to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :])
            s = tl.dot(q, tl.trans(k))
            for c_start in range(c0 + BLOCK_C, c_full, BLOCK_C):
                cols = c_start + offs_c
                k = tl.load(K + cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :])
                s_next = tl.dot(q, tl.trans(k))
                l_lanes += lane_row_sums(exp2(s * qk_scale - m[:, None], EXP2))
                s = s_next
            l_lanes += lane_row_sums(exp2(s * qk_scale - m[:, None], EXP2))
    else:
        for c_start in range(c0, c_full, BLOCK_C):
            cols = c_start + offs_c
            k = tl.load(K + cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :])
            s = tl.dot(q, tl.trans(k))
            l_lanes += lane_row_sums(exp2(s * qk_scale - m[:, None], EXP2))
    if c_full < c1:
        cols = c_full + offs_c
        col_ok = cols < c1
        k = tl.load(K + cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        l_lanes += lane_row_sums(exp2(s * qk_scale - m[:, None], EXP2))
    lse = (m + tl.log2(tl.sum(l_lanes, 1))) * 0.6931471805599453
    tl.store(LSE + tok.to(tl.int64) * HQ + head, lse, mask=row_ok)


# a clone for mma.sync builds (Triton's DISABLE_MMA_V3, part of its disk-cache key): its own in-memory cache
_lse_pass_kernel_mma_sync = triton.jit(_lse_pass_kernel.fn)


def lse_pass(q, kc, layout, scale, block_c, exp2_mode, maxnreg, num_stages, num_warps, mma_sync=False, pipe=False):
    n, hq, _ = q.shape
    hkv = kc.shape[1]
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    kmax = segment_max_norm(kc, layout.cu_cmp)
    block_t = 16 * num_warps // (hq // hkv)  # 64 rows per warpgroup
    grid = (triton.cdiv(layout.max_seqlen, block_t), layout.batch_size, hkv)
    kernel = _lse_pass_kernel_mma_sync if mma_sync else _lse_pass_kernel
    if mma_sync:
        os.environ["DISABLE_MMA_V3"] = "1"
    kernel[grid](q, kc, lse, layout.cu_seqlens, layout.cu_cmp, kmax, q.stride(0), q.stride(1),
                 kc.stride(0), kc.stride(1), scale * LOG2E, HQ=hq, HS=hq // hkv, D=q.shape[2],
                 BLOCK_T=block_t, BLOCK_C=block_c, EXP2=exp2_mode, PIPE=pipe, num_warps=num_warps,
                 num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    os.environ.pop("DISABLE_MMA_V3", None)
    return lse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts)
    layout, q, kc, vc, scale, lse_ref = (st[n] for n in ("layout", "q", "kc", "vc", "scale", "lse"))
    tokens = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).double()
    blocks = (layout.cu_cmp[1:] - layout.cu_cmp[:-1]).double()
    n_logits = float((tokens * blocks).sum()) * q.shape[1]
    print(f"N = {q.shape[0]}: {n_logits:.3e} logits per pass, ≥ {n_logits / (132 * 16 * 1.98e9) * 1e3:.3f} ms of "
          f"exps at 16 ex2 per clock per SM (H200: 132 SMs, 1.98 GHz)")
    fns = {"cmp_fwd": lambda: b.tc.cmp_attention_fwd(q, kc, vc, layout, scale),
           "topk": lambda: b.tc.cmp_select_topk(q, kc, lse_ref, layout, 8, scale)}
    # (key chunk, exp mode, register cap, stages, warps, mma.sync, next chunk's logits before this chunk's exps);
    # ptxas sm_90 needs ≥ 90 registers at 128-key chunks with wgmma
    variants = [(64, "mufu", 80, 3, 4, False, False), (64, "mufu", 80, 3, 8, False, False),
                (64, "mix4", 80, 3, 8, False, False)]
    variants += [(64, mode, cap, stages, warps, True, pipe) for mode in ("mufu", "mix4") for cap, stages, warps, pipe in
                 ((80, 3, 4, False), (96, 3, 4, False), (0, 3, 4, False), (80, 2, 4, False), (80, 3, 8, False),
                  (96, 3, 4, True), (0, 3, 4, True), (80, 3, 8, True))]
    variants += [(32, "mufu", 80, 3, 4, True, False), (128, "mufu", 0, 3, 4, True, False)]
    for block_c, mode, cap, stages, warps, mma_sync, pipe in variants:
        name = f"lse c{block_c} {mode} r{cap} s{stages} w{warps}" + (" mma.sync" if mma_sync else "") + \
            (" pipe" if pipe else "")
        fn = partial(lse_pass, q, kc, layout, scale, block_c, mode, cap, stages, warps, mma_sync, pipe)
        err = (fn() - lse_ref).abs().max().item()
        print(f"{name}: max |LSE − cmp_attention_fwd's| {err:.2e}")
        fns[name] = fn
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(do_bench(fn, rep=100, return_mode="median"))
    print("| kernel | ms (rounds) |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | " + " / ".join(f"{t:.3f}" for t in ts) + " |")


if __name__ == "__main__":
    main()
