"""Render the example images of ``examples/`` from test-split 0 A.D. assets (CC-BY-SA-3.0, Wildfire Games).

    python scripts/make_examples.py /work/shared/data/0ad_meshes.npz

Each image is exactly view ``v`` of ``d3s2 data build 0ad --views 4`` with the default settings (518², scale
0.95, seed 0): the same source mesh, normalisation and camera (:func:`d3s2.data.build.build_asset`). Every
asset is in the ``test`` split (:func:`d3s2.data.dataset.split_of`), so no demo model was trained on it.
Deterministic: a re-run writes identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEWS = 4  # the build's view count these images match
# (corpus name, view): views picked by eye for a clear silhouette.
EXAMPLES = [
    ("skeletal/horse_lusitano", 3),
    ("skeletal/tiger", 1),
    ("skeletal/rhino", 3),
    ("structural/han_pagoda", 1),
    ("structural/rome_vesta", 1),
    ("structural/maur_siege_ram", 1),
]


def render_example(corpus_path: str, name: str, view: int, *, views: int = VIEWS):
    """uint8 ``[518, 518, 4]``: view ``view`` of the asset as a default build renders it."""
    from d3s2.data.build import CORPUS_PREFIX, AssetSource, BuildConfig, load_source_mesh
    from d3s2.geometry.mesh_io import normalize_mesh
    from d3s2.geometry.render import render_views

    config = BuildConfig(views=views)
    asset = AssetSource(f"{CORPUS_PREFIX}/{name}", corpus_path, name)
    mesh, _ = normalize_mesh(load_source_mesh(asset), scale=config.scale)
    return render_views(mesh, config.views, size=config.image_size, seed=config.seed, key=asset.name).images[view]


def main() -> None:
    from d3s2.data.corpus import find_corpus
    from d3s2.data.dataset import split_of
    from d3s2.geometry.render import encode_png
    from d3s2.train.checkpoint import atomic_write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="?", default=None, help="0ad_meshes.npz (default: $D3S2_0AD_NPZ)")
    parser.add_argument("--out", default=str(ROOT / "examples"), help="output folder (default: examples/)")
    args = parser.parse_args()
    corpus = str(find_corpus(args.corpus))
    for name, view in EXAMPLES:
        if split_of(f"0ad/{name}") != "test":
            raise ValueError(f"0ad/{name} is in the {split_of(f'0ad/{name}')} split; examples must be test assets")
        png = encode_png(render_example(corpus, name, view))
        path = atomic_write(Path(args.out) / f"{name.split('/')[-1]}.png", lambda f, b=png: f.write(b))
        print(f"{path} ({len(png) // 1024} KB)")  # noqa: T201


if __name__ == "__main__":
    main()
