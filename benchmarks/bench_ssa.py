"""Benchmark the whole SSA op (triton backend) against PyTorch SDPA flash full attention on real token layouts.

Layouts: ``latent_layouts_1024.npz`` (0 A.D. meshes at 1024³ / 8 → 128³ latent, N ≈ 8k…134k, one mesh per
size), plus a ragged batch (the 64k and 16k meshes and a 300-token mesh with fewer selection blocks than top-k).
Hq 32 / Hkv 2 / D 32, bf16, configs v1.1 (m_cmp = m_slc = 8, top-k 8) and v1.0 at 1024³ (m_cmp 4, m_slc 8,
top-k 8); window 8, unshifted (even layer; an odd, shifted layer is timed at the largest N). q, k, v, k_cmp,
v_cmp are N(0, 1), gates U(0, 1): the op's inputs, so projections and compression are not in the op numbers
(the module row at the largest N includes them).

Reported per size: SSA op forward, backward, forward+backward (scoring and top-k included), each branch's
time, effective TFLOP/s of the selection kernel (4·D·Hs·Σ selected keys), peak extra memory, and SDPA flash
(``enable_gqa``) over the same tokens, per sample for the batch. ``--ab`` also measures every row with the
session-5 path (``VARIANTS["before"]``: session 5's launch configs, the online softmax in every forward) in the
same run; the module rows compare the conv backends of the v1.0 compression (torch reference vs
triton).

    PYTHONPATH=src python benchmarks/bench_ssa.py --layouts ../shared/data/latent_layouts_1024.npz [--sweep] [--ab]

Writes ``ssa_<device>.json`` and ``ssa_<device>.md`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import d3s2.ops.ssa as ssa_ops
from d3s2.ops._backend import use_backend
from d3s2.ops.block_attn import selection_attention, window_attention
from d3s2.ops.block_attn import triton as ba_kernels
from d3s2.ops.ssa import build_ssa_layout, spatial_sparse_attention
from d3s2.ops.ssa import triton_combine as tcomb
from d3s2.ops.ssa import triton_compress as tc
from d3s2.ops.ssa.reference import combine_ref
from d3s2.sparse import SparseTensor

HQ, HKV, D = 32, 2, 32
CONFIGS = {"v1.1": {"m_cmp": 8, "m_slc": 8, "topk": 8}, "v1.0": {"m_cmp": 4, "m_slc": 8, "topk": 8}}
M_WIN = 8


# Paths an --ab run compares: "new" (the defaults, or what --sweep picked) and "before" (session 5's launch
# configs: online softmax in every forward, the top-k of session 5). None: keep the current configs.
CMP_KERNELS = ("fwd", "topk", "topk_seg")
SESSION5_CMP = {
    "fwd": {"rows": 128, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3, "exp2": "mufu", "split": True,
            "shift": "online", "rowsum": "reduce"},
    "topk": {"variant": "dot", "skip": False, "rows": 256, "BLOCK_J": 64, "BLOCK_C": 64, "num_warps": 4,
             "num_stages": 3, "exp2": "mufu", "key32": True, "m_split": 4, "counted": True, "lse_dot": True},
    "topk_seg": {"variant": "dot", "skip": False, "rows": 256, "BLOCK_J": 64, "BLOCK_C": 64, "num_warps": 4,
                 "num_stages": 2, "exp2": "mufu", "key32": True, "m_split": 2, "counted": True, "lse_dot": True}}
SESSION5_SLC = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "exp2": "mufu", "split": True,
                "TAIL_N": None, "shift": "online", "rowsum": "reduce"}
SESSION5_WIN = {**SESSION5_SLC, "BLOCK_M": 64}
SESSION5_COMBINE = {"rows": 64, "num_warps": 4, "unroll": False}
VARIANTS = {"new": {"fused_combine": True, "partial": ba_kernels.PARTIAL_DTYPE,
                    "dq_partial": ba_kernels.DQ_PARTIAL_DTYPE, "cmp": None, "slc": None, "win": None,
                    "combine": None},
            # the same as "new", measured again after "before": the run-to-run spread of one configuration
            "new, repeated": {"fused_combine": True, "partial": ba_kernels.PARTIAL_DTYPE,
                              "dq_partial": ba_kernels.DQ_PARTIAL_DTYPE, "cmp": None, "slc": None, "win": None,
                              "combine": None},
            "before": {"fused_combine": True, "partial": torch.float16, "dq_partial": torch.bfloat16,
                       "cmp": SESSION5_CMP, "slc": SESSION5_SLC, "win": SESSION5_WIN, "combine": SESSION5_COMBINE}}
# Sweep changes whose outputs differ from the default's by roundings (another exp2 or shift): checked to 2⁻⁶
ROUNDING_KEYS = ("exp2", "shift", "rowsum")
# --device cpu (a smoke run under TRITON_INTERPRET=1): float32, one timed call per measurement.
DEV, DTYPE = "cuda", torch.bfloat16


@contextlib.contextmanager
def _variant(name: str):
    v = VARIANTS[name]
    saved = (ssa_ops.FUSED_COMBINE, ba_kernels.PARTIAL_DTYPE, ba_kernels.DQ_PARTIAL_DTYPE,
             {k: dict(tc.CONFIG[k]) for k in CMP_KERNELS}, dict(ba_kernels.FWD_CONFIG), ba_kernels.WIN_FWD_CONFIG,
             dict(ba_kernels.COMBINE_CONFIG))
    ssa_ops.FUSED_COMBINE, ba_kernels.PARTIAL_DTYPE, ba_kernels.DQ_PARTIAL_DTYPE = (
        v["fused_combine"], v["partial"], v["dq_partial"])
    if v["cmp"]:
        tc.CONFIG.update({k: dict(c) for k, c in v["cmp"].items()})
    if v["slc"]:
        ba_kernels.FWD_CONFIG = dict(v["slc"])
    if v["win"]:
        ba_kernels.WIN_FWD_CONFIG = dict(v["win"])
    if v["combine"]:
        ba_kernels.COMBINE_CONFIG = dict(v["combine"])
    try:
        yield
    finally:
        ssa_ops.FUSED_COMBINE, ba_kernels.PARTIAL_DTYPE, ba_kernels.DQ_PARTIAL_DTYPE = saved[:3]
        tc.CONFIG.update(saved[3])
        ba_kernels.FWD_CONFIG, ba_kernels.WIN_FWD_CONFIG, ba_kernels.COMBINE_CONFIG = saved[4:]


def _bench(fn, warmup=5, rep=40) -> float:
    from triton.testing import do_bench

    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _peak_extra_mb(fn) -> float:
    if DEV == "cpu":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def _batch(path: str, keys: list[str], small: int = 0) -> SparseTensor:
    data = np.load(path)
    coords = [torch.from_numpy(data[k].astype(np.int32)) for k in keys]
    if small:  # the `small` tokens nearest to the first mesh's first token: a mesh with very few blocks
        c = torch.from_numpy(data["8192"].astype(np.int32))
        near = (c - c[0]).abs().amax(1).argsort()[:small]
        coords.append(c[near])
    feats = [torch.zeros(len(c), 1) for c in coords]
    return SparseTensor.from_samples(coords, feats, resolution=128).to(DEV)


def _inputs(layout, gen, dtype=None):
    dtype = dtype or DTYPE
    n, nc = layout.num_tokens, layout.num_cmp

    def r(*shape):
        return torch.randn(*shape, device=DEV, generator=gen).to(dtype).requires_grad_()

    gates = torch.rand(n, 3, device=DEV, generator=gen).to(dtype).requires_grad_()
    return [r(n, HQ, D), r(n, HKV, D), r(n, HKV, D), r(nc, HKV, D), r(nc, HKV, D), gates]


def v11_state(path: str, size: str = "131072", m_cmp: int = 8) -> dict:
    """The device scripts' common setup (``scripts/gpu``): the v1.1 layout of mesh ``size`` of ``path`` (``m_cmp``
    4: v1.0's compression blocks), seeded inputs on DEV, the compressed forward's LSE and the top-k selection. Keys:
    layout, q, k, v, kc, vc, gates, scale, lse, idx, off."""
    layout = build_ssa_layout(_batch(path, [size]), m_cmp=m_cmp, m_slc=8, m_win=M_WIN, shift=0)
    q, k, v, kc, vc, gates = (t.detach() for t in _inputs(layout, torch.Generator(DEV).manual_seed(0)))
    scale = D**-0.5
    lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)[1]
    return {"layout": layout, "q": q, "k": k, "v": v, "kc": kc, "vc": vc, "gates": gates, "scale": scale, "lse": lse,
            "idx": tc.cmp_select_topk(q, kc, lse, layout, 8, scale), "off": layout.slc_offsets}


def _selection_flops(off: torch.Tensor, idx: torch.Tensor) -> float:
    lengths = (off[1:] - off[:-1]).long()
    sel = lengths[idx.long().clamp_min(0)] * (idx >= 0)
    return 4.0 * D * (HQ // HKV) * float(sel.sum())


def _sdpa(layout, ins, do) -> dict:
    """Full attention per sample with SDPA flash (GQA); times summed over samples."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fwd = bwd = 0.0
    cu = layout.cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        sl = slice(cu[b], cu[b + 1])
        qt, kt, vt = (t.detach()[sl].transpose(0, 1)[None].contiguous().requires_grad_() for t in ins[:3])
        dot = do[sl].transpose(0, 1)[None].contiguous()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
            def call(qt=qt, kt=kt, vt=vt):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            big = cu[b + 1] - cu[b] > 40000  # one run takes > 30 ms: few repeats suffice
            fwd += _bench(call, warmup=1 if big else 5, rep=1 if big else 40)
            o = call()
            bwd += _bench(lambda o=o, qt=qt, kt=kt, vt=vt, dot=dot: torch.autograd.grad(
                o, (qt, kt, vt), dot, retain_graph=True), warmup=1 if big else 5, rep=1 if big else 40)
            del o
    n2 = sum((cu[b + 1] - cu[b]) ** 2 for b in range(len(cu) - 1))
    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fwd + bwd, "fwd_tflops": 4.0 * n2 * D * HQ / fwd / 1e9}


