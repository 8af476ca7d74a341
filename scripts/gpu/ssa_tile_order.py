"""Does the order of the selection forward's tiles matter? Same tiles (the tile-table path), launched in list order
(today: all tiles of a (kv head, block) list together, so the gathered query rows of one moment are spread over all
N tokens) or in query order (the tiles whose first entry is the lowest query first, so the tiles running at one
moment gather the same few thousand queries' rows and their 8 slots × Hkv re-reads hit L2).

Prints ms per variant (do_bench of ``block_attn_fwd``: kernel + combine) and per kernel (torch.profiler), and
checks that every order gives bit-identical outputs. Usage (device, repository root)::

    PYTHONPATH=src python3 scripts/gpu/ssa_tile_order.py --layouts .gpu/layouts/latent_layouts_1024.npz
"""

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402
from ssa_kernel_profile import kernel_times  # noqa: E402 (this script's folder)

import d3s2.ops.block_attn.triton as ba  # noqa: E402


def kernel_ms(fn, prefix: str) -> float:
    """GPU ms per call of ``fn``'s kernels whose name starts with ``prefix``."""
    return sum(ms for name, _, ms in kernel_times(fn, 10) if name.startswith(prefix))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    args = ap.parse_args()
    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts, args.size)
    q, k, v, idx, scale = st["q"], st["k"], st["v"], st["idx"], st["scale"]
    off = st["off"].to(torch.int32)
    plan = ba.selection_plan(idx, off.numel() - 1)
    meta = ba._meta(q, k)
    per_tile = ba._block_m(ba.FWD_CONFIG, meta["G_PAD"]) // meta["G_PAD"]
    num_lists = k.shape[1] * plan.num_blocks
    bound = (plan.entry.numel() + per_tile - 1) // per_tile + num_lists
    table = ba._tile_table(plan, per_tile, bound, off)
    active = table[:, 0] < num_lists
    hs = k.shape[1] * plan.num_slots
    first_q = torch.where(active, plan.entry[table[:, 1].clamp(0, plan.entry.numel() - 1).long()] // hs,
                          torch.iinfo(torch.int32).max)
    lst = table[:, 0].long()
    starts = torch.zeros(num_lists + 1, dtype=torch.long, device=q.device)
    starts[1:] = torch.cumsum(((plan.list_count.long() + per_tile - 1) // per_tile), 0)
    chunk = torch.where(active, torch.arange(bound, device=q.device) - starts[lst.clamp(max=num_lists - 1)],
                        torch.iinfo(torch.int32).max)
    orders = {
        "list (table as built)": torch.arange(bound, device=q.device),
        "query (first entry's query)": torch.sort(first_q, stable=True)[1],
        "query // 64": torch.sort(first_q // 64, stable=True)[1],
        "query // 1024": torch.sort(first_q // 1024, stable=True)[1],
        "chunk-major": torch.sort(chunk, stable=True)[1],
    }
    print(f"N = {q.shape[0]}, tiles {int(active.sum())} of {bound}, lists {num_lists}")
    built = ba._tile_table
    saved = dict(ba.FWD_CONFIG)
    print("| order | block_attn_fwd ms (do_bench median) | attention kernel ms | combine ms | same output |")
    print("|---|---|---|---|---|")
    try:
        ba.FWD_CONFIG = {**saved, "tile_table": False}
        o0, _ = ba.block_attn_fwd(q, k, v, off, idx, plan, scale)
        ms = do_bench(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), rep=100, return_mode="median")
        kern = kernel_ms(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), "block_attn_fwd_kernel")
        comb = kernel_ms(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), "block_attn_combine")
        print(f"| default (no table) | {ms:.3f} | {kern:.3f} | {comb:.3f} | reference |")
        ba.FWD_CONFIG = {**saved, "tile_table": True}
        for name, perm in orders.items():
            permuted = table[perm].contiguous()
            ba._tile_table = lambda *a, t=permuted: t
            o, _ = ba.block_attn_fwd(q, k, v, off, idx, plan, scale)
            same = bool(torch.equal(o, o0))
            ms = do_bench(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), rep=100, return_mode="median")
            kern = kernel_ms(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), "block_attn_fwd_kernel")
            comb = kernel_ms(lambda: ba.block_attn_fwd(q, k, v, off, idx, plan, scale), "block_attn_combine")
            print(f"| {name} | {ms:.3f} | {kern:.3f} | {comb:.3f} | {same} |")
    finally:
        ba._tile_table = built
        ba.FWD_CONFIG = saved


if __name__ == "__main__":
    main()
