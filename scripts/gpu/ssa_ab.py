"""A/B timings of SSA forward kernels under config overrides, interleaved in one process (v1.1, N = 134k, bf16).

``--variants`` is JSON: name → overrides, each ``{"cmp": {...}}`` (``triton_compress.CONFIG["fwd"]``), ``{"topk":
{...}}`` (``CONFIG["topk"]``), ``{"topk_seg": {...}}`` (``CONFIG["topk_seg"]``, with ``--m-cmp 4``), ``{"bwd_dq":
{...}}`` / ``{"bwd_dkdv": {...}}`` (the compressed backward's, kernel ``cmp_bwd``: dq, dk, dv flattened), ``{"slc":
{...}}`` (``block_attn.triton.FWD_CONFIG``), ``{"bdq": {...}}`` / ``{"bkv": {...}}`` (``BWD_DQ_CONFIG`` /
``BWD_DKDV_CONFIG``: kernels ``slc_bwd`` and ``win_bwd``, dq, dk, dv flattened) or ``{"win": {...}}``
(``WIN_FWD_CONFIG``), and ``"mma2": true`` compiles every SSA kernel with mma.sync instead of wgmma (Triton's
``DISABLE_MMA_V3``, on clones of the kernels so both builds stay loaded); the first variant is the baseline whose
outputs the others are compared with. Prints each kernel's median ms per round and each variant's largest output
difference from the baseline. Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/ssa_ab.py --layouts .gpu/layouts/latent_layouts_1024.npz \\
        --variants '{"base": {}, "cmp92": {"cmp": {"maxnreg": 92}}}' --kernels cmp
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from triton.runtime.jit import JITFunction
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

import d3s2.ops.block_attn.triton as ba  # noqa: E402
from d3s2.ops.block_attn import selection_attention, window_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--kernels", default="cmp,topk,slc,win")
    ap.add_argument("--m-cmp", type=int, default=8, help="4: v1.0's compression blocks (its top-k is topk_seg)")
    args = ap.parse_args()
    variants = json.loads(args.variants)
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts, args.size, args.m_cmp)
    layout, q, k, v, kc, vc = (st[n] for n in ("layout", "q", "k", "v", "kc", "vc"))
    scale, lse, idx, off = st["scale"], st["lse"], st["idx"], st["off"]
    o_cmp = b.tc.cmp_attention_fwd(q, kc, vc, layout, scale)[0]
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    o_slc = selection_attention(*leaves, off, idx, scale=scale, backend="triton")
    o_win = window_attention(*leaves, layout.win_offsets, scale=scale, backend="triton")
    do_cmp = torch.randn(o_cmp.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda").to(q.dtype)
    fns = {
        "cmp": lambda: b.tc.cmp_attention_fwd(q, kc, vc, layout, scale)[0],
        "topk": lambda: b.tc.cmp_select_topk(q, kc, lse, layout, 8, scale),
        "cmp_bwd": lambda: torch.cat([t.float().flatten() for t in b.tc.cmp_attention_bwd(q, kc, vc, o_cmp, lse, do_cmp,
                                                                                          layout, scale)]),
        "slc": lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"),
        "slc_bwd": lambda: torch.cat([t.float().flatten() for t in torch.autograd.grad(o_slc, leaves, do_cmp,
                                                                                       retain_graph=True)]),
        "win_bwd": lambda: torch.cat([t.float().flatten() for t in torch.autograd.grad(o_win, leaves, do_cmp,
                                                                                       retain_graph=True)]),
        "win": lambda: window_attention(q, k, v, layout.win_offsets, scale=scale, backend="triton"),
    }
    fns = {name: fns[name] for name in args.kernels.split(",")}
    saved = {"cmp": dict(b.tc.CONFIG["fwd"]), "topk": dict(b.tc.CONFIG["topk"]),
             "topk_seg": dict(b.tc.CONFIG["topk_seg"]), "bwd_dq": dict(b.tc.CONFIG["bwd_dq"]),
             "bwd_dkdv": dict(b.tc.CONFIG["bwd_dkdv"]), "slc": dict(ba.FWD_CONFIG), "win": dict(ba.WIN_FWD_CONFIG),
             "bdq": dict(ba.BWD_DQ_CONFIG), "bkv": dict(ba.BWD_DKDV_CONFIG)}

    modules = (b.tc, ba)
    wgmma = [{n: f for n, f in vars(m).items() if isinstance(f, JITFunction)} for m in modules]
    # clones: their own in-memory caches; DISABLE_MMA_V3 is in Triton's disk-cache key
    mma_sync = [{n: JITFunction(f.fn, do_not_specialize=f.do_not_specialize, debug=f.debug, noinline=f.noinline,
                                do_not_specialize_on_alignment=f.do_not_specialize_on_alignment)
                 for n, f in kernels.items()} for kernels in wgmma]

    def use(over: dict) -> None:
        for module, kernels in zip(modules, mma_sync if over.get("mma2") else wgmma):
            for name, fn in kernels.items():
                setattr(module, name, fn)
        if over.get("mma2"):
            os.environ["DISABLE_MMA_V3"] = "1"
        else:
            os.environ.pop("DISABLE_MMA_V3", None)
        b.tc.CONFIG["fwd"] = {**saved["cmp"], **over.get("cmp", {})}
        b.tc.CONFIG["topk"] = {**saved["topk"], **over.get("topk", {})}
        b.tc.CONFIG["topk_seg"] = {**saved["topk_seg"], **over.get("topk_seg", {})}
        b.tc.CONFIG["bwd_dq"] = {**saved["bwd_dq"], **over.get("bwd_dq", {})}
        b.tc.CONFIG["bwd_dkdv"] = {**saved["bwd_dkdv"], **over.get("bwd_dkdv", {})}
        ba.FWD_CONFIG = {**saved["slc"], **over.get("slc", {})}
        ba.WIN_FWD_CONFIG = {**saved["win"], **over.get("win", {})}
        ba.BWD_DQ_CONFIG = {**saved["bdq"], **over.get("bdq", {})}
        ba.BWD_DKDV_CONFIG = {**saved["bkv"], **over.get("bkv", {})}

    times = {(kn, vn): [] for kn in fns for vn in variants}
    refs = {}
    base = next(iter(variants))
    try:
        for vn, over in variants.items():
            use(over)
            for kn, fn in fns.items():
                out = fn()
                if kn not in refs:
                    refs[kn] = out
                elif out.is_floating_point():
                    print(f"{vn} {kn}: max |diff| from {base} {(out.float() - refs[kn].float()).abs().max():.3e}")
                else:
                    print(f"{vn} {kn}: entries differing from {base} {(out != refs[kn]).float().mean():.2e}")
        for _ in range(args.rounds):
            for vn, over in variants.items():
                use(over)
                for kn, fn in fns.items():
                    times[(kn, vn)].append(do_bench(fn, rep=100, return_mode="median"))
    finally:
        use({})
    print("| kernel | " + " | ".join(f"{vn} ms" for vn in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for kn in fns:
        cells = [" / ".join(f"{t:.3f}" for t in times[(kn, vn)]) for vn in variants]
        print(f"| {kn} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
