"""Benchmark block attention (SSA selection branch, 8³ window attention) on real latent layouts.

Layouts: ``latent_layouts_1024.npz`` (0 A.D. meshes at 1024³ / 8 → 128³ latent, N ≈ 8k…134k), tokens sorted by
8³ block; every query selects its own block + 7 random distinct blocks of its sample per kv head (as the
published measurement did). Hq 32 / Hkv 2 / D 32, bf16. Reports forward and backward ms, effective TFLOP/s
(selection: 4·D·Σ_queries Σ_selected |block| per query head; window: 4·D·Hq·Σ_w |w|²; backward counted as
2.5× the forward), peak extra memory, and PyTorch SDPA flash full attention over the same tokens.

    python benchmarks/bench_block_attn.py --layouts ../shared/data/latent_layouts_1024.npz [--sweep]

Writes ``block_attn_<device>.json`` and ``.md`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d3s2 import sparse as sp
from d3s2.ops.block_attn import selection_attention, window_attention
from d3s2.ops.block_attn import triton as kernels

HQ, HKV, D, TOPK, BLOCK = 32, 2, 32, 8, 8


def _layout(path: str, key: str, device: str):
    xyz = torch.from_numpy(np.load(path)[key].astype(np.int32))
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32), xyz], 1).to(device)
    x = sp.SparseTensor(torch.zeros(len(xyz), 1, device=device), coords, resolution=128, batch_size=1)
    return x, sp.block_sort(x, BLOCK), sp.window_partition(x, BLOCK, 0)


def _own_plus_random(block_ids: torch.Tensor, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [N, Hkv, TOPK]: own block first, then TOPK-1 distinct random other blocks (one sample)."""
    n = block_ids.numel()
    out = torch.empty(n, HKV, TOPK, dtype=torch.int32, device=block_ids.device)
    rows = max(1, (1 << 25) // (HKV * num_blocks))
    for r0 in range(0, n, rows):
        own = block_ids[r0:r0 + rows].long()
        keys = torch.rand(own.numel(), HKV, num_blocks, device=block_ids.device, generator=gen)
        keys.scatter_(2, own[:, None, None].expand(-1, HKV, 1), -1.0)  # never pick the own block twice
        out[r0:r0 + rows, :, 0] = own[:, None].to(torch.int32)
        out[r0:r0 + rows, :, 1:] = keys.topk(TOPK - 1, -1).indices.to(torch.int32)
    return out


def _bench(fn, warmup=10, rep=50) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _qkv(n, dtype, device, gen):
    q = torch.randn(n, HQ, D, device=device, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(n, HKV, D, device=device, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(n, HKV, D, device=device, generator=gen).to(dtype).requires_grad_()
    return q, k, v


def _fwd_bwd(call, q, k, v, do) -> dict:
    fwd = _bench(lambda: call(q, k, v))
    o = call(q, k, v)
    bwd = _bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    mem_f = _peak_extra_mb(lambda: call(q, k, v))
    mem_fb = _peak_extra_mb(lambda: torch.autograd.grad(call(q, k, v), (q, k, v), do))
    return {"fwd_ms": fwd, "bwd_ms": bwd, "peak_extra_mb_fwd": mem_f, "peak_extra_mb_fwd_bwd": mem_fb}


def _sdpa(q, k, v, do) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (q, k, v))
    dot = do.transpose(0, 1)[None].contiguous()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def call():
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        fwd = _bench(call, warmup=1, rep=1)
        o = call()
        bwd = _bench(lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True), warmup=1, rep=1)
    return {"fwd_ms": fwd, "bwd_ms": bwd}


def _sweep(q, k, v, off, idx, do, dtype) -> list[dict]:
    """Time the kernels alone under several launch configurations (N fixed); check each against the default."""
    scale = D**-0.5
    plan = kernels.selection_plan(idx, off.numel() - 1)
    flops = _selection_flops(off, idx)
    base, _ = kernels.block_attn_fwd(q, k, v, off, idx, plan, scale)
    rows = []
    fwd_cfgs = [(128, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 16, 4, 2)]
    for pdt in (torch.float32, dtype):
        for bm, bn, w, st in fwd_cfgs if pdt == torch.float32 else fwd_cfgs[:1]:
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
            try:
                o, _ = kernels.block_attn_fwd(q, k, v, off, idx, plan, scale, cfg, pdt)
                err = ((o.float() - base.float()).norm() / base.float().norm()).item()
                ms = _bench(lambda cfg=cfg, pdt=pdt: kernels.block_attn_fwd(q, k, v, off, idx, plan, scale, cfg, pdt))
                rows.append({"kernel": "fwd", **cfg, "partial": str(pdt), "ms": ms, "tflops": flops / ms / 1e9,
                             "rel_err_vs_default": err})
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                rows.append({"kernel": "fwd", **cfg, "partial": str(pdt), "error": repr(e)[:200]})
            print(rows[-1], flush=True)
    o, lse = kernels.block_attn_fwd(q, k, v, off, idx, plan, scale)
    ref = kernels.block_attn_bwd(do, q, k, v, o, lse, off, idx, plan, scale)
    bwd_cfgs = [
        ({"BLOCK_M": 128, "BLOCK_N": 32}, {"BLOCK_M": 128, "BLOCK_N": 64}),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 64}),
        ({"BLOCK_M": 128, "BLOCK_N": 32}, {"BLOCK_M": 128, "BLOCK_N": 32}),
    ]
    for dq_cfg, dkdv_cfg in bwd_cfgs:
        try:
            got = kernels.block_attn_bwd(do, q, k, v, o, lse, off, idx, plan, scale, dq_cfg, dkdv_cfg)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
            ms = _bench(lambda a=dq_cfg, b=dkdv_cfg: kernels.block_attn_bwd(do, q, k, v, o, lse, off, idx, plan,
                                                                              scale, a, b))
            rows.append({"kernel": "bwd", "dq": dq_cfg, "dkdv": dkdv_cfg, "ms": ms,
                         "tflops": 2.5 * flops / ms / 1e9, "rel_err_vs_default": err})
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": "bwd", "dq": dq_cfg, "dkdv": dkdv_cfg, "error": repr(e)[:200]})
        print(rows[-1], flush=True)
    return rows


