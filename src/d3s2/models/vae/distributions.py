"""The diagonal Gaussian posterior of the VAEs.

Dimension legend: N latent tokens (or B·spatial for dense latents), C latent channels.
"""

from __future__ import annotations

import torch

# Published clamp; keeps exp(logvar) finite in fp16/bf16.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """``N(mean, exp(logvar))`` per element, built from an encoder output whose channel halves are
    ``[mean | logvar]`` along ``dim``. Held in float32 whatever the encoder's (autocast) dtype, so latents
    handed to the DiT and the KL do not carry bf16 rounding.

    Args:
        params: encoder output with ``2·C`` channels along ``dim`` (``[N, 2C]`` sparse, ``[B, 2C, ...]`` dense).
        dim: the channel axis.
    """

    def __init__(self, params: torch.Tensor, dim: int = 1) -> None:
        if params.shape[dim] % 2:
            raise ValueError(f"expected an even channel count on dim {dim}, got shape {tuple(params.shape)}")
        self.mean, logvar = params.float().chunk(2, dim=dim)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std · ε`` (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I))`` averaged over all elements (fp32 scalar)."""
        return 0.5 * torch.mean(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
