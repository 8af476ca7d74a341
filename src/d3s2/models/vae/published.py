"""Key mapping between the published Direct3D-S2 VAE checkpoints and d3s2's modules.

Published ``SparseSDFVAE`` (``model_sparse_{512,1024}.ckpt["vae"]``) → :class:`SparseSDFVAE`:

============================================  ==========================================  =====================
published key                                 d3s2 key                                    value
============================================  ==========================================  =====================
``<m>.conv.kernel`` ``[27, C_in, C_out]``     ``<m>.weight`` ``[27, C_in, C_out]``        unchanged (same
                                                                                          torchsparse offset
                                                                                          order, x fastest)
``<m>.conv.kernel`` ``[C_in, C_out]`` (1×1)   ``<m>.weight`` ``[1, C_in, C_out]``         ``unsqueeze(0)``
``<m>.conv.bias``                             ``<m>.bias``                                unchanged
every other key                               the same key                                unchanged
============================================  ==========================================  =====================

The sparse convolutions are ``encoder.downsample.{i}.{out_layers.0, out_layers.3, skip_connection}`` and
``decoder.upsample.{i}.{act_layers.0, out_layers.0}``. The published ``DenseShapeVAE``
(``model_dense.ckpt["vae"]``) loads into :class:`DenseShapeVAE` with no renames. Checkpoints may hold fp16
weights; ``load_state_dict`` casts them to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_KERNEL, _BIAS = ".conv.kernel", ".conv.bias"


def sparse_vae_from_published(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published SS-VAE state dict -> :class:`~d3s2.models.vae.SparseSDFVAE` state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_KERNEL):
            out[key[: -len(_KERNEL)] + ".weight"] = value.unsqueeze(0) if value.ndim == 2 else value
        elif key.endswith(_BIAS):
            out[key[: -len(_BIAS)] + ".bias"] = value
        else:
            out[key] = value
    return out


def sparse_vae_to_published(state_dict: Mapping[str, torch.Tensor],
                            conv_modules: set[str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`sparse_vae_from_published`; ``conv_modules`` names the sparse-conv modules
    (see :func:`sparse_conv_module_names`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module in conv_modules and leaf == "weight":
            out[module + _KERNEL] = value[0] if value.shape[0] == 1 else value
        elif module in conv_modules and leaf == "bias":
            out[module + _BIAS] = value
        else:
            out[key] = value
    return out


def sparse_conv_module_names(model: torch.nn.Module) -> set[str]:
    """Qualified names of the :class:`~d3s2.sparse.SparseConv3d` modules of ``model``."""
    from ...sparse import SparseConv3d

    return {name for name, m in model.named_modules() if isinstance(m, SparseConv3d)}