def _selection_flops(off: torch.Tensor, idx: torch.Tensor) -> float:
    lengths = (off[1:] - off[:-1]).long()
    sel = lengths[idx.long().clamp_min(0)] * (idx >= 0)
    return 4.0 * D * (HQ // HKV) * float(sel.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=str(Path(__file__).resolve().parents[2] / "shared/data/"
                                             "latent_layouts_1024.npz"))
    ap.add_argument("--sizes", default="8192,16384,32768,65536,131072")
    ap.add_argument("--sdpa-max-n", type=int, default=1 << 30, help="skip SDPA above this many tokens")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs at the largest size")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import triton

    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    device_name = torch.cuda.get_device_name()
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": {"Hq": HQ, "Hkv": HKV, "D": D, "topk": TOPK, "block": BLOCK, "dtype": "bfloat16",
                         "selection": "own block + 7 random distinct blocks per (query, kv head)",
                         "fwd_cfg": kernels.FWD_CONFIG, "dq_cfg": kernels.BWD_DQ_CONFIG,
                         "dkdv_cfg": kernels.BWD_DKDV_CONFIG, "partial_dtype": str(kernels.PARTIAL_DTYPE)},
              "rows": []}
    for key in args.sizes.split(","):
        x, bs, ws = _layout(args.layouts, key, dev)
        n = x.num_voxels
        q, k, v = _qkv(n, dtype, dev, gen)
        do = torch.randn(n, HQ, D, device=dev, generator=gen).to(dtype)
        off = bs.block_offsets
        idx = _own_plus_random(bs.block_ids, bs.num_blocks, gen)
        sel_flops = _selection_flops(off, idx)
        wl = (ws.block_offsets[1:] - ws.block_offsets[:-1]).double()
        win_flops = 4.0 * D * HQ * float((wl * wl).sum())
        row = {"N": n, "blocks": bs.num_blocks, "windows": ws.num_blocks, "selection_gflop_fwd": sel_flops / 1e9,
               "window_gflop_fwd": win_flops / 1e9}
        plan_ms = _bench(lambda idx=idx, off=off: kernels.selection_plan(idx, off.numel() - 1))
        sel = _fwd_bwd(lambda q, k, v, off=off, idx=idx: selection_attention(q, k, v, off, idx, backend="triton"),
                       q, k, v, do)
        sel.update(plan_ms=plan_ms, fwd_tflops=sel_flops / sel["fwd_ms"] / 1e9,
                   bwd_tflops=2.5 * sel_flops / sel["bwd_ms"] / 1e9)
        woff = ws.block_offsets
        win = _fwd_bwd(lambda q, k, v, woff=woff: window_attention(q, k, v, woff, backend="triton"), q, k, v, do)
        win.update(fwd_tflops=win_flops / win["fwd_ms"] / 1e9, bwd_tflops=2.5 * win_flops / win["bwd_ms"] / 1e9)
        row.update(selection=sel, window=win)
        if n <= args.sdpa_max_n:
            full = _sdpa(q, k, v, do)
            full.update(fwd_tflops=4.0 * n * n * D * HQ / full["fwd_ms"] / 1e9)
            row["sdpa_flash_full"] = full
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.sweep and key == args.sizes.split(",")[-1]:
            result["sweep"] = _sweep(q.detach(), k.detach(), v.detach(), off, idx, do, dtype)
        del q, k, v, do
        torch.cuda.empty_cache()
    _write(result, Path(args.out))


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = result["device"].replace(" ", "_")
    lines = [f"# block_attn on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"commit {result['commit']}, {result['date']})", "",
             "Hq 32 / Hkv 2 / D 32, bf16; selection = own 8³ block + 7 random blocks; window = 8³, no shift.", "",
             "| N | blocks | sel fwd ms | sel fwd TFLOP/s | sel bwd ms | sel bwd TFLOP/s | win fwd ms | win bwd ms "
             "| SDPA full fwd ms | SDPA full bwd ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s, w, f = r["selection"], r["window"], r.get("sdpa_flash_full", {})
        lines.append(f"| {r['N']:,} | {r['blocks']} | {s['fwd_ms']:.3f} | {s['fwd_tflops']:.0f} | {s['bwd_ms']:.3f} "
                     f"| {s['bwd_tflops']:.0f} | {w['fwd_ms']:.3f} | {w['bwd_ms']:.3f} | "
                     f"{f.get('fwd_ms', float('nan')):.2f} | {f.get('bwd_ms', float('nan')):.2f} |")
    for path, text in ((out / f"block_attn_{tag}.json", json.dumps(result, indent=1)),
                       (out / f"block_attn_{tag}.md", "\n".join(lines) + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
