"""Submanifold 3³ sparse conv on real-mesh surface layouts: every backend side by side, forward and forward+backward.

Two steps, because the GPU machine has no trimesh:

    # on a CPU box with /work/shared: voxelised shells of 0 A.D. meshes at the VAE's sizes -> small npz
    python benchmarks/bench_sparse_conv.py layouts --meshes ../shared/data/0ad_meshes.npz --out conv_layouts.npz
    # on the GPU: ms and effective TFLOP/s (2·Σ_k pairs_k·C_in·C_out per forward, x3 for forward+backward)
    python benchmarks/bench_sparse_conv.py run --layouts conv_layouts.npz --out sparse_conv_<device>.json

Backends: ``torch`` (the reference gather-GEMM-scatter), ``triton`` (d3s2's implicit GEMM) and, when the
package is importable, ``spconv-triton`` (spconv_triton 1.0.0 SubMConv3d with its index pairs reused).
``run --sweep`` also times alternative tile configs of the d3s2 kernels (tuning aid); ``run --breakdown`` times the
triton backward's parts (input gradient, weight + bias gradient, and the weight gradient at other chunk sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

# (name, target voxels, channels): the sparse SDF VAE's widths at its three finest levels.
LAYOUT_TARGETS = [("2M_c32", 2_000_000, 32), ("300k_c128", 300_000, 128), ("50k_c512", 50_000, 512)]
# Two structures per batch (a ragged batch), fixed so the layouts are reproducible.
# Mid-sized surface areas (about a sphere's), so the shells are thin at every target size.
MESHES = ["art|meshes|structural|celt_temple.dae.cached.pmd", "art|meshes|structural|spart_range.dae.cached.pmd"]


# ------------------------------------------------------------------------------------------------ layouts (CPU)


def shell_voxels(verts: np.ndarray, faces: np.ndarray, resolution: int, seed: int = 0) -> np.ndarray:
    """int32 [n, 3] voxels of the surface at ``resolution`` (mesh normalised to [-0.95, 0.95]), dilated by 1."""
    import trimesh

    lo, hi = verts.min(0), verts.max(0)
    v = (verts - (lo + hi) / 2) * (1.9 / (hi - lo).max())
    mesh = trimesh.Trimesh(v, faces.astype(np.int64), process=False)
    voxel = 2.0 / resolution
    count = int(6 * mesh.area / voxel**2) + 1000  # ~6 samples per voxel face: no holes in the surface layer
    pts, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    ijk = np.clip(np.floor((pts + 1.0) / voxel).astype(np.int64), 0, resolution - 1)
    r = resolution
    keys = np.unique((ijk[:, 0] * r + ijk[:, 1]) * r + ijk[:, 2])
    base = np.stack([keys // (r * r), (keys // r) % r, keys % r], 1)
    grown = []
    for d in np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3):
        q = base + d
        q = q[((q >= 0) & (q < r)).all(1)]
        grown.append((q[:, 0] * r + q[:, 1]) * r + q[:, 2])
    keys = np.unique(np.concatenate(grown))  # sorted: x, then y, then z
    return np.stack([keys // (r * r), (keys // r) % r, keys % r], 1).astype(np.int32)


def make_layouts(meshes_path: str, out: str) -> None:
    data = np.load(meshes_path)
    result: dict[str, np.ndarray] = {}
    for name, target, channels in LAYOUT_TARGETS:
        # Shell size grows as R²: measure at a probe resolution, then scale R to hit the target.
        res, parts = 128, []
        for _ in range(3):
            parts = [shell_voxels(data[m + "|v"], data[m + "|f"], res, seed=i) for i, m in enumerate(MESHES)]
            n = sum(len(p) for p in parts)
            if abs(n / target - 1) < 0.15:
                break
            res = int(round(res * (target / n) ** 0.5 / 8)) * 8
        coords = np.concatenate([np.concatenate([np.full((len(p), 1), b, np.int32), p], 1)
                                 for b, p in enumerate(parts)])
        result[f"{name}|coords"] = coords.astype(np.int16)
        result[f"{name}|meta"] = np.array([res, channels], np.int64)
        print(f"{name}: R={res}, voxels per sample {[len(p) for p in parts]}, total {len(coords):,}")
    tmp = out + ".tmp.npz"
    np.savez_compressed(tmp, **result)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------------ timing (GPU)


def _git_commit() -> str:
    if os.environ.get("D3S2_GIT_COMMIT"):  # copies run outside their worktree (the GPU machine) name it explicitly
        return os.environ["D3S2_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("D3S2_GIT_COMMIT", "unknown")


class _SpconvTriton:
    """spconv_triton SubMConv3d with d3s2's weights, indices (b, x, y, z) and its index pairs built once."""

    def __init__(self, coords, resolution, batch_size, weight, bias):
        import spconv_triton.pytorch as spt

        from d3s2.ops.conv.convert import to_spconv

        self.spt = spt
        c_in, c_out = weight.shape[1], weight.shape[2]
        self.conv = spt.SubMConv3d(c_in, c_out, 3, padding=1, bias=True, indice_key="bench").to(weight.device)
        with torch.no_grad():
            self.conv.weight.copy_(to_spconv(weight.float(), "xyz"))
            self.conv.bias.copy_(bias.float())
        self.conv = self.conv.to(weight.dtype)
        self.coords, self.shape, self.batch_size = coords, [resolution] * 3, batch_size
        self.indice_dict = None

    def __call__(self, feats):
        x = self.spt.SparseConvTensor(feats, self.coords, self.shape, self.batch_size,
                                      indice_dict=dict(self.indice_dict) if self.indice_dict else None)
        y = self.conv(x)
        if self.indice_dict is None:
            self.indice_dict = y.indice_dict
        return y.features