def _combine_ms(q, k, v, idx, plan) -> float:
    """The selection's partial combine alone, on zero partials (its time depends on the bytes, not the values)."""
    meta = ba_kernels._meta(q, k)
    po, big, part16, _ = ba_kernels._partial_buffer(q, v, idx.numel(), meta["G"], None)
    po.zero_()
    plse = torch.zeros(idx.numel(), meta["G"], dtype=torch.float32, device=q.device)
    o, lse = torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    return _bench(lambda: ba_kernels._combine(po, plse, big, idx, o, lse, plan, meta, is_sum=False, part16=part16))


def _measure(layout, topk: int, ins, do, with_branches: bool = True) -> dict:
    leaves = ins
    scale = D**-0.5

    def op():
        return spatial_sparse_attention(*leaves, layout, topk=topk, backend="triton")

    row = {"fwd_ms": _bench(op)}
    with torch.no_grad():  # inference: no autograd graph
        row["fwd_ms_inference"] = _bench(op)
    o = op()
    row["bwd_ms"] = _bench(lambda o=o: torch.autograd.grad(o, leaves, do, retain_graph=True))
    row["fwd_bwd_ms"] = _bench(lambda: torch.autograd.grad(op(), leaves, do))
    del o
    with torch.no_grad():
        row["peak_extra_mb_fwd_inference"] = _peak_extra_mb(op)
    row["peak_extra_mb_fwd_bwd"] = _peak_extra_mb(lambda: torch.autograd.grad(op(), leaves, do))
    if not with_branches:
        return row

    q, k, v, kc, vc, g = (t.detach() for t in ins)
    br = {}
    br["cmp_fwd_ms"] = _bench(lambda: tc.cmp_attention_fwd(q, kc, vc, layout, scale))
    o_cmp, lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)
    br["score_topk_ms"] = _bench(lambda: tc.cmp_select_topk(q, kc, lse, layout, topk, scale))
    idx = tc.cmp_select_topk(q, kc, lse, layout, topk, scale)
    br["cmp_bwd_ms"] = _bench(lambda: tc.cmp_attention_bwd(q, kc, vc, o_cmp, lse, do, layout, scale))
    off = layout.slc_offsets
    br["slc_fwd_ms"] = _bench(lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"))
    # where the selection forward goes: the plan (a sort of the entries by block) vs the kernel + partial combine
    br["slc_plan_ms"] = _bench(lambda: ba_kernels.selection_plan(idx, off.numel() - 1))
    plan = ba_kernels.selection_plan(idx, off.numel() - 1)
    br["slc_kernel_combine_ms"] = _bench(lambda: ba_kernels.block_attn_fwd(q, k, v, off, idx, plan, scale))
    br["slc_combine_ms"] = _combine_ms(q, k, v, idx, plan)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    o_slc = selection_attention(qg, kg, vg, off, idx, scale=scale, backend="triton")
    br["slc_bwd_ms"] = _bench(lambda: torch.autograd.grad(o_slc, (qg, kg, vg), do, retain_graph=True))

    def win(q, k, v):
        if layout.win_perm is None:
            return window_attention(q, k, v, layout.win_offsets, scale=scale, backend="triton")
        p = layout.win_perm
        return window_attention(q[p], k[p], v[p], layout.win_offsets, scale=scale, backend="triton")[
            layout.win_inverse]

    br["win_fwd_ms"] = _bench(lambda: win(q, k, v))
    o_win = win(qg, kg, vg)
    br["win_bwd_ms"] = _bench(lambda: torch.autograd.grad(o_win, (qg, kg, vg), do, retain_graph=True))
    combine = tcomb.gate_combine if ssa_ops.FUSED_COMBINE else combine_ref
    gg, ca, cb, cc = (t.detach().requires_grad_() for t in (g, o_cmp, o_slc.detach(), o_win.detach()))
    br["combine_fwd_ms"] = _bench(lambda: combine(gg, ca, cb, cc))
    o_comb = combine(gg, ca, cb, cc)
    br["combine_bwd_ms"] = _bench(lambda: torch.autograd.grad(o_comb, (gg, ca, cb, cc), do, retain_graph=True))
    flops = _selection_flops(off, idx)
    br["slc_gflop_fwd"] = flops / 1e9
    br["slc_fwd_tflops"] = flops / br["slc_fwd_ms"] / 1e9
    br["slc_bwd_tflops"] = 2.5 * flops / br["slc_bwd_ms"] / 1e9
    cu = layout.cu_seqlens.tolist()
    cc = layout.cu_cmp.tolist()
    pairs = sum((cu[b + 1] - cu[b]) * (cc[b + 1] - cc[b]) for b in range(len(cu) - 1))
    br["cmp_fwd_tflops"] = 4.0 * pairs * HQ * D / br["cmp_fwd_ms"] / 1e9
    br["cmp_logits"] = pairs * HQ  # exp() evaluations per pass
    br["cmp_plus_topk_share_of_fwd"] = (br["cmp_fwd_ms"] + br["score_topk_ms"]) / row["fwd_ms"]
    row["branches"] = br
    return row


def _module_row(x: SparseTensor, name: str, conv_backend: str = "auto") -> dict:
    """The whole layer; ``conv_backend`` is the sparse conv backend of the v1.0 compression (auto: triton)."""
    from d3s2.models.attention import SpatialSparseAttention

    cfg = SpatialSparseAttention.Config.v1_1() if name == "v1.1" else SpatialSparseAttention.Config.v1_0()
    m = SpatialSparseAttention(cfg).to(DEV, DTYPE)
    xin = x.replace(torch.randn(x.num_voxels, cfg.dim, device=DEV, dtype=DTYPE))
    with use_backend("conv", conv_backend):
        m(xin, backend="triton")  # layout and kernel maps are built once per structure (cached on x)

        def fwd_bwd():
            out = m(xin, backend="triton")
            out.feats.float().square().mean().backward()

        with torch.no_grad():
            fwd = _bench(lambda: m(xin, backend="triton"))
        return {"config": name, "conv_backend": conv_backend, "N": x.num_voxels, "fwd_ms_inference": fwd,
                "fwd_bwd_ms": _bench(fwd_bwd)}


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to b's largest magnitude."""
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-30)


