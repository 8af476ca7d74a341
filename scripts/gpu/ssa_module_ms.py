"""Whole ``SpatialSparseAttention`` layer at N = 134k (bf16, dim 1024; v1.1 and v1.0): inference forward and
training forward + backward times (``bench_ssa._module_row``), one JSON line per config, and with ``--profile`` the
GPU time per kernel of one training step (``ssa_kernel_profile.table``). Runs the ``d3s2`` on PYTHONPATH, so two
trees can be compared in one device call. Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/ssa_module_ms.py --layouts .gpu/layouts/latent_layouts_1024.npz --tag new
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ssa as b  # noqa: E402
from ssa_kernel_profile import table  # noqa: E402

import d3s2.models.attention.ssa as module_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--configs", default="v1.1,v1.0")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    x = b._batch(args.layouts, ["131072"])
    for name in args.configs.split(","):
        row = b._module_row(x, name)
        print(json.dumps({"tag": args.tag, "module": module_file.__file__, **row}), flush=True)
        if args.profile:
            from d3s2.models.attention import SpatialSparseAttention

            cfg = SpatialSparseAttention.Config.v1_1() if name == "v1.1" else SpatialSparseAttention.Config.v1_0()
            m = SpatialSparseAttention(cfg).to("cuda", torch.bfloat16)
            xin = x.replace(torch.randn(x.num_voxels, cfg.dim, device="cuda", dtype=torch.bfloat16))

            def step(m=m, xin=xin):
                m(xin, backend="triton").feats.float().square().mean().backward()

            table(step, 3, f"{args.tag} {name} training step (forward + backward)", args.rows)


if __name__ == "__main__":
    main()
