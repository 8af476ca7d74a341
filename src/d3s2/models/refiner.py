"""Dense 3D U-Net refiners applied after the sparse SDF decoder (the published 512³ / 1024³ pipeline).

Dimension legend: B batch, C channels, P patch side, R side of the dense grid the U-Net sees, N sparse voxels.

- :class:`VoxelRefinerXL` (published ``Voxel_RefinerXL``, ``model_refiner.ckpt``): refines the decoded 512³ SDF.
  Per patch: ``conv_in`` on the SDF (+1 where no voxel was decoded) and ``latent_mlp`` on the decoder's
  32-channel features (zero where no voxel) → concat → U-Net → three per-voxel "adaptive" 3³ filters (27
  predicted weights, L1-normalised, applied 3×) around ``mid_conv`` and ``conv_out`` → tanh. Overlapping
  patches are blended with linear ramps.
- :class:`VoxelRefinerXLSign` (published ``Voxel_RefinerXL_sign``, ``model_refiner_1024.ckpt``): predicts the
  inside/outside sign of the 1024³ SDF on a 512³ grid (mean-pooled ×2), so empty interior space gets −1
  instead of the decoder's +1 background, which removes interior shells. Later patches overwrite earlier ones.

Parameter names mirror the published checkpoints (``unet3d1.down_blocks.0.resnets.0.conv1.weight`` …), so
they load without renames. The grid side comes from the input; patch size and stride are configurable (a
smaller patch needs less memory but changes the result slightly: GroupNorm statistics are per patch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse import SparseTensor, sparse_downsample

# Offsets of the adaptive 3³ filter in weight order: index 9·(dx+1) + 3·(dy+1) + (dz+1), z fastest (NOT the
# torchsparse order, x fastest, of the sparse convs).
ADAPTIVE_OFFSETS = tuple(itertools.product((-1, 0, 1), repeat=3))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (statistics over large fp16 grids lose precision), output in input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResnetBlock3D(nn.Module):
    """``x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``, with a 1×1×1 ``conv_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _Resample(nn.Module):
    """Holds the stride-2, 2³ ``conv`` (``nn.Conv3d`` down, ``nn.ConvTranspose3d`` up) under the published name."""

    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        self.conv = (nn.ConvTranspose3d if up else nn.Conv3d)(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, downsample: bool, groups: int,
                 eps: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([_Resample(out_channels, up=False)]) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock3D(nn.Module):
    """Each resnet first concatenates ``[x, skip]`` (skips popped from the end of the encoder's list)."""

    def __init__(self, in_channels: int, skip_channels: list[int], out_channels: int, upsample: bool, groups: int,
                 eps: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock3D((in_channels if i == 0 else out_channels) + s, out_channels, groups, eps)
            for i, s in enumerate(skip_channels)
        ])
        self.upsamplers = nn.ModuleList([_Resample(out_channels, up=True)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1))
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, layers: int, groups: int, eps: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, groups, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UNet3D(nn.Module):
    """3D U-Net ``[B, Cin, P, P, P] → [B, C0, P, P, P]`` (P divisible by 2^(levels-1)).

    ``conv_in`` → down blocks (``layers_per_block`` resnets each, a stride-2 conv on all but the last) →
    mid block (``layers_mid_block + 1`` resnets) → up blocks (``layers_per_block + 1`` resnets each, a
    transposed stride-2 conv on all but the last) → ``conv_norm_out`` (GroupNorm) + SiLU. No output conv.
    """

    def __init__(self, in_channels: int, block_channels: list[int], layers_per_block: int, layers_mid_block: int,
                 groups: int, eps: float) -> None:
        super().__init__()
        ch = list(block_channels)
        self.conv_in = nn.Conv3d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: the published key order
        skip_channels = [ch[0]]  # channels of every tensor the encoder stacks for the decoder, in order
        prev = ch[0]
        for i, c in enumerate(ch):
            last = i == len(ch) - 1
            self.down_blocks.append(DownBlock3D(prev, c, layers_per_block, not last, groups, eps))
            skip_channels += [c] * (layers_per_block + (0 if last else 1))
            prev = c
        self.mid_block = MidBlock3D(ch[-1], layers_mid_block + 1, groups, eps)
        for i, c in enumerate(reversed(ch)):
            n = layers_per_block + 1
            taken, skip_channels = skip_channels[-n:], skip_channels[:-n]
            self.up_blocks.append(UpBlock3D(prev, taken[::-1], c, i < len(ch) - 1, groups, eps))
            prev = c
        self.conv_norm_out = GroupNorm32(groups, ch[0], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.down_blocks) - 1)
        if x.ndim != 5 or any(s % factor for s in x.shape[2:]):
            raise ValueError(f"expected [B, C, P, P, P] with P divisible by {factor}, got {tuple(x.shape)}")
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x)
            skips += s
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return F.silu(self.conv_norm_out(x))