def _set_diff(idx: torch.Tensor, base: torch.Tensor) -> float:
    """Fraction of selected blocks (``[N, Hkv, S]``) missing from the same (token, kv head)'s ``base`` selection."""
    found = (idx[..., :, None] == base[..., None, :]).any(-1)
    return float((~found & (idx >= 0)).float().sum() / (idx >= 0).sum().clamp_min(1))


def _sweep(layout, topk, ins, do, kernels: list[str]) -> list[dict]:
    """Compressed-branch kernels alone under several launch configurations, each checked against the default.

    Returns one row per configuration. For each kernel the fastest valid configuration becomes the one used for
    the rest of the run (recorded in the result's setup): top-k, a selection whose block sets differ from the
    default's in under 0.1% of entries (near-ties: the "dot" variant rounds probabilities to float16, int32 keys
    truncate scores to 23 − id bits; the order inside a selection does not matter); the others, outputs
    within 2⁻⁶ of the default's largest magnitude (a few bfloat16 roundings: the order of sums differs).
    """
    q, _, _, kc, vc, _ = (t.detach() for t in ins)
    scale = D**-0.5
    base_o, base_lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)
    base_idx = tc.cmp_select_topk(q, kc, base_lse, layout, topk, scale)
    base_g = tc.cmp_attention_bwd(q, kc, vc, base_o, base_lse, do, layout, scale)
    topk_key = "topk" if layout.m_cmp == layout.m_slc else "topk_seg"
    default = {k: dict(v) for k, v in tc.CONFIG.items()}
    # session 4 swept exp2 modes and stages of the forward and top-k (FMA-pipe exps slower everywhere). Session 5:
    # the top-k's options alone and combined on session 4's kernel (registers per thread from ptxas for sm_90,
    # BLOCK_J 64, 4 warps: session 4's 254; key32 250; m_split 2: 195; key32 + m_split 2: 179; + m_split 4: 154;
    # lse_dot with key32 and m_split 1 / 2 / 4: 175 / 126 / 92), and tiles around the combination (the v1.1
    # default since: new4 without the float pre-test); v1.0's one-hot segment top-k against the same options
    new2 = {"key32": True, "m_split": 2, "counted": True, "lse_dot": True}
    new4 = {**new2, "m_split": 4}
    variants = {
        # session 6: the fixed Cauchy–Schwarz shift (no running max) with row sums on the tensor cores (the
        # default: "bound" + "dot"), FMA-pipe exps on top (the MUFU is then the bottleneck), the online softmax,
        # 64-row tiles (ptxas sm_90: 118 registers per thread against 200 at 128 rows)
        # (round 1 at 128 rows: bound + dot 2.11 ms, + mix4 2.12, online 1.95; bound + dot at 64 rows 1.86: the
        # default since); round 2: per-row adds and the online softmax at 64 rows,
        # and registers capped at 96 per thread (5 CTAs per SM instead of 4; ptxas: no spill in the loop)
        # session 10: 6 CTAs per SM (ptxas sm_90: 80 registers without a spill at 2 stages; 32-block tiles 82
        # uncapped, 80 capped without a spill; 3 stages at 80: 32 bytes of spill)
        "fwd": [{"rowsum": "reduce"}, {"shift": "online", "rowsum": "reduce"}, {"maxnreg": 96},
                {"rowsum": "reduce", "maxnreg": 96}, {"num_stages": 2, "maxnreg": 80}, {"BLOCK_C": 32},
                {"BLOCK_C": 32, "maxnreg": 80}, {"num_stages": 3, "maxnreg": None},
                {"rows": 128, "num_warps": 8}],
        "topk_seg": [new4, {**new4, "skip": False}, {**new2, "skip": False}],
        # session 5 swept session 4's kernel (skip, int64 keys, m_split 1, no counted / lse_dot), with key32,
        # m_split 2, key32 + m_split 2 + counted, new2 with m_split 1, new2, new4 (with 2 stages, without counted),
        # rows 512, BLOCK_J 16 / 128 (8 warps). Session 6, round 1 (ms): default 2.215; the softmax scale inside
        # the logit matmul too (q pre-scaled, hi + lo: no multiply per logit; ptxas sm_90: 113 registers, 52 KB
        # shared memory against 87, 36 KB; removed since) 2.614; FMA-pipe exps (mix4) 2.297. Round 2: registers
        # capped at 80 per thread (6 CTAs per SM instead of 5; ptxas: no spill). Session 9: the running top-k in
        # several lists per token (insertion rounds without shared memory or barriers), merged at the end
        # session 10: 16 lists capped at 80 registers (6 CTAs per SM; ptxas: 88 bytes of spill against 32 lists' 184);
        # 128-row tiles (8 tokens: the 32 lists take half the registers; ptxas: 72 without a spill, 7 CTAs per SM)
        "topk": [{"lists": 4}, {"lists": 32}, {"lists": 32, "maxnreg": 96}, {"lists": 16},
                 {"lists": 16, "maxnreg": 80}, {"rows": 128, "maxnreg": 72}, {"rows": 128, "maxnreg": 80},
                 {"rows": 128, "m_split": 2, "maxnreg": 80}],
        "bwd_dq": [{"BLOCK_C": 128, "num_warps": 8}, {"rows": 64}],
        "bwd_dkdv": [{"rows": 32}, {"programs_per_sm": 16}, {"rows": 32, "programs_per_sm": 16},
                     {"num_stages": 3}],
    }
    rows = []
    for kernel in kernels:
        if kernel in ("topk", "topk_seg") and kernel != topk_key and kernel != "topk":
            continue  # "topk_seg": only the v1.0 layout's top-k
        kernel = topk_key if kernel == "topk" else kernel
        best = None
        for change in [{}] + variants[kernel]:
            tc.CONFIG[kernel] = {**default[kernel], **change}
            try:
                if kernel == "fwd":
                    o, lse = tc.cmp_attention_fwd(q, kc, vc, layout, scale)
                    err = _rel_max(o, base_o)
                    ms = _bench(lambda: tc.cmp_attention_fwd(q, kc, vc, layout, scale))
                elif kernel == topk_key:
                    err = _set_diff(tc.cmp_select_topk(q, kc, base_lse, layout, topk, scale), base_idx)
                    ms = _bench(lambda: tc.cmp_select_topk(q, kc, base_lse, layout, topk, scale))
                else:
                    got = tc.cmp_attention_bwd(q, kc, vc, base_o, base_lse, do, layout, scale)
                    err = max(_rel_max(a, b) for a, b in zip(got, base_g))
                    ms = _bench(lambda: tc.cmp_attention_bwd(q, kc, vc, base_o, base_lse, do, layout, scale))
                if err < (1e-3 if kernel == topk_key else 2.0**-6) and (best is None or ms < best[0] * 0.99):
                    best = (ms, dict(tc.CONFIG[kernel]))
                rows.append({"kernel": kernel, **tc.CONFIG[kernel], "ms": ms, "diff_vs_default": err})
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                rows.append({"kernel": kernel, **tc.CONFIG[kernel], "error": repr(e)[:300]})
            print(json.dumps(rows[-1]), flush=True)
        tc.CONFIG[kernel] = best[1] if best else default[kernel]
        if kernel == topk_key:  # the winner with k = 1 (one insertion round per tile at most): the scoring's share
            ms = _bench(lambda: tc.cmp_select_topk(q, kc, base_lse, layout, 1, scale))
            rows.append({"kernel": f"{kernel} k=1", **tc.CONFIG[kernel], "ms": ms, "diff_vs_default": float("nan")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _sweep_slc(layout, topk, ins) -> list[dict]:
    """The selection forward (plan + kernel + combine) under several ``block_attn`` forward configs (tiles, exp2
    mode, softmax shift); the fastest one (by at least 1 %) whose output matches the default's (to 2⁻¹⁰ of its
    largest magnitude, 2⁻⁶ for another exp2 mode or shift) is then used."""
    q, k, v, kc, vc, _ = (t.detach() for t in ins)
    scale = D**-0.5
    idx = tc.cmp_select_topk(q, kc, tc.cmp_attention_fwd(q, kc, vc, layout, scale)[1], layout, topk, scale)
    off = layout.slc_offsets
    default = dict(ba_kernels.FWD_CONFIG)

    def run():
        return selection_attention(q, k, v, off, idx, scale=scale, backend="triton")

    base = run()
    rows, best = [], None
    flops = _selection_flops(off, idx)
    # session 4 also measured exp2 "mix4" / "mix" / "poly", no split, 8 warps, BLOCK_M 64, 1-2 stages and 64-key
    # chunks with a 16-key tail: all slower than the default (3 stages, split). Session 5: 16 entries per tile
    # (one load of a block's keys for twice the queries), a 4th stage, 16-key tail chunks (less padding), 2-warp
    # programs of 4 entries
    # session 6, round 1 (ms): fixed shift with row sums on the tensor cores 5.29 (ptxas sm_90: 149 registers per
    # thread, 3 CTAs per SM), + mix4 5.39, per-row adds 4.64 (122 registers, 4 CTAs: the default since), the online
    # softmax 4.77, 64-row tiles 5.55. Round 2: 16-key tails, 16-key chunks (fewer registers), registers capped at
    # 96 per thread (5 CTAs per SM instead of 4; ptxas: no spill in the loop) alone and with 16-key tails, the tile
    # table (one level of dependent loads less per tile) alone and with the register cap. Session 10 (kv heads and
    # slots compile-time constants: no integer division in the tile's prologue; ptxas sm_90 at the 96 cap: 56 bytes
    # of spill instead of 80), ms: 4.32, the tile table 4.33, 2 stages (40 bytes) 4.47, no cap (126 registers, 4 CTAs
    # per SM) 4.51; |q| from squared row norms computed before the launch (branch qnorm10) 4.48 against 4.32
    for change in [{}, {"tile_table": True}, {"num_stages": 2}, {"maxnreg": None}]:
        ba_kernels.FWD_CONFIG = {**default, **change}
        try:
            err = _rel_max(run(), base)
            ms = _bench(run)
            # a tiling or masking change moves no rounding; another exp2 or shift moves P by a few roundings
            rounding = any(ba_kernels.FWD_CONFIG.get(k) != default.get(k) for k in ROUNDING_KEYS)
            if err < (2.0**-6 if rounding else 2.0**-10) and (best is None or ms < best[0] * 0.99):
                best = (ms, dict(ba_kernels.FWD_CONFIG))
            rows.append({"kernel": "slc", **ba_kernels.FWD_CONFIG, "ms": ms, "tflops": flops / ms / 1e9,
                         "diff_vs_default": err})
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            rows.append({"kernel": "slc", **ba_kernels.FWD_CONFIG, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    ba_kernels.FWD_CONFIG = best[1] if best else default
    # the combine of the partials (session 6, round 1: the slot loop unrolled, all S loads in flight, 4.608 ms
    # against 4.665 for the whole selection forward, 128-row programs 4.940); round 2: 32-row programs
    default_c = dict(ba_kernels.COMBINE_CONFIG)
    base = run()
    best = None
    for change in [{}, {"rows": 64}]:
        ba_kernels.COMBINE_CONFIG = {**default_c, **change}
        try:
            err = _rel_max(run(), base)
            ms = _bench(run)
            if err < 2.0**-10 and (best is None or ms < best[0] * 0.99):
                best = (ms, dict(ba_kernels.COMBINE_CONFIG))
            rows.append({"kernel": "slc combine", **ba_kernels.COMBINE_CONFIG, "ms": ms, "tflops": flops / ms / 1e9,
                         "diff_vs_default": err})
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            rows.append({"kernel": "slc combine", **ba_kernels.COMBINE_CONFIG, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    ba_kernels.COMBINE_CONFIG = best[1] if best else default_c
    return rows


def _sweep_win(layout, ins) -> list[dict]:
    """The window forward (plan + kernel) under several block_attn forward configs, starting from its own default;
    the fastest whose output matches (to 2⁻¹⁰ of its largest magnitude, 2⁻⁶ for another exp2 or shift) becomes
    ``WIN_FWD_CONFIG``."""
    q, k, v = (t.detach() for t in ins[:3])
    scale = D**-0.5
    default = dict(ba_kernels.WIN_FWD_CONFIG or ba_kernels.FWD_CONFIG)

    def run():
        if layout.win_perm is None:
            return window_attention(q, k, v, layout.win_offsets, scale=scale, backend="triton")
        p = layout.win_perm
        return window_attention(q[p], k[p], v[p], layout.win_offsets, scale=scale, backend="triton")[
            layout.win_inverse]

    base = run()
    rows, best = [], None
    # session 6, round 1 (ms): fixed shift with row sums on the tensor cores 0.81, + mix4 0.82, the online softmax
    # 0.72 (the default since); round 2: the fixed shift with per-row adds, 16-key tails, the tile table
    for change in [{}, {"shift": "bound"}, {"TAIL_N": 16}, {"tile_table": True}]:
        ba_kernels.WIN_FWD_CONFIG = {**default, **change}
        try:
            err = _rel_max(run(), base)
            ms = _bench(run)
            rounding = any(ba_kernels.WIN_FWD_CONFIG.get(k) != default.get(k) for k in ROUNDING_KEYS)
            if err < (2.0**-6 if rounding else 2.0**-10) and (best is None or ms < best[0] * 0.99):
                best = (ms, dict(ba_kernels.WIN_FWD_CONFIG))
            rows.append({"kernel": "win", **ba_kernels.WIN_FWD_CONFIG, "ms": ms, "diff_vs_default": err})
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            rows.append({"kernel": "win", **ba_kernels.WIN_FWD_CONFIG, "error": repr(e)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    ba_kernels.WIN_FWD_CONFIG = best[1] if best else default
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=str(Path(__file__).resolve().parents[2] / "shared/data/"
                                             "latent_layouts_1024.npz"))
    ap.add_argument("--sizes", default="8192,16384,32768,65536,131072")
    ap.add_argument("--configs", default="v1.1,v1.0")
    ap.add_argument("--sweep", default="", help="comma-separated kernels (compressed: fwd, topk (either config's), "
                    "topk_seg (v1.0's only), bwd_dq, bwd_dkdv; "
                    " slc / win: the selection / window forward) to sweep at the largest N before measuring it; the "
                    "fastest valid config of each is then used")
    ap.add_argument("--no-batch", action="store_true", help="skip the ragged batch")
    ap.add_argument("--no-module", action="store_true", help="skip the whole-layer rows")
    ap.add_argument("--no-shifted", action="store_true", help="skip the odd-layer (shifted windows) rows")
    ap.add_argument("--ab", action="store_true", help="also measure each row with the session-5 path (online "
                    "softmax in every forward) and the v1.0 layer with the torch conv backend")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of this script "
                    "(set TRITON_INTERPRET=1; float32; use with --tiny)")
    ap.add_argument("--tiny", type=int, default=0, help="only one mesh of this many tokens (a smoke run)")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import triton

    global DEV, DTYPE
    DEV, DTYPE = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton.__version__,
              "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "setup": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": str(DTYPE).removeprefix("torch."), "m_win": M_WIN,
                        "configs": CONFIGS,
                        "variants": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in VARIANTS.items()},
                        "compress_kernel_config": {k: dict(v) for k, v in tc.CONFIG.items()}},
              "rows": [], "module": []}
    sizes = args.sizes.split(",")
    cases = [([k], 0) for k in sizes] + ([] if args.no_batch else [(["65536", "16384"], 300)])
    if args.tiny:
        cases, sizes = [([], args.tiny)], [None]
    for keys, small in cases:
        x = _batch(args.layouts, keys, small)
        sdpa = None
        for name in args.configs.split(","):
            cfg = CONFIGS[name]
            layout = build_ssa_layout(x, m_cmp=cfg["m_cmp"], m_slc=cfg["m_slc"], m_win=M_WIN, shift=0)
            ins = _inputs(layout, gen)
            do = torch.randn(layout.num_tokens, HQ, D, device=DEV, generator=gen).to(DTYPE)
            last = keys == [sizes[-1]] or args.tiny
            if last and args.sweep:
                kernels = args.sweep.split(",")
                rows = _sweep_slc(layout, cfg["topk"], ins) if "slc" in kernels else []
                rows += _sweep_win(layout, ins) if "win" in kernels else []
                kernels = [kk for kk in kernels if kk not in ("slc", "win")]
                result.setdefault("sweep", {})[name] = rows + _sweep(layout, cfg["topk"], ins, do, kernels)
            if sdpa is None:
                sdpa = _sdpa(layout, ins, do)
            for variant in ["new"] + (["before", "new, repeated"] if args.ab else []):
                with _variant(variant):
                    row = {"config": name, "variant": variant, "meshes": keys + ([f"{small} tokens"] if small else []),
                           "N": layout.num_tokens, "samples": layout.batch_size, "slc_blocks": layout.num_slc,
                           "cmp_blocks": layout.num_cmp, "ssa": _measure(layout, cfg["topk"], ins, do),
                           "sdpa_flash": sdpa, "compress_kernel_config": {k: dict(v) for k, v in tc.CONFIG.items()}}
                    row["speedup_fwd"] = sdpa["fwd_ms"] / row["ssa"]["fwd_ms"]
                    row["speedup_bwd"] = sdpa["bwd_ms"] / row["ssa"]["bwd_ms"]
                    row["speedup_fwd_bwd"] = sdpa["fwd_bwd_ms"] / row["ssa"]["fwd_bwd_ms"]
                    if last and not args.no_shifted:  # odd layer: shifted windows, permuted to window order and back
                        shifted = build_ssa_layout(x, m_cmp=cfg["m_cmp"], m_slc=cfg["m_slc"], m_win=M_WIN,
                                                   shift=M_WIN // 2)
                        row["ssa_shifted"] = _measure(shifted, cfg["topk"], ins, do, with_branches=False)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                _record_used(result)
                _write(result, Path(args.out), quiet=True)  # what is measured so far survives a time cap
            del ins, do
            if last and not args.no_module:
                for conv_backend in ["auto"] + (["torch"] if args.ab and name == "v1.0" else []):
                    result["module"].append(_module_row(x, name, conv_backend))
                    print(json.dumps(result["module"][-1]), flush=True)
            if DEV == "cuda":
                torch.cuda.empty_cache()
    _record_used(result)
    _write(result, Path(args.out))


def _record_used(result: dict) -> None:
    """The launch configs in use (the defaults or the sweeps' winners) into the result's setup."""
    result["setup"]["compress_kernel_config_used"] = {k: dict(v) for k, v in tc.CONFIG.items()}
    result["setup"]["block_attn_fwd_config_used"] = dict(ba_kernels.FWD_CONFIG)
    result["setup"]["window_fwd_config_used"] = ba_kernels.WIN_FWD_CONFIG
    result["setup"]["combine_config_used"] = dict(ba_kernels.COMBINE_CONFIG)


def _write(result: dict, out: Path, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = result["device"].replace(" ", "_")
    lines = [f"# SSA (triton backend) on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"commit {result['commit']}, {result['date']})", "",
             f"Hq 32 / Hkv 2 / D 32, {result['setup']['dtype']}, window 8 (unshifted); op inputs q, k, v, k_cmp, "
             "v_cmp, gates; "
             "SDPA = flash full attention per sample. Times in ms (median, CUDA events). Variant `new`: the defaults "
             "or the swept winners (below); `before`: session 5's path (online softmax in "
             "every forward, session 5's launch configs; same run). "
             "`(cmp+top-k)/fwd` = (`cmp fwd` + `score+top-k`) / `SSA fwd`.", "",
             "| config | N | blocks slc/cmp | SSA fwd | SSA bwd | SSA fwd+bwd | SDPA fwd | SDPA bwd | speedup fwd "
             "| speedup bwd | cmp fwd | score+top-k | slc fwd | win fwd | (cmp+top-k)/fwd "
             "| slc TFLOP/s | cmp bwd | slc bwd | win bwd | combine fwd/bwd | peak extra MB fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, f, b = r["ssa"], r["sdpa_flash"], r["ssa"]["branches"]
        n = f"{r['N']:,}" + (f" ({r['samples']} meshes)" if r["samples"] > 1 else "")
        cfg = r["config"] + ("" if r.get("variant", "new") == "new" else f" ({r['variant']})")
        lines.append(
            f"| {cfg} | {n} | {r['slc_blocks']}/{r['cmp_blocks']} | {s['fwd_ms']:.2f} | {s['bwd_ms']:.2f} "
            f"| {s['fwd_bwd_ms']:.2f} | {f['fwd_ms']:.2f} | {f['bwd_ms']:.2f} | {r['speedup_fwd']:.1f}x "
            f"| {r['speedup_bwd']:.1f}x | {b['cmp_fwd_ms']:.2f} | {b['score_topk_ms']:.2f} "
            f"| {b['slc_fwd_ms']:.2f} "
            f"| {b['win_fwd_ms']:.2f} | {100 * b['cmp_plus_topk_share_of_fwd']:.0f}% | {b['slc_fwd_tflops']:.0f} "
            f"| {b['cmp_bwd_ms']:.2f} | {b['slc_bwd_ms']:.2f} | {b['win_bwd_ms']:.2f} "
            f"| {b['combine_fwd_ms']:.2f}/{b['combine_bwd_ms']:.2f} | {s['peak_extra_mb_fwd_bwd']:.0f} |")
    for r in result["rows"]:
        s, b = r["ssa"], r["ssa"]["branches"]
        if "fwd_ms_inference" in s:
            lines.append(f"\nSSA forward without autograd (inference), {r['config']}"
                         f": {s['fwd_ms_inference']:.2f} ms ({r['sdpa_flash']['fwd_ms'] / s['fwd_ms_inference']:.1f}x "
                         "SDPA flash's forward).")
        if "slc_plan_ms" in b:
            lines.append(f"\nSelection forward, {r['config']} ({r.get('variant', 'new')}): plan (entry sort) "
                         f"{b['slc_plan_ms']:.2f} ms, kernel + partial combine {b['slc_kernel_combine_ms']:.2f} ms "
                         f"(of {b['slc_fwd_ms']:.2f}; the combine alone {b.get('slc_combine_ms', float('nan')):.2f}).")
    for r in result["rows"]:
        if "ssa_shifted" in r:
            s = r["ssa_shifted"]
            lines.append(f"\nOdd layer (shifted windows), {r['config']} ({r.get('variant', 'new')}), N = {r['N']:,}: "
                         f"fwd {s['fwd_ms']:.2f} ms, "
                         f"bwd {s['bwd_ms']:.2f} ms, fwd+bwd {s['fwd_bwd_ms']:.2f} ms.")
    for name, rows in result.get("sweep", {}).items():
        used = result["setup"]["compress_kernel_config_used"]
        lines += ["", f"Sweep ({name}; winner = the config used afterwards, `*`): kernel, launch config, "
                  "ms, TFLOP/s (selection), difference from the default's output", "",
                  "| kernel | config | ms | TFLOP/s | diff vs default |", "|---|---|---|---|---|"]
        for r in rows:
            cfg = {k: v for k, v in r.items() if k not in ("kernel", "ms", "tflops", "diff_vs_default", "error")}
            win = cfg == {"slc": result["setup"]["block_attn_fwd_config_used"],
                          "win": result["setup"]["window_fwd_config_used"],
                          "slc combine": result["setup"]["combine_config_used"]}.get(r["kernel"], used.get(r["kernel"]))
            lines.append(f"| {r['kernel']}{' *' if win else ''} | {json.dumps(cfg)} | "
                         + (f"{r['ms']:.3f} | {r.get('tflops', float('nan')):.0f} | {r['diff_vs_default']:.2e} |"
                            if "ms" in r else f"error: {r['error'][:120]} | | |"))
    for m in result["module"]:
        lines.append(f"\nWhole `SpatialSparseAttention` layer ({m['config']}, conv backend {m['conv_backend']}, dim "
                     f"1024, projections and compression included), N = {m['N']:,}: inference fwd "
                     f"{m['fwd_ms_inference']:.2f} ms, training fwd+bwd {m['fwd_bwd_ms']:.2f} ms.")
    for path, text in ((out / f"ssa_{tag}.json", json.dumps(result, indent=1)),
                       (out / f"ssa_{tag}.md", "\n".join(lines) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
