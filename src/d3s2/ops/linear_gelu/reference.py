"""Pure-torch reference (the spec) of the DiT MLP's first layer: ``GELU_tanh(x @ Wᵀ + b)``.

Dimension legend: C in features, F out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., C]``, ``weight [F, C]``, ``bias [F]`` → ``GELU(x·Wᵀ + b)`` ``[..., F]`` (tanh approximation)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
