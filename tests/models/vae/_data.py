"""A tiny built data folder (four primitive meshes at R=16 and 32, no renders) shared by the task and CLI tests."""

from __future__ import annotations

from pathlib import Path

import trimesh

from d3s2.data.build import BuildConfig, build, resolve_sources

BAND = 0.0625  # two voxels at 32³: complete marching-cubes cells in the band
RESOLUTION = 32


def primitive_meshes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    trimesh.creation.icosphere(2, radius=0.7).export(folder / "sphere.obj")
    trimesh.creation.box((1.0, 0.6, 0.8)).export(folder / "box.obj")
    trimesh.creation.cylinder(radius=0.4, height=1.2, sections=24).export(folder / "cylinder.obj")
    trimesh.creation.capsule(height=0.8, radius=0.3).export(folder / "capsule.obj")
    return folder


def build_tiny(root: Path) -> Path:
    meshes = primitive_meshes(root / "meshes")
    out = root / "data"
    summary = build(resolve_sources([str(meshes)]), out, BuildConfig(resolutions=(16, RESOLUTION), views=0, band=BAND),
                    progress=False)
    assert summary.built == 4 and not summary.failed, summary
    return out
