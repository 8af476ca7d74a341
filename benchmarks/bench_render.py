"""Conditioning-render speed: ms per 518² view (embree ray casting) on 0 A.D. corpus meshes.

    PYTHONPATH=src python benchmarks/bench_render.py --corpus /work/shared/data/0ad_meshes.npz --meshes 20
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from d3s2.data.corpus import MeshCorpus
from d3s2.geometry.mesh_io import normalize_mesh
from d3s2.geometry.render import render_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=None)
    parser.add_argument("--meshes", type=int, default=20)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args()
    corpus = MeshCorpus(args.corpus)
    names = corpus.names()
    pick = [names[i] for i in np.random.default_rng(0).choice(len(names), args.meshes, replace=False)]
    per_view, tris = [], []
    for name in pick:
        mesh, _ = normalize_mesh(corpus.mesh(name))
        t = time.perf_counter()
        render_views(mesh, args.views, size=args.size, key=name)
        per_view.append((time.perf_counter() - t) / args.views)
        tris.append(len(mesh.faces))
    ms = np.array(per_view) * 1e3
    print(f"{platform.processor() or platform.machine()}, {args.meshes} meshes (median {int(np.median(tris))} tris), "
          f"{args.views} views at {args.size}²: ms/view median {np.median(ms):.1f}, mean {ms.mean():.1f}, "
          f"max {ms.max():.1f}")


if __name__ == "__main__":
    main()
