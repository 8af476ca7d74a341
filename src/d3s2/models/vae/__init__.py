"""The VAEs: SS-VAE (sparse SDF ↔ sparse latent) and the dense structure VAE (64³ occupancy ↔ 8 × 16³).

Names resolve on first use (PEP 562), so importing a submodule such as ``d3s2.models.vae.cli`` to build the
``d3s2`` parser does not import torch.
"""

import importlib

_SUBMODULE_OF = {
    "DenseShapeVAE": "dense_vae", "DenseShapeVAEConfig": "dense_vae", "DenseShapeVAEOutput": "dense_vae",
    "DenseVAELossWeights": "dense_vae", "DiagonalGaussian": "distributions", "SDFLossWeights": "losses",
    "sparse_sdf_loss": "losses", "RefinedLatent": "refine", "refine_latent": "refine",
    "PackedSDFBatch": "sparse_sdf_vae", "SparseSDFBatch": "sparse_sdf_vae", "SparseSDFDecoder": "sparse_sdf_vae",
    "SparseSDFEncoder": "sparse_sdf_vae", "SparseSDFVAE": "sparse_sdf_vae", "SparseSDFVAEConfig": "sparse_sdf_vae",
    "SparseSDFVAEOutput": "sparse_sdf_vae",
}

__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name: str):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