class LatentMLP(nn.Module):
    """Per-voxel MLP on the decoder features: ``net`` = Linear(Cf→H), ReLU, (Linear(H→H), ReLU) × 2, Linear(H→C0)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, layers: int = 4) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(in_channels, hidden), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, out_channels))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _adaptive_weights_net(channels: int) -> nn.Sequential:
    # Published ``adaptive_conv{1,2,3}``: Conv(C→C) + ReLU + Conv(C→27, no bias).
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(channels, len(ADAPTIVE_OFFSETS), 3, padding=1, bias=False))


def adaptive_filter(x: torch.Tensor, weights: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Per-voxel 3³ filtering with predicted weights, repeated ``iterations`` times.

    Args:
        x: ``[B, C, X, Y, Z]``.
        weights: ``[B, 27, X, Y, Z]`` raw weights; L1-normalised over the 27 first. Entry
            ``9·(dx+1) + 3·(dy+1) + (dz+1)`` multiplies ``x`` at ``p + (dx, dy, dz)`` (zero outside the grid),
            the same weight for every channel.
    Returns:
        ``[B, C, X, Y, Z]``.
    """
    if weights.shape[1] != len(ADAPTIVE_OFFSETS) or weights.shape[2:] != x.shape[2:]:
        raise ValueError(f"expected weights [B, 27, {', '.join(map(str, x.shape[2:]))}], got {tuple(weights.shape)}")
    w = F.normalize(weights, p=1, dim=1)
    sx, sy, sz = x.shape[2:]
    for _ in range(iterations):
        xp = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(x)
        for k, (dx, dy, dz) in enumerate(ADAPTIVE_OFFSETS):
            out += xp[:, :, 1 + dx:1 + dx + sx, 1 + dy:1 + dy + sy, 1 + dz:1 + dz + sz] * w[:, k:k + 1]
        x = out
    return x


def patch_starts(resolution: int, patch_size: int, stride: int) -> list[int]:
    """Start of each patch along one axis; the patches tile ``[0, resolution)`` exactly."""
    if not 0 < stride <= patch_size <= resolution or (resolution - patch_size) % stride:
        raise ValueError(f"expected 0 < stride <= patch_size <= resolution with (resolution - patch_size) "
                         f"divisible by stride, got resolution {resolution}, patch_size {patch_size}, stride {stride}")
    return list(range(0, resolution - patch_size + 1, stride))


def blend_weights(resolution: int, patch_size: int, stride: int, mode: str,
                  device: torch.device | None = None) -> list[torch.Tensor]:
    """float32 ``[P]`` weight of each patch along one axis (a partition of unity over the axis).

    ``"linear"``: ramps ``linspace(0, 1, overlap)`` up at a patch's start and down at its end where it overlaps
    a neighbour (needs overlap ≤ stride, so at most two patches meet). ``"last"``: every voxel belongs to
    the last patch that covers it (patches written in order, each overwriting the previous).
    """
    starts = patch_starts(resolution, patch_size, stride)
    overlap = patch_size - stride
    out = []
    for i, _ in enumerate(starts):
        w = torch.ones(patch_size, device=device)
        if mode == "linear":
            if overlap > stride:
                raise ValueError(f"linear blending needs overlap <= stride, got patch_size {patch_size}, "
                                 f"stride {stride}")
            ramp = torch.linspace(0, 1, overlap, device=device)
            if i > 0:
                w[:overlap] = ramp
            if i < len(starts) - 1:
                w[patch_size - overlap:] = 1 - ramp
        elif mode == "last":
            if i < len(starts) - 1:
                w[stride:] = 0
        else:
            raise ValueError(f"expected mode 'linear' or 'last', got {mode!r}")
        out.append(w)
    return out


