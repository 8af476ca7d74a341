"""Sparse transformer with 3D shifted-window self-attention (the SS-VAE's attention trunk).

Dimension legend: N tokens (active latent voxels, all samples), C channels, H heads, D head dim,
NW non-empty windows, W window edge in voxels.

Parameter names follow the published checkpoints: ``blocks.{i}.attn.{to_qkv,to_out}``, ``blocks.{i}.mlp.mlp.{0,2}``;
the layer norms have no affine parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import sparse as sp
from ...ops.block_attn import window_attention
from ..embeddings import AbsolutePositionEmbedder


class SparseWindowSelfAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``W³`` windows of coordinates shifted by ``shift``."""

    def __init__(self, channels: int, num_heads: int, *, window_size: int = 8, shift: int = 0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.window_size, self.shift = window_size, shift
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)  # rows [q | k | v], heads contiguous
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: sp.SparseTensor, h: torch.Tensor) -> torch.Tensor:
        """``h [N, C]`` (features of ``x``'s voxels, possibly normalised) -> ``[N, C]``."""
        part = sp.window_partition(x, self.window_size, self.shift)
        n, hd = h.shape[0], self.channels // self.num_heads
        qkv = self.to_qkv(h)[part.perm].view(n, 3, self.num_heads, hd)  # [N, 3, H, D], window order
        o = window_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], part.block_offsets)  # [N, H, D]
        return self.to_out(o.reshape(n, self.channels)[part.inverse])

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window_size={self.window_size}, shift={self.shift}"


class FeedForward(nn.Module):
    """``Linear(C→rC) → GELU(tanh) → Linear(rC→C)`` (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)


class SparseWindowTransformerBlock(nn.Module):
    """Pre-LN block: ``h += attn(LN(h)); h += mlp(LN(h))``; LNs without affine, eps 1e-6."""

    def __init__(self, channels: int, num_heads: int, *, window_size: int = 8, shift: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseWindowSelfAttention(channels, num_heads, window_size=window_size, shift=shift,
                                              qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(channels, mlp_ratio)

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        h = x.feats
        h = h + self.attn(x, self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return x.replace(h)


class SparseWindowTransformer(nn.Module):
    """``input_layer`` (Linear) + sinusoidal APE of the voxel coordinates, then swin blocks.

    Block i uses shift 0 when i is even and ``window_size // 2`` when odd.
    """

    def __init__(self, in_channels: int, channels: int, num_blocks: int, num_heads: int, *, window_size: int = 8,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, pe_factor: float = 1.0) -> None:
        super().__init__()
        self.input_layer = nn.Linear(in_channels, channels)
        self.pos_embedder = AbsolutePositionEmbedder(channels, factor=pe_factor)
        self.blocks = nn.ModuleList(
            SparseWindowTransformerBlock(channels, num_heads, window_size=window_size,
                                         shift=window_size // 2 if i % 2 else 0, mlp_ratio=mlp_ratio,
                                         qkv_bias=qkv_bias)
            for i in range(num_blocks)
        )
        self._init_linears()

    def _init_linears(self) -> None:
        # Xavier-uniform weights and zero biases for every Linear of the trunk (DiT/TRELLIS convention).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: sp.SparseTensor, *, factor: float | None = None) -> sp.SparseTensor:
        """``[N, C_in]`` -> ``[N, C]`` on the same voxels; ``factor`` overrides the APE coordinate factor."""
        h = self.input_layer(x.feats)
        h = h + self.pos_embedder(x.coords[:, 1:], factor=factor).to(h.dtype)
        x = x.replace(h)
        for block in self.blocks:
            x = block(x)
        return x
