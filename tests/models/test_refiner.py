"""Refiner U-Nets: layout, adaptive filter convention, patch tiling/blending against a naive whole-grid run."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from d3s2.models.refiner import (
    VoxelRefinerXL,
    VoxelRefinerXLSign,
    adaptive_filter,
    blend_weights,
    patch_starts,
)
from d3s2.sparse import SparseTensor

TINY = dict(block_channels=[4, 8], norm_groups=2, layers_per_block=1, layers_mid_block=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _random_shell(resolution: int, channels: int, batch: int = 2, n: int = 60, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = [torch.randperm(resolution**3, generator=g)[:n] for _ in range(batch)]
    coords = [torch.stack([c // resolution**2, c // resolution % resolution, c % resolution], 1) for c in coords]
    feats = [torch.rand(n, channels, generator=g) * 2 - 1 for _ in range(batch)]
    return SparseTensor.from_samples(coords, feats, resolution=resolution)


def test_unet_skip_widths_follow_the_published_pattern():
    """Up-block resnets see [x, skip] with the published widths (1024, 1024, 640 | 640, 256, 160 | ...)."""
    with torch.device("meta"):
        m = VoxelRefinerXL()
    widths = [[r.norm1.num_channels for r in b.resnets] for b in m.unet3d1.up_blocks]
    assert widths == [[1024, 1024, 640], [640, 256, 160], [160, 64, 40], [40, 16, 16]]
    assert m.unet3d1.conv_in.in_channels == 16 and len(m.unet3d1.mid_block.resnets) == 3
    assert isinstance(m.unet3d1.up_blocks[0].upsamplers[0].conv, torch.nn.ConvTranspose3d)
    assert m.unet3d1.up_blocks[3].upsamplers is None and m.unet3d1.down_blocks[3].downsamplers is None


def test_adaptive_filter_offset_order_is_z_fastest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 5, 6, generator=g)
    w = torch.rand(1, 27, 4, 5, 6, generator=g)
    out = adaptive_filter(x, w, iterations=1)
    wn = w / w.sum(1, keepdim=True)
    for p in [(0, 0, 0), (1, 2, 3), (3, 4, 5), (2, 0, 5)]:
        expect = torch.zeros(2)
        for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3):
            q = (p[0] + dx, p[1] + dy, p[2] + dz)
            if all(0 <= q[a] < x.shape[2 + a] for a in range(3)):
                expect += wn[0, 9 * (dx + 1) + 3 * (dy + 1) + (dz + 1), p[0], p[1], p[2]] * x[0, :, q[0], q[1], q[2]]
        torch.testing.assert_close(out[0, :, p[0], p[1], p[2]], expect)
    # Iterations re-apply the same normalised weights.
    torch.testing.assert_close(adaptive_filter(x, w, 2), adaptive_filter(adaptive_filter(x, w, 1), w, 1))


def test_blend_weights_partition_unity_and_published_ramp():
    ws = blend_weights(512, 192, 160, "linear")
    total = torch.zeros(512)
    for s, w in zip(patch_starts(512, 192, 160), ws):
        total[s:s + 192] += w
    torch.testing.assert_close(total, torch.ones(512))
    torch.testing.assert_close(ws[1][:32], torch.linspace(0, 1, 32))  # the published ramp, endpoints included
    last = blend_weights(512, 256, 128, "last")
    assert [int(w.sum()) for w in last] == [128, 128, 256]
    with pytest.raises(ValueError, match="divisible by stride"):
        patch_starts(512, 192, 100)
    with pytest.raises(ValueError, match="overlap <= stride"):
        blend_weights(20, 16, 4, "linear")


def _naive_linear_blend(patches: dict, starts: list[int], p: int, r: int) -> torch.Tensor:
    """The published order: blend along z into lines, lines along y into layers, layers along x."""
    overlap = p - (starts[1] - starts[0])
    ramp = torch.linspace(0, 1, overlap)

    def blend(parts, axis):
        shape = list(parts[0].shape)
        shape[axis] = r
        out = torch.zeros(shape)
        for idx, (s, part) in enumerate(zip(starts, parts)):
            w = torch.ones(p)
            if idx > 0:
                w[:overlap] = ramp
            if idx < len(parts) - 1:
                w[p - overlap:] = 1 - ramp
            view = [1] * part.ndim
            view[axis] = p
            out.narrow(axis, s, p).add_(part * w.view(view))
        return out

    n = len(starts)
    lines = {(i, j): blend([patches[i, j, k] for k in range(n)], 4) for i in range(n) for j in range(n)}
    layers = {i: blend([lines[i, j] for j in range(n)], 3) for i in range(n)}
    return blend([layers[i] for i in range(n)], 2)


def test_refiner_xl_patches_match_naive_dense_processing():
    cfg = VoxelRefinerXL.Config(**TINY, feature_channels=6, feature_hidden=5, patch_size=8, patch_stride=4)
    model = VoxelRefinerXL(cfg)
    _perturb(model)
    sdf = _random_shell(12, 1)
    feats = torch.randn(sdf.num_voxels, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(sdf, feats)
        dense_sdf = torch.ones(2, 1, 12, 12, 12)
        dense_f = torch.zeros(2, 6, 12, 12, 12)
        c = sdf.coords.long()
        dense_sdf[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = sdf.feats
        dense_f[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
        starts = patch_starts(12, 8, 4)
        patches = {(i, j, k): model.forward_patch(dense_sdf[:, :, a:a + 8, b:b + 8, d:d + 8],
                                                  dense_f[:, :, a:a + 8, b:b + 8, d:d + 8])
                   for (i, a), (j, b), (k, d) in itertools.product(enumerate(starts), repeat=3)}
    assert out.shape == (2, 1, 12, 12, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, _naive_linear_blend(patches, starts, 8, 12), atol=1e-5, rtol=1e-5)
    assert out.abs().max() <= 1  # tanh, convex blend


def test_refiner_xl_refine_voxels_equals_the_dense_output_at_the_voxels():
    """The sparse output (patches without voxels skipped) is the dense output gathered at the voxels."""
    cfg = VoxelRefinerXL.Config(**TINY, feature_channels=6, feature_hidden=5, patch_size=8, patch_stride=4)
    model = VoxelRefinerXL(cfg)
    _perturb(model)
    corner = _random_shell(4, 1, n=20, seed=4)  # voxels in [0, 4)³: only the patch at (0, 0, 0) holds any
    sdf = SparseTensor(corner.feats, corner.coords, resolution=12, batch_size=2)
    feats = torch.randn(sdf.num_voxels, 6, generator=torch.Generator().manual_seed(5))
    ran = []
    refine = model.refine_patch

    def counting(*a):
        ran.append(1)
        return refine(*a)

    with torch.no_grad():
        dense = model(sdf, feats)
        model.refine_patch = counting
        values = model.refine_voxels(sdf, feats)
    c = sdf.coords.long()
    assert values.shape == (sdf.num_voxels, 1) and values.dtype == torch.float32
    torch.testing.assert_close(values, dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], atol=1e-6, rtol=1e-6)
    assert len(ran) == 1  # of 8 patches
    assert not torch.equal(dense[:, :, 8:], torch.zeros_like(dense[:, :, 8:]))  # skipped ones would not be zero


def test_refiner_xl_sign_overwrites_in_patch_order_and_restores_band():
    cfg = VoxelRefinerXLSign.Config(**TINY, patch_size=8, patch_stride=2)
    model = VoxelRefinerXLSign(cfg)
    _perturb(model, seed=1)
    sdf = _random_shell(24, 1, n=300, seed=2)
    with torch.no_grad():
        grid = model(sdf)
        # Naive: pool ×2 (mean over occupied children, +1 elsewhere), run every patch, later ones overwrite.
        c = sdf.coords.long()
        sums = torch.zeros(2, 12, 12, 12).index_put_((c[:, 0], c[:, 1] // 2, c[:, 2] // 2, c[:, 3] // 2),
                                                    sdf.feats[:, 0], accumulate=True)
        cnt = torch.zeros(2, 12, 12, 12).index_put_((c[:, 0], c[:, 1] // 2, c[:, 2] // 2, c[:, 3] // 2),
                                                   torch.ones(len(c)), accumulate=True)
        pooled = torch.where(cnt > 0, sums / cnt.clamp(min=1), 1.0)[:, None]
        sign = torch.ones(2, 1, 12, 12, 12)
        for a, b, d in itertools.product(patch_starts(12, 8, 2), repeat=3):
            logit = model.forward_patch(pooled[:, :, a:a + 8, b:b + 8, d:d + 8])
            sign[:, :, a:a + 8, b:b + 8, d:d + 8] = torch.where(torch.sigmoid(logit) >= 0.5, 1.0, -1.0)
    expect = sign.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    expect[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = sdf.feats
    assert grid.shape == (2, 1, 24, 24, 24)
    torch.testing.assert_close(grid, expect)
    assert (grid == 1).any() and (grid == -1).any()


def test_refiner_errors():
    model = VoxelRefinerXL(VoxelRefinerXL.Config(**TINY, feature_channels=6, patch_size=8, patch_stride=4))
    sdf = _random_shell(12, 1)
    with pytest.raises(ValueError, match="feats"):
        model(sdf, torch.zeros(sdf.num_voxels, 5))
    with pytest.raises(ValueError, match="divisible by stride"):
        model(_random_shell(14, 1), torch.zeros(120, 6))
    with pytest.raises(ValueError, match="1 channel"):
        model(_random_shell(12, 2), torch.zeros(120, 6))
    with pytest.raises(ValueError, match="divisible by 2"):
        model.unet3d1(torch.zeros(1, 8, 5, 5, 5))
    sign = VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**TINY, patch_size=8, patch_stride=4))
    with pytest.raises(ValueError, match="even SDF resolution"):
        sign(_random_shell(11, 1))
    with pytest.raises(ValueError, match="divisible by stride"):
        sign(_random_shell(24, 1), patch_stride=3)


def test_refiner_trains_on_patches():
    model = VoxelRefinerXL(VoxelRefinerXL.Config(**TINY, feature_channels=6, patch_size=8, patch_stride=8))
    sdf = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    loss = F.mse_loss(model.forward_patch(sdf, torch.randn(1, 6, 8, 8, 8)), sdf.sign())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
