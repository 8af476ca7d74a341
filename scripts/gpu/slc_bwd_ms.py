"""Backward time of the v1.1 selection at N = 134k (bf16, the op's own top-k of seed-0 inputs: balanced lists) with
the dK/dV lists cut into chunks (``DKDV_SPLIT``) and without (one program per list), alternated; do_bench medians in
ms, one JSON line per (round, variant). Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/slc_bwd_ms.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

import d3s2.ops.block_attn.triton as ba  # noqa: E402
from d3s2.ops.block_attn import selection_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts)
    q, k, v, idx, off, scale = (st[n] for n in ("q", "k", "v", "idx", "off", "scale"))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    base = dict(ba.DKDV_SPLIT)
    out = selection_attention(q, k, v, off, idx, scale=scale, backend="triton", max_block_len=512)
    for r in range(args.rounds):
        for name, cfg in (("split", base), ("one program per list", {**base, "max_chunks": 1})):
            ba.DKDV_SPLIT = cfg
            ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), rep=200,
                          return_mode="median")
            print(json.dumps({"round": r, "variant": name, "bwd_ms": ms}), flush=True)
    ba.DKDV_SPLIT = base


if __name__ == "__main__":
    main()
