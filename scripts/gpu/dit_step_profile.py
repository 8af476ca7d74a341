"""One training step (forward + backward under bf16 autocast, fp32 weights) of the v1.1 1024³ sparse DiT at its
published width, a few blocks deep, on a real latent layout: step time (do_bench median) and the GPU time per kernel
(``ssa_kernel_profile.table``), to find what dominates training besides the attention kernels. Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/dit_step_profile.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ssa as b  # noqa: E402
from ssa_kernel_profile import table  # noqa: E402

from d3s2.models.dit import SparseDiT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-split", action="store_true", help="dK/dV with one program per list (DKDV_SPLIT off)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    if args.no_split:
        import d3s2.ops.block_attn.triton as ba

        ba.DKDV_SPLIT = {**ba.DKDV_SPLIT, "max_chunks": 1}
    b.DEV = "cuda"
    x = b._batch(args.layouts, [args.size])
    cfg = SparseDiT.Config.v1_1(1024, num_blocks=args.blocks)
    model = SparseDiT(cfg).cuda().train()
    gen = torch.Generator("cuda").manual_seed(0)
    xin = x.replace(torch.randn(x.num_voxels, cfg.in_channels, device="cuda", generator=gen))
    t = torch.rand(1, device="cuda", generator=gen) * 1000
    cond = torch.randn(1, 1374, cfg.cond_channels, device="cuda", generator=gen)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xin, t, cond)
        out.feats.float().square().mean().backward()

    ms = do_bench(step, warmup=3, rep=20, return_mode="median")
    print(json.dumps({"N": x.num_voxels, "blocks": args.blocks, "split": not args.no_split, "step_ms": ms,
                      "ms_per_block": ms / args.blocks, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}),
          flush=True)
    if not args.no_profile:
        table(step, 2, f"sparse DiT v1.1 1024³, {args.blocks} blocks, N = {x.num_voxels:,}: training step", args.rows)


if __name__ == "__main__":
    main()
