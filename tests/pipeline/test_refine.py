"""The published refiners inside ImageTo3DPipeline: a tiny converted-published folder (pipeline.json with the
published ``defaults``) loads its refiners and applies them; d3s2's own folders do not."""

from __future__ import annotations

import json

import pytest
import torch

from d3s2.models.refiner import VoxelRefinerXL, VoxelRefinerXLSign
from d3s2.pipeline import extract
from d3s2.pipeline.image_to_3d import PIPELINE_FILE, ImageTo3DPipeline, block_outside_fraction
from d3s2.pipeline.published import PublishedDefaults

from .tiny import TINY_OCCUPANCY_THRESHOLD, rgba_image, tiny_pipeline

# Few narrow patches: CPU conv3d is slow (the 64³ refiner also skips patches without decoded voxels).
TINY = dict(block_channels=[2, 4], norm_groups=2, layers_per_block=1, layers_mid_block=1)
XL_TILES = dict(patch_size=24, patch_stride=20)  # 3 overlapping patches per axis at 64³
SIGN_TILES = dict(patch_size=32, patch_stride=32)  # 2 per axis on the pooled 64³ grid of 128³


def _refiners(seed: int = 0) -> dict[int, torch.nn.Module]:
    torch.manual_seed(seed)
    out = {64: VoxelRefinerXL(VoxelRefinerXL.Config(**TINY, **XL_TILES, feature_channels=8, feature_hidden=8)),
           128: VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**TINY, **SIGN_TILES))}
    with torch.no_grad():
        for m in out.values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny folder in the layout `d3s2 convert` writes: components + pipeline.json with published defaults."""
    base = tiny_pipeline()
    pipe = ImageTo3DPipeline(base.conditioner, base.dense_dit, base.dense_vae, base.sparse_dits, base.sparse_vaes,
                             base.settings, _refiners())
    root = pipe.save_pretrained(tmp_path_factory.mktemp("published") / "tiny")
    manifest = json.loads((root / PIPELINE_FILE).read_text())
    assert {"refiner_64", "refiner_128"} <= set(manifest["components"])
    del manifest["settings"]
    manifest["defaults"] = PublishedDefaults(version="v1.1").to_dict()
    (root / PIPELINE_FILE).write_text(json.dumps(manifest))
    return root


def test_converted_published_folder_applies_both_refiners(folder, monkeypatch):
    pipe = ImageTo3DPipeline.from_pretrained(folder)
    assert pipe.settings.refine and pipe.settings.refine_level == 0.4 and pipe.settings.mc_level == 0.2
    assert isinstance(pipe.refiners[64], VoxelRefinerXL) and isinstance(pipe.refiners[128], VoxelRefinerXLSign)
    pipe.settings.occupancy_threshold = TINY_OCCUPANCY_THRESHOLD  # random dense weights (see tiny.py)
    decoded, meshed = {}, []
    for r, vae in pipe.sparse_vaes.items():
        def record(*a, _r=r, _decode=vae.decode, **kw):
            decoded[_r] = _decode(*a, **kw)
            return decoded[_r]
        monkeypatch.setattr(vae, "decode", record)
    closed_mesh = extract.closed_mesh
    monkeypatch.setattr(extract, "closed_mesh", lambda *a, **kw: meshed.append((a, kw)) or closed_mesh(*a, **kw))

    mesh = pipe(rgba_image(), resolution=128, seed=0, steps=1, progress=False, device="cpu",
                structure={64: _cube_shell(8, 0, 2), 128: _cube_shell(16, 6, 10)})  # few tokens: fast on CPU

    assert mesh.is_watertight and len(mesh.faces) > 0
    assert {"refine 64", "refine 128", "decode 64", "mesh 128"} <= set(pipe.last_timing.seconds)
    with torch.no_grad():
        # 64³ (the published 512³ role): refined values from the SDF and the pre-head features, at refine_level.
        sdf, feats = decoded[64]
        (_, values, _, _), kw = meshed[0]
        torch.testing.assert_close(values, pipe.refiners[64].refine_voxels(sdf, feats)[:, 0])
        assert kw["level"] == 0.4 and kw["outside_fraction"] is None
        # 128³ (the published 1024³ role): decoded values at mc_level, enclosed regions by the sign refiner.
        sdf = decoded[128]
        (_, values, _, _), kw = meshed[1]
        torch.testing.assert_close(values, sdf.feats[:, 0].float())
        want = block_outside_fraction(pipe.refiners[128].predict_outside(sdf)[0])
        assert kw["level"] == 0.2 and torch.equal(kw["outside_fraction"], want)


def test_refiners_off_and_own_folders(folder, tmp_path):
    pipe = ImageTo3DPipeline.from_pretrained(folder, resolutions=[64])
    assert list(pipe.refiners) == [64]  # the 128 one belongs to a stage that was not loaded
    pipe.settings.refine = False
    pipe.settings.occupancy_threshold = TINY_OCCUPANCY_THRESHOLD
    pipe(rgba_image(), resolution=64, seed=0, steps=1, progress=False, device="cpu")
    assert "refine 64" not in pipe.last_timing.seconds
    # A d3s2 folder (settings, refine off) does not even load the refiners it holds.
    own = pipe.save_pretrained(tmp_path / "own")
    assert "refiner" not in " ".join(ImageTo3DPipeline.from_pretrained(own).components())


def _cube_shell(grid: int, lo: int, hi: int) -> torch.Tensor:
    ax = torch.arange(grid)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    inside = ((c >= lo) & (c < hi)).all(1)
    core = ((c > lo) & (c < hi - 1)).all(1)
    return c[inside & ~core].to(torch.int32)


def test_refiner_errors():
    base = tiny_pipeline()
    args = (base.conditioner, base.dense_dit, base.dense_vae, base.sparse_dits, base.sparse_vaes, base.settings)
    with pytest.raises(ValueError, match="reads 6 decoder features"):
        ImageTo3DPipeline(*args, {64: VoxelRefinerXL(VoxelRefinerXL.Config(**TINY, **XL_TILES, feature_channels=6))})
    with pytest.raises(ValueError, match="divisible by stride"):
        bad = VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**TINY, patch_size=32, patch_stride=12))
        ImageTo3DPipeline(*args, {128: bad})
    with pytest.raises(ValueError, match="no sparse stage"):
        ImageTo3DPipeline(*args, {256: VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**TINY, **SIGN_TILES))})
    with pytest.raises(ValueError, match="expected a VoxelRefinerXL"):
        ImageTo3DPipeline(*args, {64: torch.nn.Linear(1, 1)})


def test_block_outside_fraction():
    outside = torch.zeros(8, 8, 8, dtype=torch.bool)
    outside[:4, :4, :4] = True
    outside[4, 4, 4] = True
    frac = block_outside_fraction(outside)
    assert frac.shape == (2, 2, 2) and frac[0, 0, 0] == 1 and frac[1, 1, 1] == 1 / 64 and frac.sum() == 1 + 1 / 64
