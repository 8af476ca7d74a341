"""Spatial Sparse Attention layer (Direct3D-S2 §4.1): projections, block compression, gates, and the SSA op.

Dimension legend: N tokens, C = ``dim`` model channels, Hq / Hkv query / kv heads, D head dim, NBc compression
blocks. The numerics live in :mod:`d3s2.ops.ssa` (backend ``torch`` anywhere, ``triton`` on CUDA).

Parameter names and shapes follow the published checkpoints' ``blocks.{i}.self_attn.*`` keys; sparse convs
store ``weight [K, C_in, C_out]`` where the published torchsparse modules store ``conv.kernel`` (see
:func:`map_published_ssa_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...ops.ssa import SSALayout, build_ssa_layout, spatial_sparse_attention
from ...sparse import SparseConv3d, SparseGroupNorm, SparseSiLU, SparseTensor


def _block_gather(x: SparseTensor, layout: SSALayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 ``[NBc, Lmax]`` token rows of each compression block (padding: row N), int64 ``[NBc]`` lengths and
    int64 ``[N]`` block of each token, cached on x (one host sync when built, none per call)."""
    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets = layout.cmp_offsets.long()
        lengths = offsets[1:] - offsets[:-1]
        lmax = int(lengths.max()) if lengths.numel() else 0
        pos = torch.arange(lmax, device=offsets.device)
        rows = torch.where(pos[None] < lengths[:, None], offsets[:-1, None] + pos[None], layout.num_tokens)
        token_block = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths,
                                              output_size=layout.num_tokens)
        return rows, lengths, token_block
    return x.cached(f"ssa_cmp_gather_{layout.m_cmp}_{layout.m_slc}", build)


class _BlockMean(torch.autograd.Function):
    """Mean of each block's rows by a padded gather and a fixed-order sum; the backward gathers each token's
    block gradient (no index_put: autograd's backward of the gather would accumulate every padding slot into
    row N, hundreds of thousands of duplicates serialised by CUDA's sort-based accumulation)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                token_block: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(feats.dtype, torch.float32)
        ext = torch.cat([feats.to(acc), feats.new_zeros(1, feats.shape[1], dtype=acc)])  # [N + 1, C], row N = 0
        inv_len = 1.0 / lengths.clamp_min(1).to(acc)
        ctx.save_for_backward(inv_len, token_block)
        ctx.feats_dtype = feats.dtype
        return (ext[rows].sum(1) * inv_len[:, None]).to(feats.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inv_len, token_block = ctx.saved_tensors
        per_block = grad.to(inv_len.dtype) * inv_len[:, None]  # [NBc, C]
        return per_block[token_block].to(ctx.feats_dtype), None, None, None


def _block_mean(feats: torch.Tensor, x: SparseTensor, layout: SSALayout) -> torch.Tensor:
    """``[NBc, C]`` mean of each compression block's contiguous rows of ``feats [N, C]`` (block order).

    Deterministic and free of host syncs, unlike ``torch.segment_reduce`` (which checks its lengths on the host on
    every call): a padded gather summed in a fixed order in at least float32, cast back; see :class:`_BlockMean`.
    """
    return _BlockMean.apply(feats, *_block_gather(x, layout))


def _sorted_template(x: SparseTensor, layout: SSALayout) -> SparseTensor:
    """A feature-less SparseTensor of x's tokens in block order (its structure cache persists on x)."""
    def build() -> SparseTensor:
        coords = x.coords if layout.in_block_order else x.coords[layout.perm]
        return SparseTensor(x.feats.new_empty(x.num_voxels, 0), coords, resolution=x.resolution,
                            batch_size=x.batch_size, validate=False)
    return x.cached(f"ssa_sorted_{layout.m_cmp}_{layout.m_slc}", build)


