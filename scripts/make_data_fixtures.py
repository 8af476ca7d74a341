"""Rebuild the committed 0 A.D. fixtures from the full corpus (CC-BY-SA-3.0, Wildfire Games).

    python scripts/make_data_fixtures.py /work/shared/data/0ad_meshes.npz

Writes tests/assets/0ad_tiny.npz (5 small meshes, corpus format) and src/d3s2/assets/examples/*.glb
(bundled example meshes for ``make demo``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from d3s2.data.corpus import MeshCorpus, save_corpus

ROOT = Path(__file__).resolve().parents[1]
# Small (≤ 500 triangles) and one per category; two are watertight, three are not.
TINY = ["gaia/bamboo_1", "props/ashoka_lion", "props/brit_workshop_ram_wheels", "structural/celt_house_a",
        "skeletal/animal_boar"]
EXAMPLES = ["skeletal/horse_lusitano", "structural/hele_ship_trireme", "gaia/deciduous_12",
            "structural/spart_temple", "skeletal/elephant_african_forest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="?", default=None, help="0ad_meshes.npz (default: $D3S2_0AD_NPZ)")
    args = parser.parse_args()
    corpus = MeshCorpus(args.corpus)
    save_corpus(ROOT / "tests" / "assets" / "0ad_tiny.npz", {n: corpus.arrays(n) for n in TINY})
    out = ROOT / "src" / "d3s2" / "assets" / "examples"
    out.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLES:
        path = out / (name.split("/")[-1] + ".glb")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(corpus.mesh(name).export(file_type="glb"))  # outward-facing winding
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
