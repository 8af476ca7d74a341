"""Dense structure VAE (TRELLIS stage-1 analogue): 64³ occupancy ↔ 8 × 16³ latent, the first generation stage.

Dimension legend: B batch, C channels, Z latent channels, S spatial edge (64 in, 16 latent).

Encoder: Conv3d(1→c0) → per level ``num_res_blocks`` ResBlocks, then a stride-2 Conv3d(k=2) to the next
level's channels → ``num_res_blocks_middle`` ResBlocks → LayerNorm → SiLU → Conv3d(→2Z) = [mean | logvar].
Decoder: Conv3d(Z→c0) → middle ResBlocks → per level ResBlocks, then Conv3d(→8·c_next) + 3D pixel shuffle
(×2) → LayerNorm → SiLU → Conv3d(→1) occupancy logit. Parameter names follow the published ``DenseShapeVAE``
(``encoder.blocks.{i}``, ``encoder.middle_block.{i}``, ``encoder.out_layer.{0,2}``, ...), so its checkpoint
loads without renames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import DiagonalGaussian


@dataclass(kw_only=True)
class DenseVAELossWeights:
    """Occupancy BCE + soft Dice + KL (the published training recipe is not released)."""

    bce: float = 1.0
    dice: float = 1.0
    kl: float = 1e-3


@dataclass(kw_only=True)
class DenseShapeVAEConfig:
    """Defaults = the published dense VAE (193.0 M parameters)."""

    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 8  # Z, the published embed_dim
    encoder_channels: list[int] = field(default_factory=lambda: [32, 128, 512])  # per level, 64³ → 16³
    num_res_blocks_encoder: int = 2
    num_res_blocks_middle_encoder: int = 2
    decoder_channels: list[int] = field(default_factory=lambda: [512, 128, 64])  # per level, 16³ → 64³
    num_res_blocks_decoder: int = 4
    num_res_blocks_middle_decoder: int = 4
    loss: DenseVAELossWeights = field(default_factory=DenseVAELossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = DenseVAELossWeights(**self.loss)
        if len(self.encoder_channels) < 1 or len(self.decoder_channels) != len(self.encoder_channels):
            raise ValueError(f"expected as many encoder as decoder levels, got {self.encoder_channels}, "
                             f"{self.decoder_channels}")

    @property
    def downsample(self) -> int:
        """Edge ratio input / latent (4 for the published 64³ → 16³)."""
        return 2 ** (len(self.encoder_channels) - 1)


class ChannelLayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, X, Y, Z]``, computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = x.permute(0, 2, 3, 4, 1).float()
        h = F.layer_norm(h, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return h.permute(0, 4, 1, 2, 3).to(x.dtype)


class ResBlock3d(nn.Module):
    """``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``; conv2 starts at zero so each block starts as identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm3d(channels)
        self.norm2 = ChannelLayerNorm3d(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class DownsampleBlock3d(nn.Module):
    """Stride-2 ``Conv3d(k=2)``: ``[B, C_in, S]`` -> ``[B, C_out, S/2]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, C·s³, X, Y, Z]`` -> ``[B, C, sX, sY, sZ]``; input channel ``c·s³ + i·s² + j·s + k`` goes to
    sub-position (i, j, k) (the published layout)."""
    b, cs, x_, y_, z_ = x.shape
    c = cs // scale**3
    h = x.view(b, c, scale, scale, scale, x_, y_, z_)
    h = h.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, X, s, Y, s, Z, s]
    return h.reshape(b, c, x_ * scale, y_ * scale, z_ * scale)


