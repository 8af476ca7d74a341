"""Rectified-flow training: timestep sampling, the forward process and the CFM loss.

The forward process is ``x_t = (1 - t) x0 + t ε`` with t in [0, 1] (t = 1 is pure noise) and the model is
trained to predict the velocity ``ε - x0`` (paper eq. 10-11). Models receive ``t * num_train_timesteps``
(the published models see t on a 0-1000 scale). Everything here works on dense tensors ``[B, ...]`` and on
:class:`~d3s2.sparse.SparseTensor` latents (the operations act on ``feats``, one t per sample).
"""

from __future__ import annotations

import torch

from ..sparse import SparseTensor

Latent = torch.Tensor | SparseTensor

NUM_TRAIN_TIMESTEPS = 1000


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``t' = shift·t / (1 + (shift - 1)·t)``; shift > 1 moves mass towards noise (t = 1)."""
    if shift <= 0:
        raise ValueError(f"expected a positive shift, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch_size: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logit-normal t = sigmoid(N(mean, std²)), then :func:`shift_timesteps`. Returns float32 ``[B]`` in (0, 1)."""
    if batch_size <= 0:
        raise ValueError(f"expected a positive batch size, got {batch_size}")
    if std <= 0:
        raise ValueError(f"expected a positive std, got {std}")
    # Drawn on the CPU generator so a seed gives the same t on every device.
    z = torch.randn(batch_size, generator=generator, dtype=torch.float32) * std + mean
    return shift_timesteps(torch.sigmoid(z), shift).to(device)


def _per_row(t: torch.Tensor, x: Latent) -> torch.Tensor:
    """Broadcast per-sample ``t [B]`` against the data: ``[B, 1, ...]`` dense or ``[N, 1]`` sparse."""
    if isinstance(x, SparseTensor):
        if t.shape != (x.batch_size,):
            raise ValueError(f"expected t of shape [{x.batch_size}], got {tuple(t.shape)}")
        return t.to(x.feats)[x.batch_index][:, None]
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t.to(x).view(-1, *([1] * (x.ndim - 1)))


def _feats(x: Latent) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x: Latent, values: torch.Tensor) -> Latent:
    return x.replace(values) if isinstance(x, SparseTensor) else values


def randn_like_latent(x: Latent, generator: torch.Generator | None = None) -> Latent:
    """Standard normal noise with the shape (and sparse structure) of ``x``, drawn on the CPU for reproducibility."""
    f = _feats(x)
    noise = torch.randn(f.shape, generator=generator, dtype=torch.float32).to(device=f.device, dtype=f.dtype)
    return _like(x, noise)


def interpolate(x0: Latent, noise: Latent, t: torch.Tensor) -> Latent:
    """Forward process ``x_t = (1 - t)·x0 + t·noise`` with one ``t`` per sample (``t [B]``)."""
    tt = _per_row(t, x0)
    return _like(x0, (1 - tt) * _feats(x0) + tt * _feats(noise))


def velocity_target(x0: Latent, noise: Latent) -> Latent:
    """The rectified-flow velocity ``noise - x0`` (d x_t / d t)."""
    return _like(x0, _feats(noise) - _feats(x0))


def cfm_loss(pred: Latent, x0: Latent, noise: Latent) -> torch.Tensor:
    """Conditional flow matching loss: mean squared error between ``pred`` and ``noise - x0`` (scalar).

    For sparse latents the mean runs over all tokens of the batch, so larger shapes weigh more, as in the
    published TRELLIS-style trainers.
    """
    p, target = _feats(pred), _feats(velocity_target(x0, noise))
    if p.shape != target.shape:
        raise ValueError(f"expected a prediction of shape {tuple(target.shape)}, got {tuple(p.shape)}")
    return torch.mean((p.float() - target.float()) ** 2)


def model_timesteps(t: torch.Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The timestep the model sees: ``t * num_train_timesteps`` (0-1000 for the published models)."""
    return t * num_train_timesteps
