"""Shared fixtures for the VAE tests: the tiny config and an analytic sphere SDF batch."""

from __future__ import annotations

import torch

from d3s2 import sparse as sp
from d3s2.models.vae import PackedSDFBatch, SparseSDFBatch, SparseSDFVAEConfig


def tiny_config(**overrides) -> SparseSDFVAEConfig:
    """Same values as configs/debug/tiny_vae.yaml."""
    args = dict(latent_channels=8, model_channels=32, num_blocks=2, num_heads=2, window_size=8, mlp_ratio=2.0,
                down_channels=[8, 16, 16], up_channels=[16, 8, 8], num_groups=4)
    args.update(overrides)
    return SparseSDFVAEConfig(**args)


def sphere_sdf(coords: torch.Tensor, resolution: int, radius: float, tau: float,
               centre: tuple[float, float, float] | None = None) -> torch.Tensor:
    """SDF / τ of a sphere at voxel centres (voxel units), ``coords [n, 3]`` -> ``[n]``."""
    c = torch.tensor(centre if centre is not None else (resolution / 2,) * 3)
    return (torch.linalg.norm(coords.float() + 0.5 - c, dim=1) - radius) / tau


def sphere_sample(resolution: int, radius: float, tau: float = 2.0, centre=None, window=None):
    """(band coords [n, 3], band sdf [n], block coords [nb, 3], block sdf [nb, 512]) of one sphere; ``window =
    (lo, hi)`` searches the band in that cube of the grid only (a small sphere in a large grid)."""
    r = resolution
    lo, hi = window if window is not None else (0, r)
    grid = torch.stack(torch.meshgrid(*[torch.arange(lo, hi)] * 3, indexing="ij"), -1).reshape(-1, 3)
    s = sphere_sdf(grid, r, radius, tau, centre)
    band = s.abs() < 1
    coords, sdf = grid[band], s[band]
    blocks = torch.unique(coords // 8, dim=0)
    local = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    fine = (blocks[:, None] * 8 + local).reshape(-1, 3)
    block_sdf = sphere_sdf(fine, r, radius, tau, centre).clamp(-1, 1).reshape(-1, 512)
    return coords, sdf, blocks, block_sdf


def sphere_batch(resolution: int = 16, radii=(5.0,), tau: float = 2.0, sharp_every: int = 0,
                 packed: bool = False) -> SparseSDFBatch | PackedSDFBatch:
    """Spheres as a full batch, or ``packed`` as the DataLoader workers hand it over."""
    samples = [sphere_sample(resolution, r, tau) for r in radii]
    sharp = None
    if sharp_every:
        sharp = [torch.arange(s[0].shape[0]) % sharp_every == 0 for s in samples]
    make = PackedSDFBatch.from_samples if packed else SparseSDFBatch.from_samples
    return make([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples], [s[3] for s in samples],
                resolution=resolution, sharp=sharp)


def with_inside_bits(batch: PackedSDFBatch) -> PackedSDFBatch:
    """``batch`` (of :func:`sphere_batch`, ``packed``: targets outside the band are exactly ±1 at τ = 1) with its
    block targets as inside bits, the layout the ``vae`` training task collates."""
    from d3s2.geometry.sdf import pack_bits

    values = batch.blocks.feats
    blocks = batch.blocks.replace(values.new_zeros(values.shape[0], 0))
    raw = batch.sdf.replace(batch.sdf.feats * batch.tau)
    return PackedSDFBatch.from_inside_bits(raw, blocks, batch.rows, pack_bits(values < 0),
                                           torch.ones(batch.sdf.batch_size), sharp=batch.sharp, tau=batch.tau)


def random_latent(num_per_sample, resolution: int, channels: int, seed: int = 0, box=None) -> sp.SparseTensor:
    """Random sparse latent: distinct random voxels per sample (inside ``box = (lo, hi)`` if given), normal feats."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = box if box is not None else (0, resolution)
    e = hi - lo
    coords, feats = [], []
    for n in num_per_sample:
        idx = torch.randperm(e**3, generator=g)[:n]
        c = torch.stack([idx // e**2, (idx // e) % e, idx % e], 1) + lo
        coords.append(c)
        feats.append(torch.randn(n, channels, generator=g))
    return sp.SparseTensor.from_samples(coords, feats, resolution=resolution)
