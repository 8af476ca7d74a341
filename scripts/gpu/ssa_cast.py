"""The softmax forwards' probability cast to bfloat16 (for P·V): F2FP conversions (``cast: "cvt"``) against integer
add + byte permute (``"alu"``, ``d3s2.ops._exp2.cast_probs``). Times the compressed forward, the selection forward
and the window forward under each, A/B/A/B in one process, and prints each variant's largest difference from the
``cvt`` output. Usage (device, repository root)::

    PYTHONPATH=src python3 scripts/gpu/ssa_cast.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import sys
from pathlib import Path

import torch
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
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    x = b._batch(args.layouts, [args.size])
    layout = b.build_ssa_layout(x, m_cmp=8, m_slc=8, m_win=b.M_WIN, shift=0)
    q, k, v, kc, vc, _ = (t.detach() for t in b._inputs(layout, torch.Generator("cuda").manual_seed(0)))
    scale = b.D**-0.5
    idx = b.tc.cmp_select_topk(q, kc, b.tc.cmp_attention_fwd(q, kc, vc, layout, scale)[1], layout, 8, scale)
    off = layout.slc_offsets
    fns = {
        "compressed fwd": lambda: b.tc.cmp_attention_fwd(q, kc, vc, layout, scale)[0],
        "selection fwd": lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"),
        "window fwd": lambda: window_attention(q, k, v, layout.win_offsets, scale=scale, backend="triton"),
    }
    saved = (dict(b.tc.CONFIG["fwd"]), dict(ba.FWD_CONFIG), dict(ba.WIN_FWD_CONFIG))

    def use(cast: str) -> None:
        b.tc.CONFIG["fwd"] = {**saved[0], "cast": cast}
        ba.FWD_CONFIG = {**saved[1], "cast": cast}
        ba.WIN_FWD_CONFIG = {**saved[2], "cast": cast}

    times = {(name, cast): [] for name in fns for cast in ("cvt", "alu")}
    refs = {}
    try:
        for cast in ("cvt", "alu"):
            use(cast)
            for name, fn in fns.items():
                out = fn().float()
                if cast == "cvt":
                    refs[name] = out
                else:
                    err = (out - refs[name]).abs().max().item()
                    print(f"{name}: max |alu - cvt| = {err:.3e} (max |out| {refs[name].abs().max().item():.3f})")
        for _ in range(args.rounds):
            for cast in ("cvt", "alu"):
                use(cast)
                for name, fn in fns.items():
                    times[(name, cast)].append(do_bench(fn, rep=100, return_mode="median"))
    finally:
        b.tc.CONFIG["fwd"], ba.FWD_CONFIG, ba.WIN_FWD_CONFIG = saved
    print("| kernel | cvt ms (rounds) | alu ms (rounds) |\n|---|---|---|")
    for name in fns:
        row = [" / ".join(f"{t:.3f}" for t in times[(name, c)]) for c in ("cvt", "alu")]
        print(f"| {name} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
