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


def kernel_times(fn, reps: int) -> list[tuple[str, float, float]]:
    """(kernel name, launches per call, GPU ms per call) of ``fn``, most time first: torch.profiler over ``reps`` calls
    after three warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    return [(e.key, e.count / reps, e.device_time_total / reps / 1e3) for e in events]


def table(fn, reps: int, title: str, rows: int) -> None:
    times = kernel_times(fn, reps)
    print(f"\n## {title}: {sum(ms for _, _, ms in times):.3f} ms of kernels per call ({reps} calls)")
    print("| kernel | calls per call | ms per call |\n|---|---|---|")
    for name, count, ms in times[:rows]:
        print(f"| {name[:90]} | {count:.0f} | {ms:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts, args.size)
    layout, q, k, v, kc, vc, gates = (st[n] for n in ("layout", "q", "k", "v", "kc", "vc", "gates"))
    scale, idx, off = st["scale"], st["idx"], st["off"]
    table(lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"), args.reps,
          "selection forward", args.rows)
    with torch.no_grad():
        table(lambda: b.spatial_sparse_attention(q, k, v, kc, vc, gates, layout, topk=8, scale=scale,
                                                 backend="triton"), args.reps, "whole SSA forward (no autograd)",
              args.rows)


if __name__ == "__main__":
    main()