def _coarse_template(x: SparseTensor, layout: SSALayout) -> SparseTensor:
    """A feature-less SparseTensor of the compression blocks (grid ``R / m_cmp``), cached on x."""
    def build() -> SparseTensor:
        res = -(-x.resolution // layout.m_cmp)
        return SparseTensor(x.feats.new_empty(layout.num_cmp, 0), layout.cmp_coords, resolution=res,
                            batch_size=x.batch_size, validate=False)
    return x.cached(f"ssa_coarse_{layout.m_cmp}_{layout.m_slc}", build)


class CompressionV1(nn.Module):
    """v1.1 compression: 1×1 conv (a per-token linear map) + SiLU, then the mean over each compression block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act_layers = nn.Sequential(SparseConv3d(channels, channels, kernel_size=1), SparseSiLU())

    def forward(self, feats: torch.Tensor, x: SparseTensor, layout: SSALayout) -> torch.Tensor:
        """feats ``[N, C]`` in block order → ``[NBc, C]``."""
        h = self.act_layers(_sorted_template(x, layout).replace(feats)).feats
        return _block_mean(h, x, layout)


class CompressionV2(nn.Module):
    """v1.0 / paper compression: GroupNorm + SiLU → mean-pool → SubMConv3³ → GN → SiLU → SubMConv3³, plus the
    mean-pooled input as a skip. The convs run on the grid of compression blocks."""

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        num_groups = math.gcd(num_groups, channels)  # 32 groups for the published 64 channels
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, channels), SparseSiLU())
        self.out_layers = nn.Sequential(SparseConv3d(channels, channels, 3), SparseGroupNorm(num_groups, channels),
                                        SparseSiLU(), SparseConv3d(channels, channels, 3))

    def forward(self, feats: torch.Tensor, x: SparseTensor, layout: SSALayout) -> torch.Tensor:
        """feats ``[N, C]`` in block order → ``[NBc, C]``."""
        h = self.act_layers(_sorted_template(x, layout).replace(feats)).feats
        coarse = _coarse_template(x, layout)
        h = self.out_layers(coarse.replace(_block_mean(h, x, layout))).feats
        return h + _block_mean(feats, x, layout)


class SpatialSparseAttention(nn.Module):
    """Self-attention over a SparseTensor with SSA's compressed, selected and windowed branches.

    ``forward(x)`` takes tokens in any order (the layout, sorts and kernel maps are cached on x's structure) and
    returns a SparseTensor of the same structure, in the caller's order.
    """

    @dataclass(kw_only=True)
    class Config:
        dim: int = 1024  # model channels C
        num_heads: int = 32  # query heads Hq
        num_kv_heads: int = 2  # key/value heads Hkv (GQA groups); Hq must be a multiple
        head_dim: int = 32  # D, at most 128 for the triton backend
        compression_block: int = 8  # m_cmp, in latent voxels
        selection_block: int = 8  # m_slc, a multiple of m_cmp
        topk: int = 8  # selection blocks per (query, kv head)
        window_size: int = 8  # m_win
        compression_version: str = "v1"  # "v1": linear + SiLU + mean (v1.1); "v2": residual sparse convs (v1.0)
        shift_window: bool = False  # shift windows by m_win // 2 (odd layers)

        @classmethod
        def v1_1(cls, **overrides) -> SpatialSparseAttention.Config:
            """Published v1.1 (the default release): m_cmp = m_slc = 8, top-k 8, window 8, compression v1."""
            return cls(**{"compression_block": 8, "selection_block": 8, "topk": 8, "window_size": 8,
                          "compression_version": "v1", **overrides})

        @classmethod
        def v1_0(cls, resolution: int = 1024, **overrides) -> SpatialSparseAttention.Config:
            """Published v1.0 / the paper: m_cmp 4, m_slc 8, top-k 32 at 512³ and 8 at 1024³, compression v2."""
            if resolution not in (512, 1024):
                raise ValueError(f"expected resolution 512 or 1024, got {resolution}")
            return cls(**{"compression_block": 4, "selection_block": 8, "topk": 32 if resolution == 512 else 8,
                          "window_size": 8, "compression_version": "v2", **overrides})

    def __init__(self, config: Config | None = None, **overrides) -> None:
        super().__init__()
        cfg = SpatialSparseAttention.Config(**{**(asdict(config) if config else {}), **overrides})
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"expected num_heads divisible by num_kv_heads, got {cfg.num_heads}, {cfg.num_kv_heads}")
        if cfg.selection_block % cfg.compression_block:
            raise ValueError(f"expected selection_block to be a multiple of compression_block, got "
                             f"{cfg.selection_block}, {cfg.compression_block}")
        if cfg.compression_version not in ("v1", "v2"):
            raise ValueError(f"expected compression_version 'v1' or 'v2', got {cfg.compression_version!r}")
        self.config = cfg
        hq, hkv, d, m = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.compression_block
        self.proj_q = nn.Linear(cfg.dim, hq * d, bias=False)
        self.proj_k = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_v = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.proj_o = nn.Linear(hq * d, cfg.dim, bias=False)
        # Learned position of a token inside its compression block, added to keys before compression.
        self.intra_block_pe = nn.Parameter(torch.zeros(m, m, m, hkv * d))
        self.gate = nn.Sequential(nn.Linear(cfg.dim, 3, bias=False), nn.Sigmoid())
        compression = CompressionV1 if cfg.compression_version == "v1" else CompressionV2
        self.compression_key = compression(hkv * d)
        self.compression_value = compression(hkv * d)

    def layout(self, x: SparseTensor) -> SSALayout:
        """The block structure this layer uses for x (cached on x)."""
        cfg = self.config
        shift = cfg.window_size // 2 if cfg.shift_window else 0
        return build_ssa_layout(x, m_cmp=cfg.compression_block, m_slc=cfg.selection_block,
                                m_win=cfg.window_size, shift=shift)

    def forward(self, x: SparseTensor, *, backend: str | None = None) -> SparseTensor:
        cfg = self.config
        if x.num_channels != cfg.dim:
            raise ValueError(f"expected {cfg.dim} channels, got {x.num_channels}")
        if x.num_voxels == 0:
            return x.replace(x.feats.new_zeros(0, cfg.dim))
        layout = self.layout(x)
        n, hq, hkv, d = x.num_voxels, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = x.feats if layout.in_block_order else x.feats[layout.perm]  # [N, C] block order
        q = self.proj_q(h).view(n, hq, d)
        k = self.proj_k(h)  # [N, Hkv·D]
        v = self.proj_v(h)
        pe = self.intra_block_pe.view(-1, hkv * d)[layout.pe_index].to(k.dtype)  # [N, Hkv·D]
        k_cmp = self.compression_key(k + pe, x, layout)  # [NBc, Hkv·D]
        v_cmp = self.compression_value(v, x, layout)
        gates = self.gate(h)  # [N, 3] (compressed, selected, window)
        o = spatial_sparse_attention(q, k.view(n, hkv, d), v.view(n, hkv, d), k_cmp.view(-1, hkv, d),
                                     v_cmp.view(-1, hkv, d), gates, layout, topk=cfg.topk, backend=backend)
        out = self.proj_o(o.reshape(n, hq * d))
        return x.replace(out if layout.in_block_order else out[layout.inverse])


def map_published_ssa_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename published SSA keys (``…conv.kernel`` / ``…conv.bias`` of torchsparse convs) to this module's
    (``…weight`` ``[K, C_in, C_out]`` / ``…bias``); every other key and tensor passes unchanged.

    A 1×1 torchsparse kernel is stored 2-D ``[C_in, C_out]``; it becomes ``[1, C_in, C_out]``.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".conv.kernel"):
            key, value = key[: -len(".conv.kernel")] + ".weight", value if value.ndim == 3 else value[None]
        elif key.endswith(".conv.bias"):
            key = key[: -len(".conv.bias")] + ".bias"
        out[key] = value
    return out
