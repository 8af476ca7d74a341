"""Per-step time and a torch.profiler top-ops table of the sparse DiT's guided sampling steps.

The sampling loop of one sparse stage as the pipeline runs it (``sample_euler``, CFG 7, one batched forward of
the [cond, uncond] pair per step) with a full-size random-weight v1.1 ``SparseDiT`` in bf16 on a real 0 A.D.
token layout (``latent_layouts_1024.npz``, halved for 512³). Reports ms per step over ``--steps`` steps after
``--warmup`` steps (the first step of a stage also builds the layout structures, so it is timed alone), the
profiler's top ops by device and host time over ``--profile-steps`` steps, and the kernel launches per step.

    python benchmarks/profile_sparse_steps.py --layouts PATH --out-dir $OUT     # GPU, full size
    python benchmarks/profile_sparse_steps.py --tiny --device cpu               # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from _common import DEFAULT_LAYOUTS, default_out_dir, environment, load_layouts, write_outputs

COND_TOKENS = 1374  # DINOv2 ViT-L/14-reg4 at 518²: 37² patches + cls + 4 registers
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(resolution: int, device: torch.device, dtype: torch.dtype, tiny: bool, seed: int):
    from d3s2.models.dit import SparseDiT

    cfg = (SparseDiT.Config(resolution=resolution // 8, model_channels=64, cond_channels=32, num_blocks=2,
                            num_heads=4, num_kv_heads=2, compression_block_size=4, selection_block_size=4,
                            topk=2, window_size=4)
           if tiny else SparseDiT.Config.v1_1(resolution))
    with torch.device(device):
        model = SparseDiT(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised output layer: give it random values, as bench_generate does
        w = model.out_layer.weight
        w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w))
    return model


def make_inputs(model, coords: torch.Tensor, device: torch.device, dtype: torch.dtype, seed: int):
    from d3s2.models.dit import ConditionTokens
    from d3s2.sparse import SparseTensor

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(coords.shape[0], cfg.in_channels, generator=g)
    noise = SparseTensor.from_samples([coords.to(device)], [feats.to(device, dtype)], resolution=cfg.resolution)
    tokens = torch.randn(1, COND_TOKENS, cfg.cond_channels, generator=g).to(device, dtype)
    cond = ConditionTokens(tokens)
    return noise, cond, cond.zeros_like()


def run_steps(model, noise, cond, uncond, steps: int):
    from d3s2.flow.sampler import sample_euler

    return sample_euler(model, noise, steps=steps, cond=cond, uncond=uncond, guidance_scale=7.0, shift=6.0)


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


def graph_experiment(model, noise, cond, uncond, reps: int) -> dict:
    """One CFG forward captured in a CUDA graph: replay ms vs eager ms at the same input, and whether the two
    outputs are equal (a measurement of the launch overhead, not a code path of the package)."""
    from d3s2.flow.sampler import _cat2
    from d3s2.sparse import SparseTensor

    device = noise.device
    pair = SparseTensor.cat([noise, noise])
    x = pair.replace(pair.feats.clone())
    both = _cat2(cond, uncond)
    t = torch.full((2,), 500.0, device=device)
    eager = [model(x, t, both).feats.clone() for _ in range(2)][-1]  # builds the structure caches
    eager_s = timed(lambda: [model(x, t, both) for _ in range(reps)], device) / reps
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model(x, t, both)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, both)
        graph.replay()
        _sync(device)
        diff = (out.feats.float() - eager.float()).abs().max().item()
        graph_s = timed(lambda: [graph.replay() for _ in range(reps)], device) / reps
    except RuntimeError as e:  # a host sync inside the forward makes the capture fail: report it
        return {"eager_ms": round(1000 * eager_s, 2), "graph_error": str(e)[:500]}
    return {"eager_ms": round(1000 * eager_s, 2), "graph_ms": round(1000 * graph_s, 2),
            "graph_max_abs_diff": diff, "graph_equal": bool(torch.equal(out.feats, eager))}


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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", default=None, help=f"latent_layouts_1024.npz (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--layout", default="32768", help="key in the layouts file (32768 → 32,721 tokens at 1024³)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per resolution")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (first resolution); 0: off")
    ap.add_argument("--rows", type=int, default=30, help="rows of each top-ops table")
    ap.add_argument("--cuda-graph", action="store_true", help="also time one forward replayed from a CUDA graph")
    ap.add_argument("--sync-debug", action="store_true", help="list the host syncs of the sampling steps")
    ap.add_argument("--label", default="", help="appended to the output file names (e.g. before / after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    if args.tiny:
        structure = {}
        for r in args.resolutions:
            g = r // 8 if r >= 64 else r
            ax = torch.arange(g)
            c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
            d = ((c.float() + 0.5) / g * 2 - 1).norm(dim=1)
            structure[r] = c[(d - 0.6).abs() < 1.5 / g].to(torch.int32)
    else:
        structure = load_layouts(args.layouts or DEFAULT_LAYOUTS, args.layout, args.resolutions)
    rows = []
    for i, r in enumerate(args.resolutions):
        model = build(r if not args.tiny else 128, device, dtype, args.tiny, args.seed)
        noise, cond, uncond = make_inputs(model, structure[r], device, dtype, args.seed)
        with torch.no_grad():
            first = timed(partial(run_steps, model, noise, cond, uncond, 1), device)
            for _ in range(args.warmup):
                run_steps(model, noise, cond, uncond, 1)
            total = timed(partial(run_steps, model, noise, cond, uncond, args.steps), device)
            row = {"resolution": r, "tokens": int(noise.num_voxels), "first_step_s": round(first, 3),
                   "steps": args.steps, "ms_per_step": round(1000 * total / args.steps, 2)}
            if args.sync_debug and device.type == "cuda":
                row["sync_debug"] = sync_points(model, noise, cond, uncond)
            if args.cuda_graph and device.type == "cuda":
                row["cuda_graph"] = graph_experiment(model, noise, cond, uncond, args.steps)
            if i == 0 and args.profile_steps > 0:
                row["profile"] = profile_table(model, noise, cond, uncond, args.profile_steps, device, args.rows)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {**environment(args.device), "tiny": args.tiny, "dtype": str(dtype).removeprefix("torch."),
              "label": args.label, "runs": rows}
    stem = f"profile_sparse_{'tiny_' if args.tiny else ''}{device.type}{'_' + args.label if args.label else ''}"
    for p in write_outputs(args.out_dir or default_out_dir(), stem, result, markdown(result)):
        print(f"wrote {p}")


def markdown(result: dict) -> str:
    lines = [f"# Sparse DiT sampling steps, random weights ({result['device']}) {result['label']}", "",
             f"`{result['command']}`", "",
             f"commit {result['commit'][:10]}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
             f"dtype {result['dtype']}, CFG 7 (batched pair)", "",
             "| resolution | tokens | first step s | ms / step |", "|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['resolution']} | {r['tokens']} | {r['first_step_s']} | {r['ms_per_step']} |")
    for r in result["runs"]:
        for key in ("cuda_graph", "sync_debug"):
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
