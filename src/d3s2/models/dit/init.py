"""Initialisation shared by the DiTs (the DiT/TRELLIS recipe)."""

from __future__ import annotations

from torch import nn


def init_dit_weights(model: nn.Module) -> None:
    """Xavier-uniform Linear weights with zero bias; timestep MLP N(0, 0.02); zero adaLN and output layers.

    The zeroed adaLN gates make every block start as the identity and the zeroed output layer makes the
    initial velocity 0, which keeps early training stable. Expects ``model.t_embedder``, ``model.blocks``
    (each with ``adaLN_modulation``) and ``model.out_layer``. A model on the ``meta`` device holds no values
    and is left alone.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)
