"""Host-sync proxy of the torch SDF path, measurable on a CPU: per stage, the torch ops it dispatches and the ops
among them that would wait for the device on CUDA (``nonzero``, ``unique``, boolean-mask indexing, ``.item()`` /
``bool()`` / ``int()``, ``torch.equal``, ``repeat_interleave`` without ``output_size``, device-to-host copies).

On a GPU each such op is a ``cudaStreamSynchronize`` (the queue drains, the host idles while kernels run and the
GPU idles while the host launches the next ones), and each dispatched op is roughly one kernel launch; the
session-5 profile of the slowest assets was dominated by both. Counting them needs no GPU:

    PYTHONPATH=src python benchmarks/count_sdf_syncs.py --npz /work/shared/data/0ad_meshes.npz \
        --resolution 256 structural/han_ministry

Runs ``compute_sparse_sdf(..., backend="torch")`` on the CPU with the torch ``mesh_field`` backend (the op's
internals are not counted: on CUDA they are one Triton launch per call) and the GPU's connected components
(:func:`d3s2.geometry.sdf.label_components`, not scipy), and prints / writes a table. ``.tolist()`` reads no op
on the CPU, so those syncs are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import d3s2  # noqa: E402,F401  first: the package on PYTHONPATH, not the one beside this script (A/B runs)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sdf_gpu import TOTALS, patched_stages  # noqa: E402

_SYNC_OPS = {"nonzero", "_unique2", "unique_dim", "unique_consecutive", "_local_scalar_dense", "equal",
             "masked_select", "bincount"}


def _is_sync(func, args, kwargs) -> bool:
    name = func.__name__.split(".")[0]
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        idx = args[1] if len(args) > 1 else kwargs.get("indices", [])
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
    return False


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops and would-be syncs, attributed to the innermost open stage (``stack``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = ["other"]
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.sync_names: Counter = Counter()
        self.skip = 0  # inside the near_field op: not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.skip:
            stage = self.stack[-1]
            self.ops[stage] += 1
            if _is_sync(func, args, kwargs):
                self.syncs[stage] += 1
                self.sync_names[(stage, func.__name__)] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def attributed(counter: OpCounter):
    """Patch the STAGES functions so ops are attributed to the innermost stage; the near_field op is one op."""

    def wrap(fn, stage):
        def inner(*args, **kwargs):
            if stage == "near_field op (all)":
                if not counter.skip:
                    counter.ops[counter.stack[-1]] += 1
                counter.skip += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    counter.skip -= 1
            counter.stack.append(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.stack.pop()
        return inner

    with patched_stages(wrap, skip=set(TOTALS) - {"near_field op (all)"}):
        yield


def count(mesh, resolution: int, band: float) -> dict:
    from d3s2.geometry import sdf as sdf_mod
    from d3s2.geometry.sdf import compute_sparse_sdf
    from d3s2.ops import use_backend

    counter = OpCounter()
    saved = sdf_mod._components
    sdf_mod._components = sdf_mod.label_components  # what the GPU runs
    t0 = time.perf_counter()
    try:
        with use_backend("mesh_field", "torch"), attributed(counter), counter:
            out = compute_sparse_sdf(mesh, resolution, band=band, device="cpu", backend="torch")[resolution]
    finally:
        sdf_mod._components = saved
    wall = time.perf_counter() - t0
    return {"band_voxels": len(out), "blocks": int(len(out.block_coords)), "wall_s": round(wall, 2),
            "ops": dict(counter.ops), "syncs": dict(counter.syncs), "ops_total": sum(counter.ops.values()),
            "syncs_total": sum(counter.syncs.values()),
            "sync_ops": {f"{s}: {n}": c for (s, n), c in counter.sync_names.most_common(30)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("assets", nargs="+")
    p.add_argument("--npz", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--band", type=float, default=1 / 128)
    p.add_argument("--hierarchical", action="store_true",
                   help="every winding query through the hierarchy (as for large meshes on the GPU), none brute force")
    p.add_argument("--out", default=None, help="JSON file for the counts")
    args = p.parse_args()
    from d3s2.data.corpus import MeshCorpus
    from d3s2.geometry.mesh_io import normalize_mesh

    if args.hierarchical:
        import d3s2.geometry._field as field_mod

        field_mod._BRUTE_FORCE_PAIRS = 0
    corpus = MeshCorpus(args.npz)
    res = {}
    for name in args.assets:
        mesh = normalize_mesh(corpus.mesh(name), scale=0.95)[0]
        res[name] = count(mesh, args.resolution, args.band)
        r = res[name]
        print(f"{name} ({len(mesh.faces)} triangles) at {args.resolution}^3: {r['band_voxels']} band voxels, "
              f"{r['ops_total']} ops, {r['syncs_total']} would-be syncs, {r['wall_s']} s on the CPU")
        for stage in sorted(r["ops"], key=lambda s: -r["ops"][s]):
            print(f"  {stage:24s} ops {r['ops'][stage]:7d}  syncs {r['syncs'].get(stage, 0):6d}")
        for k, v in list(r["sync_ops"].items())[:12]:
            print(f"    {k}: {v}")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
