"""GPU time per kernel of the SSA forward (triton backend) and of its selection branch, by torch.profiler.

The bench times whole calls; this lists what runs inside them (the small torch ops around the kernels included),
summed over ``--reps`` calls and divided by them. Usage (device, from the repository root)::

    PYTHONPATH=src python3 scripts/gpu/ssa_kernel_profile.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

from d3s2.ops.block_attn import selection_attention  # noqa: E402


def table(fn, reps: int, title: str, rows: int) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / reps / 1e3
    print(f"\n## {title}: {total:.3f} ms of kernels per call ({reps} calls)")
    print("| kernel | calls per call | ms per call |\n|---|---|---|")
    for e in events[:rows]:
        print(f"| {e.key[:90]} | {e.count / reps:.0f} | {e.device_time_total / reps / 1e3:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    x = b._batch(args.layouts, [args.size])
    layout = b.build_ssa_layout(x, m_cmp=8, m_slc=8, m_win=b.M_WIN, shift=0)
    q, k, v, kc, vc, gates = (t.detach() for t in b._inputs(layout, torch.Generator("cuda").manual_seed(0)))
    scale = b.D**-0.5
    idx = b.tc.cmp_select_topk(q, kc, b.tc.cmp_attention_fwd(q, kc, vc, layout, scale)[1], layout, 8, scale)
    off = layout.slc_offsets
    table(lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"), args.reps,
          "selection forward", args.rows)
    with torch.no_grad():
        table(lambda: b.spatial_sparse_attention(q, k, v, kc, vc, gates, layout, topk=8, scale=scale,
                                                 backend="triton"), args.reps, "whole SSA forward (no autograd)",
              args.rows)


if __name__ == "__main__":
    main()
