"""Conditioning-render speed: ms per 518² view (embree ray casting) on 0 A.D. corpus meshes; with ``--compare``,
embree against the numpy fallback caster per mesh and view (alpha pixels that differ, hit pixels whose first face
differs, seconds of each).

    PYTHONPATH=src python benchmarks/bench_render.py --corpus /work/shared/data/0ad_meshes.npz --meshes 20
    PYTHONPATH=src python benchmarks/bench_render.py --compare --size 384 --mesh out/demo/horse_lusitano.glb \\
        src/d3s2/assets/examples/horse_lusitano.glb src/d3s2/assets/examples/spart_temple.glb
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from d3s2.data.corpus import MeshCorpus
from d3s2.geometry.mesh_io import load_mesh, normalize_mesh
from d3s2.geometry.render import RayCaster, render_views, view_camera

COMPARE_VIEWS = [(20.0, 30.0, 50.0), (35.0, 140.0, 80.0), (12.0, 250.0, 35.0)]  # elevation, azimuth, focal mm


def compare_casters(name: str, mesh, size: int) -> None:
    caster = RayCaster(mesh.vertices, mesh.faces)
    if caster._scene is None:
        raise SystemExit("--compare needs embreex (pip install 'd3s2[data]')")
    for elevation, azimuth, focal in COMPARE_VIEWS:
        K, w2c, _ = view_camera(np.asarray(mesh.vertices), elevation, azimuth, focal, size)
        t0 = time.perf_counter()
        embree = caster.first_hit(K, w2c, size, size)
        t1 = time.perf_counter()
        numpy = caster._first_hit_by_projection(K, w2c, size, size)
        t2 = time.perf_counter()
        both = (embree >= 0) & (numpy >= 0)
        print(f"{name} ({len(mesh.faces)} faces) view {elevation:g}/{azimuth:g}/{focal:g}: {(embree >= 0).sum()} hit "
              f"pixels, alpha differs {((embree >= 0) != (numpy >= 0)).sum()}, face differs "
              f"{(both & (embree != numpy)).sum()}; embree {t1 - t0:.2f} s, numpy {t2 - t1:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--meshes", type=int, default=20)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--compare", action="store_true", help="embree against the numpy fallback caster")
    parser.add_argument("--mesh", nargs="*", default=None, help="mesh files instead of corpus meshes")
    args = parser.parse_args()
    if args.mesh:
        meshes = [(Path(p).name, lambda p=p: load_mesh(p)) for p in args.mesh]
    else:
        corpus = MeshCorpus(args.corpus)
        names = corpus.names()
        pick = [names[i] for i in np.random.default_rng(0).choice(len(names), args.meshes, replace=False)]
        meshes = [(name, lambda name=name: corpus.mesh(name)) for name in pick]
    per_view, tris = [], []
    for name, load in meshes:
        mesh, _ = normalize_mesh(load())
        if args.compare:
            compare_casters(name, mesh, args.size)
            continue
        t = time.perf_counter()
        render_views(mesh, args.views, size=args.size, key=name)
        per_view.append((time.perf_counter() - t) / args.views)
        tris.append(len(mesh.faces))
    if per_view:
        ms = np.array(per_view) * 1e3
        print(f"{platform.processor() or platform.machine()}, {len(meshes)} meshes (median {int(np.median(tris))} "
              f"tris), {args.views} views at {args.size}²: ms/view median {np.median(ms):.1f}, mean {ms.mean():.1f}, "
              f"max {ms.max():.1f}")


if __name__ == "__main__":
    main()
