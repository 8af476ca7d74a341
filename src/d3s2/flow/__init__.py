"""Rectified flow outside the models: training targets and losses, and the Euler + CFG sampler."""

from .sampler import euler_sigmas, sample_euler
from .training import (
    NUM_TRAIN_TIMESTEPS,
    cfm_loss,
    interpolate,
    model_timesteps,
    randn_like_latent,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "cfm_loss", "interpolate", "model_timesteps", "randn_like_latent", "sample_timesteps",
    "shift_timesteps", "velocity_target", "euler_sigmas", "sample_euler",
]
