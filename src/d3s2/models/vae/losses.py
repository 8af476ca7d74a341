"""SS-VAE training losses (paper §3.2, eqs. 2–3).

Dimension legend: M' decoded voxels, M target voxels (every voxel of every occupied 8³ block).

``L_c = mean over V_c of (s - ŝ)²`` for ``c ∈ {in, ext, sharp}``: ``in`` = decoded band (input) voxels,
``ext`` = the other decoded voxels (target truncated to ±1), ``sharp`` = voxels near sharp edges (a subset of
the band, supervised a second time). Values are SDF / τ, so the decoder's tanh range [-1, 1] covers them.
``L = λ_in L_in + λ_ext L_ext + λ_sharp L_sharp + λ_KL KL``; an empty set contributes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import sparse as sp
from ...ops.conv.reference import lookup
from .distributions import DiagonalGaussian


@dataclass(kw_only=True)
class SDFLossWeights:
    """Paper §5.2 values."""

    in_band: float = 1.0
    ext: float = 0.1
    sharp: float = 1.0
    kl: float = 1e-3


def _masked_mse(err2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Sum / count keeps the graph (and a zero gradient) when the set is empty.
    return (err2 * mask).sum() / mask.sum().clamp(min=1)


def sparse_sdf_loss(
    decoded: sp.SparseTensor,
    target: sp.SparseTensor,
    in_band: torch.Tensor,
    sharp: torch.Tensor,
    posterior: DiagonalGaussian,
    weights: SDFLossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its detached terms.

    Args:
        decoded: ``[M', 1]`` predicted SDF / τ; may cover only part of ``target`` (chunked training).
            Decoded voxels missing from ``target`` are ignored.
        target: ``[M, 1]`` truncated SDF / τ, same resolution and batch layout as ``decoded``.
        in_band, sharp: bool ``[M]`` masks on the target rows.
        posterior: the encoder's latent distribution (for the KL term).
        weights: the λs.
    Returns:
        ``(loss, logs)``: fp32 scalar; ``logs`` holds detached ``loss, l_in, l_ext, l_sharp, kl`` and
        ``supervised`` (decoded voxels with a target).
    """
    if decoded.resolution != target.resolution:
        raise ValueError(f"decoded resolution {decoded.resolution} != target resolution {target.resolution}")
    if decoded.num_channels != 1 or target.num_channels != 1:
        raise ValueError(f"expected 1-channel decoded and target, got {decoded.num_channels}, {target.num_channels}")
    if in_band.shape != (target.num_voxels,) or sharp.shape != (target.num_voxels,):
        raise ValueError(f"expected in_band and sharp of shape [{target.num_voxels}], got "
                         f"{tuple(in_band.shape)}, {tuple(sharp.shape)}")
    row = lookup(target.coords, decoded.coords, target.resolution).long()  # [M'] target row or -1
    found = row >= 0
    safe = row.clamp(min=0)
    err2 = (decoded.feats[:, 0].float() - target.feats[safe, 0].float()).pow(2) * found  # [M']
    band = in_band[safe] & found
    ext = ~in_band[safe] & found
    sh = sharp[safe] & found
    l_in, l_ext, l_sharp = _masked_mse(err2, band), _masked_mse(err2, ext), _masked_mse(err2, sh)
    kl = posterior.kl()
    loss = weights.in_band * l_in + weights.ext * l_ext + weights.sharp * l_sharp + weights.kl * kl
    logs = {"loss": loss, "l_in": l_in, "l_ext": l_ext, "l_sharp": l_sharp, "kl": kl,
            "supervised": found.sum().float()}
    return loss, {k: v.detach() for k, v in logs.items()}
