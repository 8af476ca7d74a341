"""The example images of examples/: test-split 0 A.D. renders, RGBA 518², small, listed in the README."""

from pathlib import Path

import numpy as np
from PIL import Image

from d3s2.data.dataset import split_of

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_examples_are_small_rgba_test_split_renders():
    pngs = sorted(EXAMPLES.glob("*.png"))
    assert 4 <= len(pngs) <= 6
    readme = (EXAMPLES / "README.md").read_text()
    assert "CC-BY-SA-3.0" in readme and "Wildfire Games" in readme
    for png in pngs:
        assert png.stat().st_size < 300_000
        with Image.open(png) as im:
            assert im.mode == "RGBA" and im.size == (518, 518)
            alpha = np.asarray(im)[..., 3]
        assert alpha[0, 0] == 0 and 0.02 < (alpha > 0).mean() < 0.9  # an object on a transparent background
        row = next(line for line in readme.splitlines() if f"`{png.name}`" in line)
        source = row.split("`")[3]  # art/meshes/<name>.dae.cached.pmd
        name = source.removeprefix("art/meshes/").removesuffix(".dae.cached.pmd")
        assert split_of(f"0ad/{name}") == "test", name
