"""Render the example images of ``d3s2 app`` from the bundled example meshes (CC-BY-SA-3.0, Wildfire Games).

    python scripts/make_app_examples.py

Writes src/d3s2/assets/examples/<name>.png: one 256² RGBA view (exact alpha) per example GLB, the input the
image-to-3D pipeline expects. Needs the [data] extra (embree ray casting).
"""

from __future__ import annotations

import os
from pathlib import Path

from d3s2.geometry.mesh_io import load_mesh
from d3s2.geometry.render import encode_png, render_views

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "d3s2" / "assets" / "examples"
SIZE = 256


def main() -> None:
    for glb in sorted(EXAMPLES.glob("*.glb")):
        image = render_views(load_mesh(glb), 1, size=SIZE, seed=0, key=glb.stem, focal_mm=(50.0, 50.0)).images[0]
        path = glb.with_suffix(".png")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(encode_png(image))
        os.replace(tmp, path)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
