"""Attention layers of the d3s2 models."""

from .ssa import SpatialSparseAttention, map_published_ssa_state_dict

__all__ = ["SpatialSparseAttention", "map_published_ssa_state_dict"]