def _callables(backend, kmap, coords, res, batch_size, feats, weight, bias, grad):
    """(forward without autograd, forward + backward to feats, weight and bias) closures for one backend."""
    from d3s2.ops.conv import sparse_conv
    from d3s2.ops.conv.convert import from_spconv

    f_req = feats.clone().requires_grad_()
    if backend == "spconv-triton":
        conv = _SpconvTriton(coords, res, batch_size, weight, bias)
        forward = conv
        params = [f_req, conv.conv.weight, conv.conv.bias]
        weight_grad = lambda grads: from_spconv(grads[1], "xyz")  # noqa: E731
    else:
        w_req, b_req = weight.clone().requires_grad_(), bias.clone().requires_grad_()

        def forward(f, w=weight, b=bias):
            return sparse_conv(f, kmap, w, b, backend=backend)

        params = [f_req, w_req, b_req]
        weight_grad = lambda grads: grads[1]  # noqa: E731

    def fwd():
        with torch.no_grad():
            return forward(feats)

    def fwd_bwd():
        y = forward(f_req, *params[1:]) if backend != "spconv-triton" else forward(f_req)
        return torch.autograd.grad(y, params, grad)

    return fwd, fwd_bwd, weight_grad


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _bench(fn, warmup_ms=25, rep_ms=150.0) -> float:
    if not torch.cuda.is_available():  # CPU smoke runs (TRITON_INTERPRET=1): one timed call
        t0 = time.time()
        fn()
        return (time.time() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def run(layouts: str, out: str, sweep: bool, backends: list[str], time_budget_s: float,
        device: str = "cuda", only: list[str] | None = None, dtypes: tuple = (torch.bfloat16, torch.float16),
        rep_ms: float = 150, breakdown: bool = False) -> None:
    import triton

    from d3s2.ops.conv import KernelMap, sparse_conv, submanifold_kernel_map

    started = time.time()
    dev = torch.device(device)
    data = np.load(layouts)
    record = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flops": "forward 2*sum_k(valid pairs_k)*C_in*C_out; forward+backward 3x that",
        "timing": "triton.testing.do_bench median (ms), kernel maps and schedules prebuilt", "results": [],
        "sweep": [], "breakdown": [],
    }
    try:
        import spconv_triton

        record["spconv_triton"] = getattr(spconv_triton, "__version__", "1.0.0")
    except ImportError:
        backends = [b for b in backends if b != "spconv-triton"]

    def save() -> None:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, out)

    g = torch.Generator(device=dev).manual_seed(0)
    for name in only or [t[0] for t in LAYOUT_TARGETS]:
        res, channels = (int(v) for v in data[f"{name}|meta"])
        coords = torch.from_numpy(data[f"{name}|coords"].astype(np.int32)).to(dev)
        batch_size = int(coords[-1, 0]) + 1
        _sync(dev)
        t0 = time.time()
        raw = submanifold_kernel_map(coords, res)
        _sync(dev)
        kmap_ms = (time.time() - t0) * 1e3
        kmap = KernelMap.submanifold(raw)
        pairs = int((raw >= 0).sum())
        flops = 2.0 * pairs * channels * channels
        n = coords.shape[0]
        print(f"== {name}: N={n:,} R={res} C={channels} pairs={pairs:,} ({pairs / n:.1f}/voxel), "
              f"kernel map {kmap_ms:.1f} ms", flush=True)
        w32 = torch.randn(27, channels, channels, device=dev, generator=g) / (27 * channels) ** 0.5
        b32 = torch.randn(channels, device=dev, generator=g)
        f32 = torch.randn(n, channels, device=dev, generator=g)
        ref32 = sparse_conv(f32, kmap, w32, b32, backend="torch")  # accuracy yardsticks: fp32 output, d_weight
        grads = {dt: torch.randn(n, channels, device=dev, generator=g).to(dt) for dt in dtypes}
        ref_dw = {}
        for dt, grad in grads.items():
            w_req = w32.clone().requires_grad_()
            ref_dw[dt] = torch.autograd.grad(sparse_conv(f32, kmap, w_req, b32, backend="torch"), w_req,
                                             grad.float())[0]
        for dtype in dtypes:
            feats, weight, bias = f32.to(dtype), w32.to(dtype), b32.to(dtype)
            grad = grads[dtype]
            for backend in backends:
                if time.time() - started > time_budget_s:
                    print(f"   time budget spent: skipping {backend} {dtype}", flush=True)
                    continue
                try:
                    fwd, fwd_bwd, weight_grad = _callables(backend, kmap, coords, res, batch_size, feats, weight,
                                                           bias, grad)
                    y = fwd()
                    err = float((y.float() - ref32).norm() / ref32.norm())
                    dw = weight_grad(fwd_bwd()).float()
                    err_dw = float((dw - ref_dw[dtype]).norm() / ref_dw[dtype].norm())
                    t_f = _bench(fwd, rep_ms=rep_ms)
                    t_fb = _bench(fwd_bwd, rep_ms=rep_ms)
                except Exception as exc:  # a candidate failing (e.g. no bf16 support) must not stop the others
                    record["results"].append({"layout": name, "dtype": str(dtype), "backend": backend,
                                              "error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"   {dtype} {backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    save()
                    continue
                row = {"layout": name, "voxels": n, "resolution": res, "channels": channels, "pairs": pairs,
                       "dtype": str(dtype).replace("torch.", ""), "backend": backend, "fwd_ms": t_f,
                       "fwd_bwd_ms": t_fb, "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_tflops": 3 * flops / t_fb / 1e9,
                       "rel_err_vs_fp32": err, "rel_err_dweight_vs_fp32": err_dw}
                record["results"].append(row)
                print(f"   {row['dtype']:8s} {backend:14s} fwd {t_f:8.3f} ms ({row['fwd_tflops']:6.1f} TF/s)  "
                      f"fwd+bwd {t_fb:8.3f} ms ({row['fwd_bwd_tflops']:6.1f} TF/s)  rel.err {err:.1e} dW {err_dw:.1e}",
                      flush=True)
                save()
        if breakdown and time.time() - started < time_budget_s:
            _breakdown(record, name, kmap, f32.to(dtypes[0]), w32.to(dtypes[0]), grads[dtypes[0]], flops,
                       deadline=started + time_budget_s, rep_ms=rep_ms)
            save()
        if sweep and time.time() - started < time_budget_s:
            _sweep(record, name, kmap, f32.to(torch.bfloat16), w32.to(torch.bfloat16), flops,
                   deadline=started + time_budget_s)
            save()
    save()
    _print_table(record)


def _sweep(record, name, kmap, feats, weight, flops, deadline: float) -> None:
    """Time alternative tile configs of the forward and weight-gradient kernels (bf16) on one layout."""
    from d3s2.ops.conv import triton as ct

    c_in, c_out = weight.shape[1], weight.shape[2]
    base_fwd, base_wg = ct.fwd_config, ct.wgrad_config
    fwd_variants = [base_fwd(c_in, c_out)]
    for bm, bn, bk, nw, ns in [(64, 32, 32, 4, 4), (256, 32, 32, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 4),
                               (128, 128, 32, 8, 4), (256, 128, 64, 8, 3)]:
        if bn <= max(16, triton_next_pow2(c_out)) and bk <= max(16, triton_next_pow2(c_in)):
            fwd_variants.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns})
    grad = torch.randn_like(feats[:, :c_out])
    for cfg in fwd_variants:
        for sort in (True, False):
            if (not sort and cfg is not fwd_variants[0]) or time.time() > deadline:
                continue
            ct.fwd_config = lambda ci, co, cfg=cfg: cfg
            km = kmap if sort else _unsorted(kmap)
            try:
                t = _bench(lambda km=km: ct.sparse_conv_fwd(feats, km, weight))
            except Exception as err:  # a config can exceed shared memory; record and go on
                t = float("nan")
                print(f"   sweep {cfg}: {type(err).__name__}", flush=True)
            record["sweep"].append({"layout": name, "kernel": "fwd", "config": cfg, "mask_sorted": sort, "ms": t,
                                    "tflops": flops / t / 1e9})
            print(f"   sweep fwd {cfg} sorted={sort}: {t:.3f} ms", flush=True)
    ct.fwd_config = base_fwd
    chunk_rows = base_wg(c_in, c_out)["CHUNK_ROWS"]
    for bp, bi, bo, nw, ns in [(128, 32, 32, 4, 3), (32, 32, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 128, 8, 3),
                               (128, 128, 128, 8, 3)]:
        too_big = bi > max(16, triton_next_pow2(c_in)) or bo > max(16, triton_next_pow2(c_out))
        if too_big or time.time() > deadline:
            continue
        cfg = {"BLOCK_P": bp, "BLOCK_I": bi, "BLOCK_O": bo, "num_warps": nw, "num_stages": ns,
               "CHUNK_ROWS": chunk_rows}
        ct.wgrad_config = lambda ci, co, cfg=cfg: cfg
        try:
            t = _bench(lambda: ct.sparse_conv_wgrad(feats, grad, kmap, bias=True))
        except Exception as err:
            t = float("nan")
            print(f"   sweep {cfg}: {type(err).__name__}", flush=True)
        record["sweep"].append({"layout": name, "kernel": "wgrad", "config": cfg, "ms": t, "tflops": flops / t / 1e9})
        print(f"   sweep wgrad {cfg}: {t:.3f} ms", flush=True)
    ct.wgrad_config = base_wg


def _breakdown(record, name, kmap, feats, weight, grad, flops, deadline: float, rep_ms: float) -> None:
    """Time the triton backward's parts (in the first dtype): input gradient, weight + bias gradient, a torch bias
    sum, and the weight gradient at other chunk sizes (CHUNK_ROWS is a runtime argument: no recompilation)."""
    from d3s2.ops.conv import triton as ct

    c_in, c_out = weight.shape[1], weight.shape[2]
    # the input gradient as the backward runs it (submanifold: the forward map with offset-reversed weights)
    d_map, w_t = (kmap, weight.flip(0).transpose(1, 2).contiguous()) if kmap.symmetric else \
        (kmap.T, weight.transpose(1, 2).contiguous())
    base_wg = ct.wgrad_config
    base = base_wg(c_in, c_out)
    sms = ct._sm_count(feats.device)
    parts = [("fwd", base, lambda: ct.sparse_conv_fwd(feats, kmap, weight)),
             ("dgrad", base, lambda: ct.sparse_conv_fwd(grad, d_map, w_t)),
             ("wgrad+bias", base, lambda: ct.sparse_conv_wgrad(feats, grad, kmap, bias=True)),
             ("wgrad", base, lambda: ct.sparse_conv_wgrad(feats, grad, kmap)),
             ("bias_sum_torch", base, lambda: grad.sum(0, dtype=torch.float32))]
    variants = [dict(base, CHUNK_ROWS=max(base["BLOCK_P"], int(base["CHUNK_ROWS"] * f))) for f in (0.25, 4.0, 16.0)]
    variants += [dict(base, BLOCK_P=base["BLOCK_P"] * 2, num_stages=3),  # these two compile a kernel each
                 dict(base, BLOCK_P=max(16, base["BLOCK_P"] // 2), num_stages=4)]
    for cfg in variants:
        label = ",".join(f"{k}={v}" for k, v in cfg.items() if v != base[k])
        parts.append((f"wgrad+bias {label}", cfg, lambda: ct.sparse_conv_wgrad(feats, grad, kmap, bias=True)))
    for part, cfg, fn in parts:
        if time.time() > deadline:
            break
        ct.wgrad_config = lambda ci, co, cfg=cfg: cfg
        try:
            t = _bench(fn, rep_ms=rep_ms)
        except Exception as err:  # a variant can exceed shared memory; record and go on
            t = float("nan")
            print(f"   breakdown {part}: {type(err).__name__}: {err}"[:300], flush=True)
        split, rows = ct._wgrad_split(kmap.num_outputs, kmap.num_offsets, c_in, c_out, cfg, sms)
        row = {"layout": name, "part": part, "ms": t, "tflops": flops / t / 1e9 if part != "bias_sum_torch" else None,
               "wgrad_chunk_rows": cfg["CHUNK_ROWS"], "wgrad_split": split, "wgrad_rows": rows,
               "wgrad_partial_mb": split * kmap.num_offsets * c_in * c_out * 4 / 2**20}
        record["breakdown"].append(row)
        print(f"   breakdown {part:40s} {t:8.3f} ms  (wgrad: {split} chunks of {rows} rows)", flush=True)
    ct.wgrad_config = base_wg


def triton_next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _unsorted(kmap):
    """The same map without mask sorting (rows in coordinate order), for the sweep's comparison."""
    from d3s2.ops.conv import KernelMap

    km = KernelMap(kmap.map, kmap.num_inputs)
    km._cache["triton_row_order"] = torch.arange(kmap.num_outputs, dtype=torch.int32, device=kmap.map.device)
    return km


def _print_table(record) -> None:
    print(f"\n{record['device']}, torch {record['torch']}, triton {record['triton']}")
    print("| layout | dtype | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["results"]:
        if "error" in r:
            print(f"| {r['layout']} | {r['dtype']} | {r['backend']} | failed: {r['error'][:80]} |")
            continue
        print(f"| {r['layout']} ({r['voxels']:,} vox) | {r['dtype']} | {r['backend']} | {r['fwd_ms']:.3f} | "
              f"{r['fwd_tflops']:.1f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f} | "
              f"{r['rel_err_vs_fp32']:.1e} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layouts", help="voxelise the benchmark meshes into an npz (CPU, needs trimesh)")
    p.add_argument("--meshes", default=os.path.join(os.path.dirname(__file__), "../../shared/data/0ad_meshes.npz"))
    p.add_argument("--out", default="conv_layouts.npz")
    p = sub.add_parser("run", help="time every backend on the layouts (GPU)")
    p.add_argument("--layouts", default="conv_layouts.npz")
    p.add_argument("--out", default="sparse_conv.json")
    p.add_argument("--backends", default="torch,triton,spconv-triton")
    p.add_argument("--sweep", action="store_true", help="also time alternative tile configs of the d3s2 kernels")
    p.add_argument("--time-budget-s", type=float, default=1e9, help="skip remaining measurements after this")
    p.add_argument("--device", default="cuda", help="cpu only for smoke tests under TRITON_INTERPRET=1")
    p.add_argument("--only", default="", help="comma-separated layout names (default: all)")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--rep-ms", type=float, default=150.0, help="do_bench repetition time per measurement")
    p.add_argument("--breakdown", action="store_true", help="also time the triton backward's parts (first dtype)")
    args = parser.parse_args()
    if args.cmd == "layouts":
        make_layouts(args.meshes, args.out)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("run needs a CUDA device (or --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        run(args.layouts, args.out, args.sweep, args.backends.split(","), args.time_budget_s, args.device,
            [n for n in args.only.split(",") if n], tuple(getattr(torch, d) for d in args.dtypes.split(",")),
            args.rep_ms, args.breakdown)
