"""Fixed sinusoidal embeddings shared by the VAEs and DiTs: 3D absolute positions and diffusion timesteps.

Dimension legend: N tokens, D spatial dims (3), C channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_position_embedding(coords: torch.Tensor, channels: int, *, factor: float = 1.0) -> torch.Tensor:
    """Absolute sinusoidal embedding of integer positions, laid out as the published models expect.

    Per axis ``freq_dim = channels // D // 2`` frequencies ``1 / 10000^(i / freq_dim)``; the axis block is
    ``[sin(p·f) | cos(p·f)]`` with ``p = coord · factor``; the blocks of x, y, z are concatenated and the
    result is zero-padded up to ``channels``. (For the published dense DiT, C = 1024: 170 frequencies,
    1020 live channels, 4 zero channels.)

    Args:
        coords: ``[N, D]`` positions (any numeric dtype).
        channels: C.
        factor: multiplies the coordinates first (0.5 lets a 128³ latent grid reuse a 64³-trained range).
    Returns:
        float32 ``[N, C]``.
    """
    if coords.ndim != 2:
        raise ValueError(f"expected coords of shape [N, D], got {tuple(coords.shape)}")
    n, d = coords.shape
    freq_dim = channels // d // 2
    if freq_dim < 1:
        raise ValueError(f"expected channels >= {2 * d} for {d}-D positions, got {channels}")
    freqs = 1.0 / 10000.0 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim)
    pos = coords.to(torch.float32) * factor
    angles = pos[:, :, None] * freqs  # [N, D, F]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=2).reshape(n, d * 2 * freq_dim)  # [N, D·2F]
    if emb.shape[1] < channels:
        emb = torch.cat([emb, emb.new_zeros(n, channels - emb.shape[1])], dim=1)
    return emb


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal 3D APE on integer voxel coordinates (no parameters, nothing in the state dict).

    ``forward(coords [N, 3]) -> float32 [N, C]``; see :func:`sincos_position_embedding` for the layout.
    """

    def __init__(self, channels: int, in_channels: int = 3, *, factor: float = 1.0) -> None:
        super().__init__()
        if channels // in_channels // 2 < 1:
            raise ValueError(f"expected channels >= {2 * in_channels}, got {channels}")
        self.channels, self.in_channels, self.factor = channels, in_channels, factor

    def forward(self, coords: torch.Tensor, *, factor: float | None = None) -> torch.Tensor:
        if coords.ndim != 2 or coords.shape[1] != self.in_channels:
            raise ValueError(f"expected coords of shape [N, {self.in_channels}], got {tuple(coords.shape)}")
        return sincos_position_embedding(coords, self.channels, factor=self.factor if factor is None else factor)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, in_channels={self.in_channels}, factor={self.factor}"


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features ``[cos(t·f) | sin(t·f)]``, ``f_i = max_period^(-i / (dim/2))``.

    Args:
        t: ``[B]`` timesteps on the 0–1000 scale (fractional values allowed).
    Returns:
        float32 ``[B, dim]`` (an odd ``dim`` gets one trailing zero channel).
    """
    if t.ndim != 1:
        raise ValueError(f"expected t of shape [B], got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, C]``: 256-d sinusoid, then ``Linear(256→C) → SiLU → Linear(C→C)`` (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_embedding_size, self.max_period = frequency_embedding_size, max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))
