"""Benchmark the data path: band SDF with sign (CPU and GPU) and sparse marching cubes, on 0 A.D. meshes.

Usage:
    PYTHONPATH=src python benchmarks/bench_data.py --device cpu --resolution 512 --backends igl torch
    PYTHONPATH=src python benchmarks/bench_data.py --device cuda --resolution 1024 --backends torch

Each (mesh, backend) measurement runs in a fresh subprocess so peak host memory (ru_maxrss) is its own.
Results go to benchmarks/results/data_<device>.json plus a short .md summary.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import multiprocessing as mp
import os
import platform
import pstats
import resource
import subprocess
import sys
import time

import numpy as np

# 0 A.D. meshes with about 20k triangles (see /work/shared/data/README.md), plus a typical-size one.
DEFAULT_MESHES = [
    "art|meshes|structural|han_ministry.dae.cached.pmd",
    "art|meshes|structural|ptol_edfu_struct.dae.cached.pmd",
    "art|meshes|props|structural|mausoleum_props_02.dae.cached.pmd",
]


def _load(npz_path: str, key: str):
    from d3s2.geometry.mesh_io import normalize_mesh, validate_mesh

    z = np.load(npz_path)
    # 0 A.D. winds triangles clockwise: reverse them so normals point outwards (as MeshCorpus.mesh does).
    mesh = validate_mesh(z[key + "|v"], z[key + "|f"][:, ::-1].astype(np.int64), name=key)
    return normalize_mesh(mesh, scale=0.95)[0]


def _measure(args: dict, queue) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    from d3s2.geometry.marching_cubes import sparse_marching_cubes
    from d3s2.geometry.sdf import compute_sparse_sdf

    mesh = _load(args["npz"], args["key"])
    dev = args["device"]
    cuda = dev.startswith("cuda")
    if cuda:  # warm-up: CUDA context and kernels, on a small resolution
        compute_sparse_sdf(mesh, 64, device=dev, backend=args["backend"])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prof = None
    if args["profile"]:  # wall clock on the GPU (time waiting for kernels lands on the sync points), else CPU time
        prof = cProfile.Profile(time.perf_counter if cuda else time.process_time)
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    out = compute_sparse_sdf(mesh, args["resolution"], band=args["band"], device=dev, backend=args["backend"])
    if cuda:
        torch.cuda.synchronize()
    t1, c1 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.disable()
    s = out[args["resolution"]]
    res = {
        "mesh": args["key"], "triangles": int(len(mesh.faces)), "backend": args["backend"], "device": dev,
        "resolution": args["resolution"], "band": args["band"], "band_voxels": len(s),
        "blocks": int(len(s.block_coords)), "sdf_wall_s": round(t1 - t0, 3), "sdf_cpu_s": round(c1 - c0, 3),
    }
    if cuda:
        res["sdf_gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if prof is not None:
        stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim calls, own s, cumulative s, callers)}
        top = sorted(stats.items(), key=lambda kv: -kv[1][3])[:30]
        res["sdf_profile_cumulative_s"] = {f"{os.path.basename(k[0])}:{k[1]}:{k[2]}": round(v[3], 3) for k, v in top}
    if args["mc"]:
        from d3s2.geometry.sdf import BLOCK, _block_offsets

        blocks, target = s.block_targets()
        coords = torch.as_tensor((blocks[:, None, :].astype(np.int64) * BLOCK + _block_offsets()[None]).reshape(-1, 3))
        values = torch.as_tensor(target.reshape(-1))
        coords, values = coords.to(dev), values.to(dev)
        sparse_marching_cubes(coords[:1000], values[:1000], s.resolution)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        verts, faces = sparse_marching_cubes(coords, values, s.resolution)
        if cuda:
            torch.cuda.synchronize()
        res.update(mc_input_voxels=int(coords.shape[0]), mc_wall_s=round(time.perf_counter() - t0, 3),
                   mc_vertices=int(verts.shape[0]), mc_faces=int(faces.shape[0]))
        if cuda:
            res["mc_gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    res["host_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    queue.put(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", default="/work/shared/data/0ad_meshes.npz")
    p.add_argument("--meshes", nargs="*", default=DEFAULT_MESHES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--band", type=float, default=1 / 128)
    p.add_argument("--backends", nargs="*", default=["igl", "torch"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a loaded machine)")
    p.add_argument("--mc", action="store_true", help="also time sparse marching cubes of the block targets")
    p.add_argument("--profile", action="store_true", help="record cProfile's top cumulative times of the SDF call")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for key in a.meshes:
        for backend in a.backends:
            q = ctx.Queue()
            job = ctx.Process(target=_measure, args=(dict(npz=a.npz, key=key, device=a.device, backend=backend,
                                                          resolution=a.resolution, band=a.band, threads=a.threads,
                                                          mc=a.mc, profile=a.profile), q))
            job.start()
            row = q.get()
            job.join()
            print(json.dumps(row), flush=True)
            rows.append(row)
            _write(a, rows)
    print(f"wrote {_write(a, rows)}")


def _write(a, rows) -> str:
    import torch

    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta = {
        "command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "git_commit": commit,
        "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
    }
    tag = "cuda" if a.device.startswith("cuda") else "cpu"
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"data_{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    main()
