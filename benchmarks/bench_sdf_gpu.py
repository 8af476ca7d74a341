"""Band SDF at 1024³ on the GPU, per asset and per stage: the near-list op's Triton kernel (new path) against its
torch pair tensors (old path), both in the same run, plus the GPU tests of the op and of the geometry package.

One command on one GPU, from the repo root (``--npz``: the corpus, or a subset of it; ``--named-npz``: a second
corpus holding named meshes missing from it):

    python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz

CPU smoke run (32³, 3 small assets; the interpreted kernel takes minutes per asset even there, so the "new" path
runs the torch backend too):

    PYTHONPATH=src python benchmarks/bench_sdf_gpu.py --tiny --device cpu --new-backend torch --npz NPZ

What it does: (1) a warm-up asset through both paths (the new path twice: its first call includes Triton's cold
compilation in a fresh cache, reported as ``compile_s``); (2) ``pytest -m gpu`` on tests/ops/mesh_field and
tests/geometry (skipped with ``--no-tests``); (3) the named meshes and a deterministic random sample of the
corpus, the new path on all of them first, then the old path while ``--time-budget`` lasts: per asset and path a
clean timed call (wall, GPU peak) and a call with CUDA-synchronised timers around the SDF's stages (the old
path's only for the named meshes unless ``--old-stages all``), and whether the two paths' outputs agree. Stages
are inclusive times of the functions named in ``STAGES``; ``other`` is the rest (sorting, sign bookkeeping,
transfers); counters give the near_field calls, points and (point, triangle) pairs.
Writes ``sdf_gpu_<tag>.json`` and ``.md`` to ``$OUT`` (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, default_out_dir, environment, write_outputs  # noqa: E402

NAMED = ["props/structural/mausoleum_props_02", "gaia/geo_waterfall_double", "structural/han_ministry"]
PATHS = {"new": "triton", "old": "torch"}  # path → mesh_field backend
# (module, attribute, stage): top-level stages partition the SDF call; "winding" and "near_field" are totals over
# every caller (inside the other stages).
STAGES = [
    ("d3s2.geometry.sdf", "sharp_face_edges", "edge_flags"),
    ("d3s2.geometry.sdf", "open_face_edges", "edge_flags"),
    ("d3s2.geometry.sdf", "_make_field", "field_init"),
    ("d3s2.geometry._field:TorchField", "build", "build"),
    ("d3s2.geometry.sdf", "classify_triangles", "classify"),
    ("d3s2.geometry._field:TorchField", "band_voxels", "band_voxels"),
    ("d3s2.geometry.sdf", "band_signs", "band_signs"),
    ("d3s2.geometry.sdf", "propagate_signs", "propagate"),
    ("d3s2.geometry.sdf", "_fill_unknown_signs", "unknown_signs"),
    ("d3s2.geometry.sdf", "_close_blocks", "close_blocks"),
    ("d3s2.geometry.sdf", "_start_host_copy", "to_host"),
    ("d3s2.geometry.sdf", "_to_host", "to_host"),
    ("d3s2.geometry._field:TorchField", "winding", "winding (all)"),
    ("d3s2.geometry._field", "near_field", "near_field op (all)"),
]
TOTALS = {"winding (all)", "near_field op (all)"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _count(stage: str, args: tuple, counts: dict[str, int]) -> None:
    """Calls, query points and (point, triangle) pairs of the winding and near_field totals."""
    if stage == "winding (all)":
        counts["winding_calls"] = counts.get("winding_calls", 0) + 1
        counts["winding_points"] = counts.get("winding_points", 0) + int(args[1].shape[0])
    elif stage == "near_field op (all)":
        points, owner, offsets = args[:3]
        counts["near_field_calls"] = counts.get("near_field_calls", 0) + 1
        counts["near_field_points"] = counts.get("near_field_points", 0) + int(points.shape[0])
        counts["near_field_pairs"] = counts.get("near_field_pairs", 0) + int((offsets[1:] - offsets[:-1])[owner].sum())


@contextlib.contextmanager
def staged(device: str) -> Iterator[tuple[dict[str, float], dict[str, int]]]:
    """Patch the STAGES functions with synchronised timers; yields ({stage: seconds}, {counter: n}), filled on exit
    (counting adds a reduction and a sync per near_field call, outside the timed spans)."""
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    depth = [0]  # nesting of top-level stages: only the outermost one counts

    def wrap(fn, stage):
        def timed(*args, **kwargs):
            total = stage in TOTALS
            outer = total or depth[0] == 0
            if not total:
                depth[0] += 1
            else:
                _count(stage, args, counts)
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                if outer:
                    times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
                if not total:
                    depth[0] -= 1
        return timed

    with patched_stages(wrap):
        yield times, counts


@contextlib.contextmanager
def patched_stages(wrap, skip=()) -> Iterator[None]:
    """Each ``STAGES`` function (but the stages in ``skip``) replaced by ``wrap(fn, stage)`` inside the block."""
    import importlib

    saved = []
    for mod_name, attr, stage in STAGES:
        if stage in skip:
            continue
        mod_name, _, cls = mod_name.partition(":")
        owner = importlib.import_module(mod_name)
        owner = getattr(owner, cls) if cls else owner
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(getattr(owner, attr), stage))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def sdf_call(mesh, args, path: str):
    from d3s2.geometry.sdf import compute_sparse_sdf
    from d3s2.ops import use_backend

    with use_backend("mesh_field", args.new_backend if path == "new" else PATHS[path]):
        return compute_sparse_sdf(mesh, args.resolution, band=args.band, device=args.device,
                                  backend="torch")[args.resolution]


def timed_call(mesh, args, path: str):
    """(SparseSDF, wall seconds, GPU peak GiB or None)."""
    cuda = args.device.startswith("cuda")
    _sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    t0 = time.perf_counter()
    out = sdf_call(mesh, args, path)
    _sync(args.device)
    wall = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 3) if cuda else None
    return out, wall, peak


def compare(a, b) -> dict:
    """How the new path's SparseSDF ``a`` differs from the old path's ``b`` (identical up to float ties?)."""
    same_band = a.coords.shape == b.coords.shape and np.array_equal(a.coords, b.coords)
    same_blocks = a.block_coords.shape == b.block_coords.shape and np.array_equal(a.block_coords, b.block_coords)
    res = {"same_band_voxels": bool(same_band), "band_voxels_new_minus_old": len(a) - len(b),
           "same_blocks": bool(same_blocks)}
    if same_band:
        res["abs_sdf_max_diff"] = float(np.abs(np.abs(a.sdf) - np.abs(b.sdf)).max()) if len(a) else 0.0
        res["sign_flips"] = int((np.sign(a.sdf) != np.sign(b.sdf)).sum())
        res["sharp_diff"] = int((a.sharp != b.sharp).sum())
    if same_blocks:
        res["inside_bit_diff"] = int(np.unpackbits(a.block_inside ^ b.block_inside).sum())
    return res


def measure(mesh, args, path: str, stages: bool) -> tuple:
    """One path on one mesh: (SparseSDF, {wall_s, gpu_peak_gib[, stages_s, staged_wall_s, counts]})."""
    out, wall, peak = timed_call(mesh, args, path)
    row: dict = {"wall_s": round(wall, 3), "gpu_peak_gib": peak}
    if stages:
        with staged(args.device) as (times, counts):
            t0 = time.perf_counter()
            sdf_call(mesh, args, path)
            _sync(args.device)
            total = time.perf_counter() - t0
        top = sum(v for k, v in times.items() if k not in TOTALS)
        row["stages_s"] = {k: round(v, 3) for k, v in times.items()} | {"other": round(total - top, 3)}
        row["staged_wall_s"] = round(total, 3)
        row["counts"] = counts
    return out, row


def profile_table(mesh, args, name: str) -> str:
    """One new-path call under torch.profiler: the 40 costliest ops by self CPU time and by device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    _sync(args.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        sdf_call(mesh, args, "new")
        _sync(args.device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    parts = [f"# {name}: {len(mesh.faces)} triangles, profiled wall {wall:.3f} s", "## by self CPU time",
             ka.table(sort_by="self_cpu_time_total", row_limit=40)]
    if args.device.startswith("cuda"):
        parts += ["## by device time", ka.table(sort_by="self_device_time_total", row_limit=40)]
    return "\n".join(parts)


@contextlib.contextmanager
def synchronous_host_copy() -> Iterator[None]:
    """The SDF's band voxels copied to the host with a plain ``.cpu()`` (pageable memory, synchronous) instead of
    the background thread streaming them through pinned slots: the A/B of ``--host-copy-ab``."""
    from d3s2.geometry import sdf

    saved = sdf._start_host_copy
    sdf._start_host_copy = lambda *tensors: sdf._HostCopy(*tensors, background=False)
    try:
        yield
    finally:
        sdf._start_host_copy = saved


@contextlib.contextmanager
def kernel_config(config: str) -> Iterator[None]:
    """The near-field kernel launched with ``config`` = "BLOCKxWARPS" (query points per program, warps)."""
    from d3s2.ops.mesh_field import triton as kernels

    block, warps = (int(x) for x in config.split("x"))
    saved = kernels.BLOCK_Q, kernels.NUM_WARPS
    kernels.BLOCK_Q, kernels.NUM_WARPS = block, warps
    try:
        yield
    finally:
        kernels.BLOCK_Q, kernels.NUM_WARPS = saved


def kernel_ab(mesh, args) -> dict:
    """Clean new-path wall seconds (best of two, after a call that compiles) per near-field kernel config."""
    res = {}
    for config in args.kernel_ab:
        with kernel_config(config):
            timed_call(mesh, args, "new")
            res[config] = round(min(timed_call(mesh, args, "new")[1] for _ in range(2)), 3)
    return res


def run_tests(device: str) -> dict:
    """``pytest -m gpu`` on the op and geometry tests: return code and summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/ops/mesh_field",
           "tests/geometry"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-40:]) if proc.returncode else ""}


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    return {"n": len(v), "median": round(float(np.median(v)), 3), "p90": round(float(np.percentile(v, 90)), 3),
            "max": round(float(v.max()), 3), "mean": round(float(v.mean()), 3),
            "at_most_1s": int((v <= 1.0).sum())}


def markdown(result: dict) -> str:
    env, a = result["env"], result["args"]
    lines = [f"# Band SDF {a['resolution']}³ on {env['device']}: mesh_field Triton (new) vs torch pairs (old)", "",
             f"`{env['command']}` — commit {env['commit'][:10]}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}", ""]
    t = result.get("tests")
    if t:
        lines += [f"GPU tests (`{t['command']}`): {t['summary']} (rc {t['returncode']}, {t['seconds']} s)", ""]
    w = result["warmup"]
    lines += [f"Warm-up asset {w['asset']} ({w['triangles']} triangles): new path first call {w['first_new_s']} s, "
              f"second {w['second_new_s']} s, so Triton compilation ≈ **{w['compile_s']} s** (excluded below).", ""]
    for title, key in (("Named meshes", "named"), ("Random sample", "sample")):
        rows = result[key]
        if not rows:
            continue
        lines += [f"## {title}", "", "| asset | triangles | band voxels | new s | old s | speedup | new peak GiB | "
                  "old peak GiB | same output |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if "skipped" in r or "wall_s" not in r["new"]:
                reason = r.get("skipped") or r["new"]["skipped"]
                lines.append(f"| {r['asset']} | — | — | — | — | — | — | — | {reason} |")
                continue
            ag = r.get("agreement")
            same = ("—" if ag is None else "yes" if ag["same_band_voxels"] and ag["same_blocks"]
                    and not ag.get("sign_flips") and not ag.get("inside_bit_diff") else f"no: {ag}")
            old = r.get("old", {})
            lines.append(f"| {r['asset']} | {r['triangles']:,} | {r['band_voxels']:,} | {r['new']['wall_s']} | "
                         f"{old.get('wall_s', old.get('skipped'))} | {r.get('speedup', '—')}× | "
                         f"{r['new']['gpu_peak_gib']} | {old.get('gpu_peak_gib', '—')} | {same} |")
        lines.append("")
    s = result["summary"]
    if s:
        lines += ["## Sample summary (wall seconds)", "", "| path | n | median | p90 | max | mean | ≤ 1 s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for path in PATHS:
            st = s[path]
            if st:
                lines.append(f"| {path} | {st['n']} | {st['median']} | {st['p90']} | {st['max']} | {st['mean']} | "
                             f"{st['at_most_1s']} |")
        lines.append("")
    if result.get("kernel_ab"):
        configs = list(next(iter(result["kernel_ab"].values())))
        lines += ["## Near-field kernel configs (clean wall seconds, best of two; BLOCKxWARPS)", "",
                  "| asset | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
        lines += [f"| {name} | " + " | ".join(str(v[c]) for c in configs) + " |"
                  for name, v in result["kernel_ab"].items()]
        lines.append("")
    staged_rows = [r for r in result["named"] + result["sample"] if "stages_s" in r.get("new", {})]
    if staged_rows:
        names = []
        for r in staged_rows:
            for path in PATHS:
                names += [k for k in r.get(path, {}).get("stages_s", {}) if k not in names]
        lines += ["## Stages (seconds, synchronised timers; totals marked (all) overlap the others)", "",
                  "| asset | path | staged wall | " + " | ".join(names) + " |",
                  "|---|---|---:|" + "---:|" * len(names)]
        for r in staged_rows:
            for path in PATHS:
                st = r.get(path, {}).get("stages_s")
                if st:
                    lines.append(f"| {r['asset']} | {path} | {r[path]['staged_wall_s']} | "
                                 + " | ".join(str(st.get(n, "")) for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="mesh corpus npz (0 A.D. format) to sample from")
    p.add_argument("--named-npz", default=None, help="a second corpus for named meshes missing from --npz")
    p.add_argument("--named", nargs="*", default=None, help=f"named meshes (default {NAMED})")
    p.add_argument("--sample", type=int, default=30, help="random assets from --npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--band", type=float, default=1 / 128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--old-stages", choices=["all", "named", "none"], default="named",
                   help="which assets get a per-stage run of the old path (the new path gets one on every asset)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest -m gpu step")
    p.add_argument("--no-old", action="store_true", help="time the new path only (no agreement check)")
    p.add_argument("--host-copy-ab", action="store_true",
                   help="one more clean call of the new path per asset with synchronous pageable host copies")
    p.add_argument("--time-budget", type=float, default=170.0, help="seconds of timing after which assets are skipped")
    p.add_argument("--new-backend", default=PATHS["new"], help="mesh_field backend of the new path")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke: 32³, 3 sampled assets with <= 300 triangles, no named meshes unless --named")
    p.add_argument("--profile", nargs="*", default=[],
                   help="assets (of --npz / --named-npz) to run once more under torch.profiler: per-op table to "
                        "sdf_gpu_profile_<tag>.txt (where the time of slow assets goes: kernels, launches, syncs)")
    p.add_argument("--kernel-ab", nargs="*", default=[],
                   help="near-field kernel configs BLOCKxWARPS (e.g. 64x2 128x4 256x8) timed on the --profile assets")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args()
    from d3s2.data.corpus import MeshCorpus
    from d3s2.geometry.mesh_io import normalize_mesh

    named = ([] if args.tiny else NAMED) if args.named is None else args.named
    if args.tiny:
        args.resolution, args.sample = 32, 3
    corpus = MeshCorpus(args.npz)
    extra = MeshCorpus(args.named_npz) if args.named_npz else None
    names = corpus.names()
    if args.tiny:
        names = [n for n in names if len(corpus.arrays(n)[1]) <= 300]
    rng = np.random.default_rng(args.seed)
    picked = [names[i] for i in rng.permutation(len(names))[:args.sample + 1]]
    warm_name, sample = picked[-1], sorted(picked[:-1])

    def load(name: str, source):
        return normalize_mesh(source.mesh(name), scale=0.95)[0]

    result: dict = {"env": environment(args.device), "args": vars(args), "named": [], "sample": [], "summary": {}}
    # A fresh Triton cache, so the warm-up's first call pays the cold compilation (the tests then reuse it).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="d3s2_triton_cache_")
    # Warm-up: CUDA context, torch kernels, and the Triton compilation (first new-path call).
    mesh = load(warm_name, corpus)
    _, first, _ = timed_call(mesh, args, "new")
    _, second, _ = timed_call(mesh, args, "new")
    # Winding queries of a tiny mesh are summed brute force; one call through the hierarchy as well, so that no
    # kernel variant of the timed assets compiles in their calls.
    import d3s2.geometry._field as field_mod

    saved = field_mod._BRUTE_FORCE_PAIRS_KERNEL, field_mod._BRUTE_FORCE_PAIRS
    field_mod._BRUTE_FORCE_PAIRS_KERNEL = field_mod._BRUTE_FORCE_PAIRS = 0
    try:
        timed_call(mesh, args, "new")
    finally:
        field_mod._BRUTE_FORCE_PAIRS_KERNEL, field_mod._BRUTE_FORCE_PAIRS = saved
    if not args.no_old:
        timed_call(mesh, args, "old")
    result["warmup"] = {"asset": warm_name, "triangles": int(len(mesh.faces)), "first_new_s": round(first, 3),
                        "second_new_s": round(second, 3), "compile_s": round(first - second, 3)}
    print("warm-up:", result["warmup"], flush=True)
    if not args.no_tests:
        result["tests"] = run_tests(args.device)
        print("tests:", result["tests"]["summary"], flush=True)
    # The new path on every asset first, then the old one while the time budget lasts: a slow old path cuts the
    # comparison short, not the new path's sample.
    t_start = time.perf_counter()
    jobs = [("named", n) for n in named] + [("sample", n) for n in sample]
    outs, rows = {}, {}
    for path in ["new"] if args.no_old else list(PATHS):
        for group, name in jobs:
            source = corpus if name in corpus else extra if extra is not None and name in extra else None
            row = rows.setdefault(name, {"asset": name})
            if source is None:
                row["skipped"] = "not in --npz / --named-npz"
            if "skipped" in row or (path == "old" and "wall_s" not in row["new"]):
                continue
            if time.perf_counter() - t_start > args.time_budget:
                row[path] = {"skipped": f"time budget {args.time_budget:.0f} s spent"}
                continue
            stages = path == "new" or args.old_stages == "all" or (args.old_stages == "named" and group == "named")
            mesh = load(name, source)
            row["triangles"] = int(len(mesh.faces))
            try:
                out, row[path] = measure(mesh, args, path, stages)
                if args.host_copy_ab and path == "new":
                    with synchronous_host_copy():
                        row[path]["wall_sync_host_copy_s"] = round(timed_call(mesh, args, path)[1], 3)
            except (ValueError, torch.cuda.OutOfMemoryError) as e:  # an unusable asset (MeshError is a ValueError)
                row["skipped"] = f"error in the {path} path: {type(e).__name__}: {e}"
                continue
            finally:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if path == "new":
                outs[name] = out
                row.update(band_voxels=len(out), blocks=int(len(out.block_coords)))
            else:
                row["agreement"] = compare(outs.pop(name), out)
                row["speedup"] = round(row["old"]["wall_s"] / max(row["new"]["wall_s"], 1e-9), 2)
            ab = row[path].get("wall_sync_host_copy_s")
            print(f"{path} {group} {name}: {row[path]['wall_s']} s" + (f" ({ab} s with synchronous host copies)" if ab
                  else "") + f", {row['band_voxels']} band voxels", flush=True)
    for group, name in jobs:
        result[group].append(rows[name])
    result["summary"] = {path: _stats([r[path]["wall_s"] for r in result["sample"] if "wall_s" in r.get(path, {})])
                         for path in PATHS}
    result["timing_s"] = round(time.perf_counter() - t_start, 1)
    tag = "tiny_" + args.device.split(":")[0] if args.tiny else args.device.split(":")[0] + f"_{args.resolution}"
    if args.kernel_ab:
        result["kernel_ab"] = {}
        for name in args.profile:
            source = corpus if name in corpus else extra if extra is not None and name in extra else None
            if source is not None:
                result["kernel_ab"][name] = kernel_ab(load(name, source), args)
                print("kernel configs", name, result["kernel_ab"][name], flush=True)
    if args.profile:
        tables = []
        for name in args.profile:
            source = corpus if name in corpus else extra if extra is not None and name in extra else None
            if source is not None:
                tables.append(profile_table(load(name, source), args, name))
        os.makedirs(args.out_dir or default_out_dir(), exist_ok=True)
        out = os.path.join(args.out_dir or default_out_dir(), f"sdf_gpu_profile_{tag}.txt")
        with open(out + ".tmp", "w") as f:
            f.write("\n\n".join(tables) + "\n")
        os.replace(out + ".tmp", out)
    paths = write_outputs(args.out_dir or default_out_dir(), f"sdf_gpu_{tag}", result, markdown(result))
    print("wrote", *map(str, paths))
    if result.get("tests", {}).get("returncode", 0) not in (0, 5):  # 5: no test collected
        sys.exit("GPU tests failed: " + result["tests"]["summary"])


if __name__ == "__main__":
    main()
