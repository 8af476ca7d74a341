"""How balanced are the selection's (kv head, block) lists in a sparse DiT at initialisation? Runs a forward of the
v1.1 1024³ sparse DiT (published width, a few blocks) on a real layout, records every selection plan, and prints
per layer: entries, lists, the longest list and mean list length, and the longest list's share of all entries.
Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/dit_selection_stats.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

import d3s2.ops.block_attn.triton as ba  # noqa: E402
from d3s2.models.dit import SparseDiT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args()
    b.DEV = "cuda"
    x = b._batch(args.layouts, [args.size])
    cfg = SparseDiT.Config.v1_1(1024, num_blocks=args.blocks)
    model = SparseDiT(cfg).cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    xin = x.replace(torch.randn(x.num_voxels, cfg.in_channels, device="cuda", generator=gen))
    plans = []
    original = ba.selection_plan

    def recording(block_idx, num_blocks, *a, **k):
        plan = original(block_idx, num_blocks, *a, **k)
        plans.append(plan)
        return plan

    ba.selection_plan = recording
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(xin, torch.full((1,), 500.0, device="cuda"), torch.randn(1, 1374, cfg.cond_channels, device="cuda"))
    ba.selection_plan = original
    for i, p in enumerate(plans):
        c = p.list_count.float()
        print(json.dumps({"layer": i, "entries": int(c.sum()), "lists": c.numel(), "max_list": int(c.max()),
                          "mean_list": round(float(c.mean()), 1), "p99_list": float(c.quantile(0.99)),
                          "max_share": round(float(c.max() / c.sum()), 4)}), flush=True)


if __name__ == "__main__":
    main()