def _check_sdf(x: SparseTensor, channels: int) -> None:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"expected the SDF as a SparseTensor, got {type(x).__name__}")
    if x.num_channels != channels:
        raise ValueError(f"expected an SDF with {channels} channel(s), got {x.num_channels}")


def _patch_voxels(coords: torch.Tensor, start: tuple[int, int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the voxels inside the patch at ``start`` and their (b, x, y, z) patch-local coords."""
    lo = torch.tensor(start, device=coords.device, dtype=coords.dtype)
    local = coords[:, 1:] - lo
    rows = ((local >= 0) & (local < size)).all(1).nonzero().squeeze(1)
    return rows, torch.cat([coords[rows, :1], local[rows]], 1).long()


def _scatter(grid: torch.Tensor, local: torch.Tensor, values: torch.Tensor) -> None:
    """``grid[b, :, x, y, z] = values`` for the rows of ``local`` (b, x, y, z); grid ``[B, C, P, P, P]``."""
    grid[local[:, 0], :, local[:, 1], local[:, 2], local[:, 3]] = values.to(grid.dtype)


class VoxelRefinerXL(nn.Module):
    """Refines a decoded sparse SDF on a dense grid, patch by patch (published ``Voxel_RefinerXL``)."""

    @dataclass(kw_only=True)
    class Config:
        in_channels: int = 1  # SDF channels
        out_channels: int = 1
        feature_channels: int = 32  # decoder features per voxel (the SS-VAE's pre-head width)
        feature_hidden: int = 32  # latent_mlp width
        block_channels: list[int] = field(default_factory=lambda: [8, 32, 128, 512])  # U-Net widths, C0 first
        layers_per_block: int = 2
        layers_mid_block: int = 2
        norm_groups: int = 4
        norm_eps: float = 1e-5
        adaptive_iterations: int = 3  # applications of each predicted 3³ filter
        patch_size: int = 192  # a multiple of 2^(levels-1); the published grid is 512³
        patch_stride: int = 160  # published: 3 patches per axis with 32-voxel linear overlaps

    def __init__(self, config: Config | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or self.Config()
        if overrides:
            cfg = self.Config(**{**asdict(cfg), **overrides})
        self.config = cfg
        c0 = cfg.block_channels[0]
        self.unet3d1 = UNet3D(2 * c0, cfg.block_channels, cfg.layers_per_block, cfg.layers_mid_block,
                              cfg.norm_groups, cfg.norm_eps)
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.latent_mlp = LatentMLP(cfg.feature_channels, cfg.feature_hidden, c0)
        self.adaptive_conv1 = _adaptive_weights_net(c0)
        self.adaptive_conv2 = _adaptive_weights_net(c0)
        self.adaptive_conv3 = _adaptive_weights_net(c0)
        self.mid_conv = nn.Conv3d(c0, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def refine_patch(self, sdf: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """tanh output ``[B, Cout, P, P, P]`` from the SDF ``[B, Cin, P, P, P]`` and ``latent_mlp`` output
        ``[B, C0, P, P, P]``."""
        n = self.config.adaptive_iterations
        h = self.unet3d1(torch.cat([self.conv_in(sdf), latent], dim=1))
        h = adaptive_filter(h, self.adaptive_conv1(h), n)
        h = self.mid_conv(h)
        h = adaptive_filter(h, self.adaptive_conv2(h), n)
        out = adaptive_filter(self.conv_out(h), self.adaptive_conv3(h), n)
        return torch.tanh(out)

    def forward_patch(self, sdf: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """One dense patch: SDF ``[B, Cin, P, P, P]`` and features ``[B, Cf, P, P, P]`` → ``[B, Cout, P, P, P]``."""
        latent = self.latent_mlp(feats.movedim(1, -1)).movedim(-1, 1)
        return self.refine_patch(sdf, latent)

    def _patches(self, sdf: SparseTensor, feats: torch.Tensor | SparseTensor, patch_size: int | None,
                 patch_stride: int | None, skip_empty: bool
                 ) -> Iterator[tuple[tuple[int, int, int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per patch: (start, rows of its voxels, their (b, x, y, z) patch-local coords, blend weight ``[P, P, P]``,
        refined ``[B, Cout, P, P, P]``). ``skip_empty``: patches holding no voxel are not run."""
        cfg = self.config
        _check_sdf(sdf, cfg.in_channels)
        f = feats.feats if isinstance(feats, SparseTensor) else feats
        if f.shape != (sdf.num_voxels, cfg.feature_channels):
            raise ValueError(f"expected feats [{sdf.num_voxels}, {cfg.feature_channels}], got {tuple(f.shape)}")
        p, stride = patch_size or cfg.patch_size, patch_stride or cfg.patch_stride
        dtype, b, r = self.dtype, sdf.batch_size, sdf.resolution
        starts = patch_starts(r, p, stride)
        weights = blend_weights(r, p, stride, "linear", device=sdf.device)
        # latent_mlp is per voxel: apply it to the N decoded voxels and once to the zero feature of empty space
        # instead of to a dense [B, Cf, R, R, R] grid (8.6 GB in fp16 at 512³).
        latent = self.latent_mlp(f.to(dtype))  # [N, C0]
        background = self.latent_mlp(f.new_zeros(1, cfg.feature_channels, dtype=dtype))[0]  # [C0]
        for (i, sx), (j, sy), (k, sz) in itertools.product(enumerate(starts), repeat=3):
            rows, local = _patch_voxels(sdf.coords, (sx, sy, sz), p)
            if skip_empty and rows.numel() == 0:
                continue
            sdf_p = torch.ones(b, cfg.in_channels, p, p, p, device=sdf.device, dtype=dtype)
            _scatter(sdf_p, local, sdf.feats[rows])
            lat_p = background.view(1, -1, 1, 1, 1).expand(b, -1, p, p, p).contiguous()
            _scatter(lat_p, local, latent[rows])
            w = weights[i][:, None, None] * weights[j][None, :, None] * weights[k][None, None, :]
            yield (sx, sy, sz), rows, local, w, self.refine_patch(sdf_p, lat_p)

    def forward(self, sdf: SparseTensor, feats: torch.Tensor | SparseTensor, *, patch_size: int | None = None,
                patch_stride: int | None = None) -> torch.Tensor:
        """Refined dense SDF, float32 ``[B, Cout, R, R, R]``.

        Args:
            sdf: decoded SDF, feats ``[N, Cin]`` at resolution R; empty voxels count as +1 (outside).
            feats: decoder features ``[N, Cf]`` of the same voxels (a tensor, or a SparseTensor with the same
                coords); empty voxels count as zero features.
            patch_size / patch_stride: override the config's tiling.
        """
        p = patch_size or self.config.patch_size
        r = sdf.resolution
        out = torch.zeros(sdf.batch_size, self.config.out_channels, r, r, r, device=sdf.device)
        for (sx, sy, sz), _, _, w, refined in self._patches(sdf, feats, patch_size, patch_stride, False):
            out[:, :, sx:sx + p, sy:sy + p, sz:sz + p] += refined.float() * w
        return out

    def refine_voxels(self, sdf: SparseTensor, feats: torch.Tensor | SparseTensor, *,
                      patch_size: int | None = None, patch_stride: int | None = None) -> torch.Tensor:
        """The refined values at ``sdf``'s own voxels, float32 ``[N, Cout]``: :meth:`forward` gathered at
        ``sdf.coords``, without the dense output grid and skipping patches that hold no voxel (a voxel's value
        only depends on the patches that contain it)."""
        out = torch.zeros(sdf.num_voxels, self.config.out_channels, device=sdf.device)
        for _, rows, local, w, refined in self._patches(sdf, feats, patch_size, patch_stride, True):
            b, x, y, z = local.unbind(1)
            out.index_add_(0, rows, refined[b, :, x, y, z].float() * w[x, y, z, None])
        return out


class VoxelRefinerXLSign(nn.Module):
    """Inside/outside sign of a 2R³ sparse SDF, predicted on an R³ grid (published ``Voxel_RefinerXL_sign``)."""

    @dataclass(kw_only=True)
    class Config:
        in_channels: int = 1
        out_channels: int = 1
        block_channels: list[int] = field(default_factory=lambda: [8, 32, 128, 512])
        layers_per_block: int = 2
        layers_mid_block: int = 2
        norm_groups: int = 4
        norm_eps: float = 1e-5
        patch_size: int = 256  # on the ×2 pooled grid (published: 512³ from the 1024³ SDF)
        patch_stride: int = 128  # published: 3 patches per axis, later patches overwrite overlaps

    def __init__(self, config: Config | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or self.Config()
        if overrides:
            cfg = self.Config(**{**asdict(cfg), **overrides})
        self.config = cfg
        c0 = cfg.block_channels[0]
        self.unet3d1 = UNet3D(c0, cfg.block_channels, cfg.layers_per_block, cfg.layers_mid_block, cfg.norm_groups,
                              cfg.norm_eps)
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward_patch(self, sdf: torch.Tensor) -> torch.Tensor:
        """Sign logits ``[B, Cout, P, P, P]`` (> 0 outside) of a dense SDF patch ``[B, Cin, P, P, P]``."""
        return self.conv_out(self.unet3d1(self.conv_in(sdf)))

    def predict_outside(self, sdf: SparseTensor, *, patch_size: int | None = None,
                        patch_stride: int | None = None) -> torch.Tensor:
        """bool ``[B, R, R, R]``: True where the ×2 pooled voxel is outside (sigmoid ≥ 0.5).

        ``sdf``: feats ``[N, 1]`` at resolution 2R, mean-pooled ×2 first; empty voxels count as +1.
        """
        cfg = self.config
        _check_sdf(sdf, cfg.in_channels)
        if sdf.resolution % 2:
            raise ValueError(f"expected an even SDF resolution, got {sdf.resolution}")
        sdf = sparse_downsample(sdf, 2)
        p, stride = patch_size or cfg.patch_size, patch_stride or cfg.patch_stride
        b, dtype, r = sdf.batch_size, self.dtype, sdf.resolution
        outside = torch.ones(b, r, r, r, dtype=torch.bool, device=sdf.device)
        starts = patch_starts(r, p, stride)
        keep = [int(w.sum()) for w in blend_weights(r, p, stride, "last")]  # owned prefix per patch
        for (i, sx), (j, sy), (k, sz) in itertools.product(enumerate(starts), repeat=3):
            rows, local = _patch_voxels(sdf.coords, (sx, sy, sz), p)
            sdf_p = torch.ones(b, cfg.in_channels, p, p, p, device=sdf.device, dtype=dtype)
            _scatter(sdf_p, local, sdf.feats[rows])
            pos = torch.sigmoid(self.forward_patch(sdf_p))[:, 0] >= 0.5  # [B, P, P, P]
            ki, kj, kk = keep[i], keep[j], keep[k]
            outside[:, sx:sx + ki, sy:sy + kj, sz:sz + kk] = pos[:, :ki, :kj, :kk]
        return outside

    def forward(self, sdf: SparseTensor, *, patch_size: int | None = None,
                patch_stride: int | None = None) -> torch.Tensor:
        """Dense signed SDF ``[B, 1, 2R, 2R, 2R]`` (dtype of ``sdf``): ±1 from the predicted sign (upsampled ×2)
        away from the decoded voxels, the decoded values at them."""
        outside = self.predict_outside(sdf, patch_size=patch_size, patch_stride=patch_stride)
        grid = torch.where(outside, 1.0, -1.0).to(sdf.dtype)  # [B, R, R, R]
        grid = grid.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, None]
        c = sdf.coords.long()
        grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = sdf.feats
        return grid
