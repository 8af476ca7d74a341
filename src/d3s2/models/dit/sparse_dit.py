"""SparseDiT (SS-DiT): the flow transformer over sparse latent tokens (published: 16 channels at 64³ / 128³).

Dimension legend: N tokens (all samples), B batch, C width, Cin/Cout latent channels, L condition tokens,
Cc condition channels, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...sparse import SparseTensor
from ..embeddings import AbsolutePositionEmbedder, TimestepEmbedder
from .blocks import ModulatedCrossBlock, SparseFullAttention, layer_norm32
from .condition import ConditionTokens, PreparedCondition, as_condition, unpack_condition
from .init import init_dit_weights


class SparseDiT(nn.Module):
    """Rectified-flow velocity model on a SparseTensor latent, cross-attending to image tokens.

    Layout (published ``SparseDiT``): ``input_layer`` Linear(Cin→C) + sinusoidal 3D APE of
    ``coords · pe_factor``; ``num_blocks`` :class:`ModulatedCrossBlock` whose self-attention is Spatial Sparse
    Attention (``attention="ssa"``) or full per-sample attention (``"full"``, same projection names); a
    parameter-free LayerNorm; ``out_layer`` Linear(C→Cout). With ``sparse_conditions`` (v1.0) the condition
    tokens first pass ``cond_proj`` Linear(Cc→Cc) plus a 3D APE of their coords.
    """

    @dataclass(kw_only=True)
    class Config:
        resolution: int = 64  # latent grid side (64 for 512³ meshes, 128 for 1024³)
        in_channels: int = 16
        out_channels: int = 16
        model_channels: int = 1024  # width C
        cond_channels: int = 1024  # image-token width Cc
        num_blocks: int = 24
        num_heads: int = 32  # query heads H; head dim = C / H (published 32)
        num_kv_heads: int = 2  # key/value heads of self-attention (GQA)
        mlp_ratio: float = 4.0
        attention: str = "ssa"  # "ssa": Spatial Sparse Attention; "full": dense per-sample attention
        compression_block_size: int = 8  # SSA m_cmp (latent voxels)
        selection_block_size: int = 8  # SSA m_slc, a multiple of m_cmp
        topk: int = 8  # SSA selected blocks per query
        window_size: int = 8  # SSA m_win
        compression_version: str = "v1"  # "v1" (v1.1: 1×1 conv + SiLU + mean) or "v2" (v1.0: sparse 3³ convs)
        use_shift: bool = True  # shift the SSA windows by m_win/2 in odd blocks
        pe_factor: float = 1.0  # APE coordinate scale (0.5 for the 1024³ model, so its range matches 512³)
        sparse_conditions: bool = False  # v1.0: foreground condition tokens + cond_proj + condition APE
        use_checkpoint: bool = False  # activation checkpointing per block while training

        @classmethod
        def v1_1(cls, resolution: int = 512, **overrides) -> SparseDiT.Config:
            """Published ``direct3d-s2-v-1-1`` sparse DiT at mesh resolution 512 or 1024."""
            return cls(**{**_published(resolution), **overrides})

        @classmethod
        def v1_0(cls, resolution: int = 512, **overrides) -> SparseDiT.Config:
            """Published ``direct3d-s2-v-1-0``: m_cmp 4, top-k 32 (512) / 8 (1024), compression v2, sparse conds."""
            base = {**_published(resolution), "compression_block_size": 4, "topk": 32 if resolution == 512 else 8,
                    "compression_version": "v2", "sparse_conditions": True}
            return cls(**{**base, **overrides})

    def __init__(self, config: Config | None = None, *,
                 self_attention: Callable[[SparseDiT.Config, int], nn.Module] | None = None, **overrides) -> None:
        """``self_attention(config, block_index) -> module`` replaces the attention chosen by ``config.attention``;
        the module maps a SparseTensor ``[N, C]`` to one of the same structure."""
        super().__init__()
        cfg = config or self.Config()
        if overrides:
            cfg = self.Config(**{**asdict(cfg), **overrides})
        if cfg.attention not in ("ssa", "full"):
            raise ValueError(f"expected attention 'ssa' or 'full', got {cfg.attention!r}")
        self.config = cfg
        c = cfg.model_channels
        make_attn = self_attention or make_self_attention
        self.t_embedder = TimestepEmbedder(c)
        if cfg.sparse_conditions:
            self.cond_proj = nn.Linear(cfg.cond_channels, cfg.cond_channels)
            self.cond_pos_embedder = AbsolutePositionEmbedder(cfg.cond_channels)
        self.pos_embedder = AbsolutePositionEmbedder(c, factor=cfg.pe_factor)
        self.input_layer = nn.Linear(cfg.in_channels, c)
        self.blocks = nn.ModuleList([
            ModulatedCrossBlock(c, cfg.cond_channels, cfg.num_heads, make_attn(cfg, i), mlp_ratio=cfg.mlp_ratio)
            for i in range(cfg.num_blocks)
        ])
        self.out_layer = nn.Linear(c, cfg.out_channels)
        init_dit_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def embed_condition(self, cond: torch.Tensor | ConditionTokens) -> ConditionTokens:
        """Condition tokens as the blocks see them (``cond_proj`` + condition APE with sparse conditions)."""
        cond = as_condition(cond).to(dtype=self.dtype)
        if not self.config.sparse_conditions:
            return cond
        if cond.coords is None:
            raise ValueError("this model uses sparse conditions: expected ConditionTokens with coords "
                             "(see d3s2.models.conditioner.sparse_condition_tokens)")
        b, l, cc = cond.tokens.shape
        pe = self.cond_pos_embedder(cond.coords.reshape(b * l, 3)).view(b, l, cc)
        return ConditionTokens(self.cond_proj(cond.tokens) + pe.to(self.dtype), cond.mask, cond.coords)

    def prepare_condition(self, cond: torch.Tensor | ConditionTokens) -> PreparedCondition:
        """The condition with its embedding and every block's cross-attention keys/values computed once
        (sampling steps)."""
        return PreparedCondition.build(self, cond)

    def forward(self, x: SparseTensor, t: torch.Tensor,
                cond: torch.Tensor | ConditionTokens | PreparedCondition) -> SparseTensor:
        """Velocity for the tokens of ``x`` (feats ``[N, Cin]``), ``t [B]`` (0–1000), condition ``[B, L, Cc]``
        (or its :meth:`prepare_condition`)."""
        cfg = self.config
        if not isinstance(x, SparseTensor):
            raise TypeError(f"expected a SparseTensor, got {type(x).__name__}")
        if x.num_channels != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {x.num_channels}")
        if t.shape != (x.batch_size,):
            raise ValueError(f"expected t of shape [{x.batch_size}], got {tuple(t.shape)}")
        cond, kvs, constant = unpack_condition(self, cond, x.batch_size)
        dtype = self.dtype
        pe = self.pos_embedder
        # Parameter-free, so it is a function of the token layout: computed once per layout (not per step).
        ape = x.cached(f"ape_{pe.channels}_{pe.factor}", lambda: pe(x.coords[:, 1:]))
        h = self.input_layer(x.feats.to(dtype)) + ape.to(dtype)
        h = x.replace(h)
        t_emb = self.t_embedder(t).to(dtype)
        for block, kv in zip(self.blocks, kvs, strict=True):
            if cfg.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t_emb, cond, kv, constant, use_reentrant=False)
            else:
                h = block(h, t_emb, cond, kv, constant)
        out = self.out_layer(layer_norm32(h.feats, h.feats.shape[-1:]))
        return x.replace(out.to(x.dtype))


def _published(resolution: int) -> dict:
    if resolution not in (512, 1024):
        raise ValueError(f"expected mesh resolution 512 or 1024, got {resolution}")
    return {"resolution": resolution // 8, "pe_factor": 1.0 if resolution == 512 else 0.5}


def make_self_attention(cfg: SparseDiT.Config, index: int) -> nn.Module:
    """The self-attention of block ``index`` for ``cfg.attention`` ("ssa" or "full")."""
    if cfg.attention == "full":
        return SparseFullAttention(cfg.model_channels, cfg.num_heads, cfg.num_kv_heads)
    from ..attention import SpatialSparseAttention

    return SpatialSparseAttention(
        dim=cfg.model_channels,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.model_channels // cfg.num_heads,
        compression_block=cfg.compression_block_size,
        selection_block=cfg.selection_block_size,
        topk=cfg.topk,
        window_size=cfg.window_size,
        compression_version=cfg.compression_version,
        shift_window=cfg.use_shift and index % 2 == 1,
    )
