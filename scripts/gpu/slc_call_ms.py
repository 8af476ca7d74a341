"""Whole-call times of the v1.1 selection forward at N = 134k (bf16): ``selection_attention`` (plan + kernel +
combine), the plan alone and ``block_attn_fwd`` with the plan given; do_bench medians in ms, one line of JSON. Runs
the ``d3s2`` on PYTHONPATH, so two trees can be compared in one device call. Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/slc_call_ms.py --layouts .gpu/layouts/latent_layouts_1024.npz --tag new
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
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts)
    q, k, v, idx, off, scale = (st[n] for n in ("q", "k", "v", "idx", "off", "scale"))
    plan = ba.selection_plan(idx, off.numel() - 1)
    row = {"tag": args.tag, "module": ba.__file__,
           "call_ms": do_bench(lambda: selection_attention(q, k, v, off, idx, scale=scale, backend="triton"),
                               rep=200, return_mode="median"),
           "plan_ms": do_bench(lambda: ba.selection_plan(idx, off.numel() - 1), rep=200, return_mode="median"),
           "fwd_given_plan_ms": do_bench(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), rep=200,
                                         return_mode="median")}
    row["call_tflops"] = b._selection_flops(off, idx) / row["call_ms"] / 1e9
    print(json.dumps(row))


if __name__ == "__main__":
    main()
