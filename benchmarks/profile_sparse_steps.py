"""Per-step time and a torch.profiler top-ops table of a DiT's guided sampling steps (sparse or dense).

The sampling loop of one stage as the pipeline runs it (``sample_euler``, CFG 7, one batched forward of the
[cond, uncond] pair per step) with a full-size random-weight v1.1 ``SparseDiT`` in bf16 on a real 0 A.D. token
layout (``latent_layouts_1024.npz``, halved for 512³), or with ``--model dense`` the ``DenseDiT`` on its 8 × 16³
latent. Reports ms per step over ``--steps`` steps after ``--warmup`` steps (the first step of a stage also
builds the layout structures, so it is timed alone), with CUDA-graph replay (the default on CUDA) and, with
``--cuda-graph``, also eagerly; the profiler's top ops by device and host time over ``--profile-steps`` eager
steps, and the kernel launches per step.

    python benchmarks/profile_sparse_steps.py --layouts PATH --out-dir $OUT     # GPU, full size
    python benchmarks/profile_sparse_steps.py --model dense --resolutions 512   # GPU, dense DiT
    python benchmarks/profile_sparse_steps.py --tiny --device cpu               # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from _common import DEFAULT_LAYOUTS, default_out_dir, environment, load_layouts, write_outputs

from d3s2.flow.cuda_graph import use_cuda_graphs

COND_TOKENS = 1374  # DINOv2 ViT-L/14-reg4 at 518²: 37² patches + cls + 4 registers
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(resolution: int, device: torch.device, dtype: torch.dtype, tiny: bool, seed: int, model: str = "sparse"):
    from d3s2.models.dit import DenseDiT, SparseDiT

    if model == "dense":
        cfg = (DenseDiT.Config(resolution=4, model_channels=64, cond_channels=32, num_blocks=2, num_heads=4)
               if tiny else DenseDiT.Config())
        cls = DenseDiT
    else:
        cfg = (SparseDiT.Config(resolution=resolution // 8, model_channels=64, cond_channels=32, num_blocks=2,
                                num_heads=4, num_kv_heads=2, compression_block_size=4, selection_block_size=4,
                                topk=2, window_size=4)
               if tiny else SparseDiT.Config.v1_1(resolution))
        cls = SparseDiT
    with torch.device(device):
        net = cls(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised output layer: give it random values, as bench_generate does
        w = net.out_layer.weight
        w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w))
    return net


def make_inputs(model, coords: torch.Tensor | None, device: torch.device, dtype: torch.dtype, seed: int):
    """(noise, cond, uncond): a sparse latent on ``coords`` sorted as SSA needs, or the dense latent when
    ``coords`` is None."""
    from d3s2.models.dit import ConditionTokens
    from d3s2.sparse import SparseTensor
    from d3s2.sparse.serialize import sort_by_blocks

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    if coords is None:
        r = cfg.resolution
        noise = torch.randn(1, cfg.in_channels, r, r, r, generator=g).to(device, dtype)
    else:
        feats = torch.randn(coords.shape[0], cfg.in_channels, generator=g)
        noise = SparseTensor.from_samples([coords.to(device)], [feats.to(device, dtype)], resolution=cfg.resolution)
        noise = sort_by_blocks(noise, cfg.selection_block_size)
    tokens = torch.randn(1, COND_TOKENS, cfg.cond_channels, generator=g).to(device, dtype)
    cond = ConditionTokens(tokens)
    return noise, cond, cond.zeros_like()


def run_steps(model, noise, cond, uncond, steps: int, cuda_graph: bool | None = False):
    from d3s2.flow.sampler import sample_euler

    return sample_euler(model, noise, steps=steps, cond=cond, uncond=uncond, guidance_scale=7.0, shift=6.0,
                        cuda_graph=cuda_graph)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def sync_points(model, noise, cond, uncond) -> dict:
    """Host syncs of one sampling call of 1 and of 3 steps (``torch.cuda.set_sync_debug_mode``): their
    difference / 2 is the syncs per step after the first; the top Python lines that issued them."""
    import collections
    import warnings

    out = {}
    for steps in (1, 3):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_steps(model, noise, cond, uncond, steps)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sites = collections.Counter(f"{w.filename.split('src/')[-1]}:{w.lineno}" for w in caught
                                    if "synchroniz" in str(w.message))
        out[f"syncs_{steps}_steps"] = sum(sites.values())
        out[f"sites_{steps}_steps"] = dict(sites.most_common(12))
    out["syncs_per_later_step"] = (out["syncs_3_steps"] - out["syncs_1_steps"]) / 2
    return out


def profile_table(model, noise, cond, uncond, steps: int, device: torch.device, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run_steps(model, noise, cond, uncond, 1)  # warm the allocator / autotuner outside the trace
    _sync(device)
    with profile(activities=acts) as prof:
        run_steps(model, noise, cond, uncond, steps)
        _sync(device)
    avg = prof.key_averages()
    launches = sum(e.count for e in avg if e.key in LAUNCH_NAMES)
    syncs = sum(e.count for e in avg if "Synchronize" in e.key or e.key == "aten::item"
                or e.key == "aten::_local_scalar_dense")
    out = {"profile_steps": steps, "kernel_launches_per_step": launches / steps,
           "host_syncs_per_step": syncs / steps, "tables": {}}
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    for key in sorts:
        try:
            out["tables"][key] = avg.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):  # older torch names it self_cuda_time_total
            out["tables"][key] = avg.table(sort_by=key.replace("device", "cuda"), row_limit=rows,
                                           max_name_column_width=60)
    if device.type == "cuda":
        dev_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in avg)
        out["device_busy_ms_per_step"] = round(dev_us / 1000 / steps, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-block 64-wide DiT on a ball shell (CPU smoke test)")
    ap.add_argument("--model", choices=["sparse", "dense"], default="sparse")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", default=None, help=f"latent_layouts_1024.npz (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--layout", default="32768", help="key in the layouts file (32768 → 32,721 tokens at 1024³)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per resolution")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (first resolution); 0: off")
    ap.add_argument("--rows", type=int, default=30, help="rows of each top-ops table")
    ap.add_argument("--cuda-graph", action="store_true", help="time the steps both eagerly and replayed from a CUDA "
                    "graph (default: the sampler's default only)")
    ap.add_argument("--sync-debug", action="store_true", help="list the host syncs of the sampling steps")
    ap.add_argument("--label", default="", help="appended to the output file names (e.g. before / after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    dense = args.model == "dense"
    resolutions = args.resolutions[:1] if dense else args.resolutions
    if dense:
        structure = {}
    elif args.tiny:
        structure = {}
        for r in resolutions:
            g = r // 8 if r >= 64 else r
            ax = torch.arange(g)
            c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
            d = ((c.float() + 0.5) / g * 2 - 1).norm(dim=1)
            structure[r] = c[(d - 0.6).abs() < 1.5 / g].to(torch.int32)
    else:
        structure = load_layouts(args.layouts or DEFAULT_LAYOUTS, args.layout, resolutions)
    rows = []
    for i, r in enumerate(resolutions):
        model = build(r if not args.tiny else 128, device, dtype, args.tiny, args.seed, args.model)
        noise, cond, uncond = make_inputs(model, structure.get(r), device, dtype, args.seed)
        with torch.no_grad():
            first = timed(partial(run_steps, model, noise, cond, uncond, 1), device)
            for _ in range(args.warmup):
                run_steps(model, noise, cond, uncond, 1)
            total = timed(partial(run_steps, model, noise, cond, uncond, args.steps, None), device)
            tokens = int(noise.num_voxels) if not dense else int(noise[0, 0].numel())
            row = {"model": args.model, "resolution": r, "tokens": tokens, "first_step_s": round(first, 3),
                   "steps": args.steps, "ms_per_step": round(1000 * total / args.steps, 2),
                   "cuda_graphs": device.type == "cuda" and use_cuda_graphs(device)}
            if args.cuda_graph and device.type == "cuda":
                for mode in (False, True):
                    run_steps(model, noise, cond, uncond, 3, mode)  # warm (capture path, allocator)
                    s = timed(partial(run_steps, model, noise, cond, uncond, args.steps, mode), device)
                    row[f"ms_per_step_{'graph' if mode else 'eager'}"] = round(1000 * s / args.steps, 2)
                graphed = run_steps(model, noise, cond, uncond, 4, True)
                eager = run_steps(model, noise, cond, uncond, 4, False)
                fg, fe = (graphed.feats, eager.feats) if not dense else (graphed, eager)
                row["graph_equal_eager"] = bool(torch.equal(fg, fe))
            if args.sync_debug and device.type == "cuda":
                row["sync_debug"] = sync_points(model, noise, cond, uncond)
            if i == 0 and args.profile_steps > 0:
                row["profile"] = profile_table(model, noise, cond, uncond, args.profile_steps, device, args.rows)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {**environment(args.device), "tiny": args.tiny, "dtype": str(dtype).removeprefix("torch."),
              "label": args.label, "runs": rows}
    stem = f"profile_{args.model}_{'tiny_' if args.tiny else ''}{device.type}{'_' + args.label if args.label else ''}"
    for p in write_outputs(args.out_dir or default_out_dir(), stem, result, markdown(result)):
        print(f"wrote {p}")


def markdown(result: dict) -> str:
    lines = [f"# {result['runs'][0]['model'].title()} DiT sampling steps, random weights ({result['device']}) "
             f"{result['label']}", "",
             f"`{result['command']}`", "",
             f"commit {result['commit'][:10]}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
             f"dtype {result['dtype']}, CFG 7 (batched pair)", "",
             "| resolution | tokens | first step s | ms / step | CUDA graphs | eager ms / step | graph ms / step "
             "| graph = eager |", "|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['resolution']} | {r['tokens']} | {r['first_step_s']} | {r['ms_per_step']} | "
                     f"{r['cuda_graphs']} | {r.get('ms_per_step_eager', '')} | {r.get('ms_per_step_graph', '')} | "
                     f"{r.get('graph_equal_eager', '')} |")
    for r in result["runs"]:
        for key in ("sync_debug",):
            if key in r:
                lines += ["", f"{key} at {r['resolution']}: {r[key]}"]
    for r in result["runs"]:
        prof = r.get("profile")
        if not prof:
            continue
        lines += ["", f"## Profile at {r['resolution']} ({prof['profile_steps']} steps)", "",
                  f"kernel launches / step {prof['kernel_launches_per_step']:.0f}, host syncs / step "
                  f"{prof['host_syncs_per_step']:.1f}, device busy ms / step {prof.get('device_busy_ms_per_step')}"]
        for key, table in prof["tables"].items():
            lines += ["", f"### top ops by {key}", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
