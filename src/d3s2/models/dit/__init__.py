"""Flow transformers: DenseDiT (structure latent) and SparseDiT (sparse latent tokens)."""

from .condition import ConditionTokens, PreparedCondition, as_condition
from .dense_dit import DenseDiT
from .sparse_dit import SparseDiT

__all__ = ["ConditionTokens", "PreparedCondition", "as_condition", "DenseDiT", "SparseDiT"]
