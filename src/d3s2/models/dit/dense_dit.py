"""DenseDiT: the flow transformer for the dense structure latent (published: 8 × 16³, 4096 tokens).

Dimension legend: B batch, Cin/Cout latent channels, R latent resolution, T = R³ tokens, C width,
L condition tokens, Cc condition channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..embeddings import TimestepEmbedder, sincos_position_embedding
from .blocks import ModulatedCrossBlock, SelfAttention, layer_norm32
from .condition import ConditionTokens, PreparedCondition, as_condition, unpack_condition
from .init import init_dit_weights


class DenseDiT(nn.Module):
    """Rectified-flow velocity model on a dense ``[B, Cin, R, R, R]`` latent, cross-attending to image tokens.

    Layout (published ``DenseDiT``): ``input_layer`` Linear(Cin→C) + fixed 3D sinusoidal APE buffer
    ``pos_emb [R³, C]`` (row = x·R² + y·R + z), ``num_blocks`` :class:`ModulatedCrossBlock` with dense
    self-attention (QK RMS norm), parameter-free LayerNorm, then ``out_layer`` Linear(C→Cout).
    """

    @dataclass(kw_only=True)
    class Config:
        resolution: int = 16  # latent grid side R; T = R³ tokens
        in_channels: int = 8
        out_channels: int = 8
        model_channels: int = 1024  # transformer width C
        cond_channels: int = 1024  # image-token width Cc (DINOv2 ViT-L: 1024)
        num_blocks: int = 24
        num_heads: int = 16
        mlp_ratio: float = 4.0
        qk_rms_norm: bool = True  # per-head RMS norm on self-attention q and k
        use_checkpoint: bool = False  # activation checkpointing per block while training

    def __init__(self, config: Config | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or self.Config()
        if overrides:
            cfg = self.Config(**{**asdict(cfg), **overrides})
        self.config = cfg
        r, c = cfg.resolution, cfg.model_channels
        # Built on the CPU and moved: cheap even under a `torch.device("meta")` context.
        axis = torch.arange(r, device="cpu")
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # [T, 3]
        self.register_buffer("pos_emb", sincos_position_embedding(grid, c).to(torch.get_default_device()))
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = nn.Linear(cfg.in_channels, c)
        self.blocks = nn.ModuleList([
            ModulatedCrossBlock(c, cfg.cond_channels, cfg.num_heads,
                                SelfAttention(c, cfg.num_heads, qk_rms_norm=cfg.qk_rms_norm), mlp_ratio=cfg.mlp_ratio)
            for _ in range(cfg.num_blocks)
        ])
        self.out_layer = nn.Linear(c, cfg.out_channels)
        init_dit_weights(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def embed_condition(self, cond: torch.Tensor | ConditionTokens) -> ConditionTokens:
        """Condition tokens as the blocks see them (in the model's dtype)."""
        return as_condition(cond).to(dtype=self.dtype)

    def prepare_condition(self, cond: torch.Tensor | ConditionTokens) -> PreparedCondition:
        """The condition with every block's cross-attention keys/values computed once (sampling steps)."""
        return PreparedCondition.build(self, cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor | ConditionTokens | PreparedCondition) -> torch.Tensor:
        """Velocity ``[B, Cout, R, R, R]`` for ``x [B, Cin, R, R, R]``, ``t [B]`` (0–1000), condition ``[B, L, Cc]``
        (or its :meth:`prepare_condition`)."""
        cfg = self.config
        r = cfg.resolution
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != (r, r, r):
            raise ValueError(f"expected x of shape [B, {cfg.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"expected t of shape [{b}], got {tuple(t.shape)}")
        cond, kvs, constant = unpack_condition(self, cond, b)
        dtype = self.dtype
        h = x.reshape(b, cfg.in_channels, -1).transpose(1, 2).to(dtype)  # [B, T, Cin], token = x·R² + y·R + z
        h = self.input_layer(h) + self.pos_emb.to(dtype)[None]
        t_emb = self.t_embedder(t).to(dtype)
        for block, kv in zip(self.blocks, kvs, strict=True):
            if cfg.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t_emb, cond, kv, constant, use_reentrant=False)
            else:
                h = block(h, t_emb, cond, kv, constant)
        out = self.out_layer(layer_norm32(h, h.shape[-1:]))  # [B, T, Cout]
        return out.transpose(1, 2).reshape(b, cfg.out_channels, r, r, r).to(x.dtype)