class UpsampleBlock3d(nn.Module):
    """``Conv3d(C_in → 8·C_out, 3)`` + 3D pixel shuffle: ``[B, C_in, S]`` -> ``[B, C_out, 2S]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class DenseShapeEncoder(nn.Module):
    """``[B, 1, S, S, S]`` occupancy (in {-1, 1}) -> ``[B, 2Z, S/4, S/4, S/4]`` posterior parameters."""

    def __init__(self, cfg: DenseShapeVAEConfig) -> None:
        super().__init__()
        ch = cfg.encoder_channels
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks_encoder)]
            if i + 1 < len(ch):
                blocks.append(DownsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle_encoder)])
        self.out_layer = nn.Sequential(ChannelLayerNorm3d(ch[-1]), nn.SiLU(),
                                       nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(self.middle_block(h))


class DenseShapeDecoder(nn.Module):
    """``[B, Z, s, s, s]`` latent -> ``[B, 1, 4s, 4s, 4s]`` occupancy logits."""

    def __init__(self, cfg: DenseShapeVAEConfig) -> None:
        super().__init__()
        ch = cfg.decoder_channels
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle_decoder)])
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks_decoder)]
            if i + 1 < len(ch):
                blocks.append(UpsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(ChannelLayerNorm3d(ch[-1]), nn.SiLU(),
                                       nn.Conv3d(ch[-1], cfg.out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(z))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


@dataclass
class DenseShapeVAEOutput:
    """``logits [B, 1, S, S, S]``, the posterior and the sampled (or mode) latent ``[B, Z, S/4, S/4, S/4]``."""

    logits: torch.Tensor
    posterior: DiagonalGaussian
    latent: torch.Tensor


class DenseShapeVAE(nn.Module):
    """``out = model(occupancy)`` with occupancy ``[B, 1, S, S, S]`` in {0, 1} (bool or float), then
    ``loss, logs = model.loss(out, occupancy)``. Occupied voxels of a decode: ``sigmoid(logits) ≥ 0.1``."""

    Config = DenseShapeVAEConfig

    def __init__(self, config: DenseShapeVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DenseShapeVAEConfig()
        self.encoder = DenseShapeEncoder(self.config)
        self.decoder = DenseShapeDecoder(self.config)

    def _check(self, occupancy: torch.Tensor) -> None:
        f = self.config.downsample
        if occupancy.ndim != 5 or occupancy.shape[1] != self.config.in_channels or occupancy.shape[2] % f:
            raise ValueError(f"expected occupancy [B, {self.config.in_channels}, S, S, S] with S divisible by {f}, "
                             f"got {tuple(occupancy.shape)}")

    def encode(self, occupancy: torch.Tensor, *, sample_posterior: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """``[B, 1, S, S, S]`` in {0, 1} -> (latent ``[B, Z, S/4, S/4, S/4]``, posterior)."""
        self._check(occupancy)
        x = occupancy.to(self.encoder.input_layer.weight.dtype) * 2 - 1  # published input scaling
        posterior = DiagonalGaussian(self.encoder(x), dim=1)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z, posterior

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, Z, s, s, s]`` -> occupancy logits ``[B, 1, 4s, 4s, 4s]``."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latent [B, {self.config.latent_channels}, s, s, s], got {tuple(z.shape)}")
        return self.decoder(z)

    @staticmethod
    def occupied_coords(logits: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
        """int32 ``[K, 4]`` (b, x, y, z) of voxels with ``sigmoid(logit) ≥ threshold`` (the sparse stage's tokens)."""
        return torch.nonzero(torch.sigmoid(logits[:, 0].float()) >= threshold).to(torch.int32)

    def forward(self, occupancy: torch.Tensor) -> DenseShapeVAEOutput:
        z, posterior = self.encode(occupancy, sample_posterior=self.training)
        return DenseShapeVAEOutput(self.decode(z), posterior, z)

    def loss(self, out: DenseShapeVAEOutput, occupancy: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``λ_bce BCE + λ_dice (1 - soft Dice) + λ_kl KL``; returns ``(loss, detached logs)``."""
        w = self.config.loss
        target = occupancy.float()
        logits = out.logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        kl = out.posterior.kl()
        loss = w.bce * bce + w.dice * dice + w.kl * kl
        logs = {"loss": loss, "bce": bce, "dice": dice, "kl": kl}
        return loss, {k: v.detach() for k, v in logs.items()}
