"""The VAEs: SS-VAE (sparse SDF ↔ sparse latent) and the dense structure VAE (64³ occupancy ↔ 8 × 16³)."""

from .dense_vae import DenseShapeVAE, DenseShapeVAEConfig, DenseShapeVAEOutput, DenseVAELossWeights
from .distributions import DiagonalGaussian
from .losses import SDFLossWeights, sparse_sdf_loss
from .refine import RefinedLatent, refine_latent
from .sparse_sdf_vae import (
    PackedSDFBatch,
    SparseSDFBatch,
    SparseSDFDecoder,
    SparseSDFEncoder,
    SparseSDFVAE,
    SparseSDFVAEConfig,
    SparseSDFVAEOutput,
)

__all__ = [
    "DenseShapeVAE", "DenseShapeVAEConfig", "DenseShapeVAEOutput", "DenseVAELossWeights", "DiagonalGaussian",
    "PackedSDFBatch", "RefinedLatent", "refine_latent",
    "SDFLossWeights", "sparse_sdf_loss", "SparseSDFBatch", "SparseSDFDecoder", "SparseSDFEncoder", "SparseSDFVAE",
    "SparseSDFVAEConfig", "SparseSDFVAEOutput",
]
