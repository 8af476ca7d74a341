"""How the torch SDF field's winding numbers classify triangles against libigl's, with its hierarchy (interpolated
far field) and with brute-force sums (every triangle exactly), on the CPU.

    PYTHONPATH=src python benchmarks/check_sdf_winding.py --resolution 256 structural/pers_range

For each asset prints how many triangles :func:`d3s2.geometry.sdf.classify_triangles` puts in another class (boundary,
lost sheet, internal) than with the igl field, for the hierarchy and for brute force, and between the two. The
hierarchy is built for ``--resolution`` (its cells depend on it); ``--corpus`` defaults to ``$D3S2_0AD_NPZ``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("assets", nargs="+")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--band", type=float, default=1 / 128)
    p.add_argument("--corpus", default=None)
    args = p.parse_args()
    import d3s2.geometry._field as field_mod
    from d3s2.data.corpus import MeshCorpus
    from d3s2.geometry import sdf
    from d3s2.geometry.mesh_io import normalize_mesh
    from d3s2.ops import use_backend

    corpus = MeshCorpus(args.corpus)
    r = args.resolution
    for name in args.assets:
        mesh = normalize_mesh(corpus.mesh(name), scale=0.95)[0]
        flags = np.stack([sdf.sharp_face_edges(mesh, 30.0), sdf.open_face_edges(mesh)], axis=2)
        classes = {"igl": sdf.classify_triangles(sdf._make_field("igl", mesh, flags, args.band, "cpu"), mesh)}
        field = sdf._make_field("torch", mesh, flags, args.band, "cpu")
        field.prepare(r, args.band + 2.0 / r)
        saved = field_mod._BRUTE_FORCE_PAIRS
        try:
            with use_backend("mesh_field", "torch"), torch.no_grad():
                for tag, limit in (("hierarchy", 0), ("brute", 1 << 62)):
                    field_mod._BRUTE_FORCE_PAIRS = limit
                    classes[tag] = sdf.classify_triangles(field, mesh)
        finally:
            field_mod._BRUTE_FORCE_PAIRS = saved
        diff = {f"{a}!={b}": int((classes[a] != classes[b]).sum())
                for a, b in (("hierarchy", "igl"), ("brute", "igl"), ("hierarchy", "brute"))}
        print(f"{name} ({len(mesh.faces)} triangles, {r}^3):", diff, flush=True)


if __name__ == "__main__":
    main()
