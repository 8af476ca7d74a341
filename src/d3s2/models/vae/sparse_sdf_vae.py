"""SS-VAE: the symmetric sparse SDF VAE (paper §3) with the published v1.1 architecture as defaults.

Dimension legend: N band voxels at resolution R, NL latent voxels at R/8, M decoded voxels (512·NL),
B batch, C channels, Z latent channels.

Encoder: SDF per band voxel → Linear 1→32 → three residual down blocks (mean-pool ×2 each) → Linear + APE →
shifted-window transformer → LayerNorm → Linear → [mean | logvar]. Decoder: Linear Z→C + APE → transformer →
three subdivide blocks (every voxel → its 8 children) → Linear → tanh (SDF / τ, in [-1, 1]).

Parameter names mirror the published ``SparseSDFVAE`` so a checkpoint converts by key renames
(:mod:`d3s2.models.vae.published`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ... import sparse as sp
from ...ops.conv.reference import lookup
from .distributions import DiagonalGaussian
from .losses import SDFLossWeights, sparse_sdf_loss
from .transformer import SparseWindowTransformer

# Each latent voxel decodes to a 2³·2³·2³ = 8³ block.
UPSAMPLE = 8

# The decoder's convolutional part: latent-level features -> decoded voxels.
Head = Callable[[sp.SparseTensor], sp.SparseTensor]


@dataclass(kw_only=True)
class SparseSDFVAEConfig:
    """Architecture and loss weights. Defaults = the published v1.1 SS-VAE (512 and 1024 share them)."""

    latent_channels: int = 16  # Z, the published embed_dim
    model_channels: int = 512  # transformer width (encoder and decoder)
    num_blocks: int = 4  # transformer blocks in each of encoder and decoder
    num_heads: int = 8  # 8 × 64 head channels
    window_size: int = 8  # attention window edge in latent voxels; odd blocks shift by half of it
    mlp_ratio: float = 4.0
    down_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # encoder: 1→32→64→128→model_channels
    up_channels: list[int] = field(default_factory=lambda: [128, 64, 32])  # decoder: model_channels→128→64→32→1
    num_groups: int = 32  # GroupNorm groups in the encoder down blocks
    pe_factor: float = 1.0  # APE coordinate factor (0.5 lets a 128³ latent grid reuse the 64³ range)
    train_chunk_size: int = 0  # >0: training decodes one random sub-volume of this many latent voxels per edge
    chunk_padding: int = 4  # halo (latent voxels) around a decode chunk; ≥3 makes chunks exact
    # Which 8³ blocks get a latent (and are decoded): "blocks" = every occupied block of the data, including the
    # blocks that close the band (hole membranes, see d3s2.geometry.sdf); "band" = only blocks holding band
    # voxels (the published encoder: a mesh with holes then decodes to a double-walled shell).
    latent_structure: str = "blocks"
    loss: SDFLossWeights = field(default_factory=SDFLossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = SDFLossWeights(**self.loss)
        if len(self.down_channels) != 3 or len(self.up_channels) != 3:
            raise ValueError(f"expected 3 down and 3 up channel counts (f = 8), got {self.down_channels}, "
                             f"{self.up_channels}")
        if self.latent_structure not in ("blocks", "band"):
            raise ValueError(f"expected latent_structure 'blocks' or 'band', got {self.latent_structure!r}")
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} not divisible by num_heads {self.num_heads}")
        for c in [*self.down_channels, self.model_channels]:
            if c % self.num_groups:
                raise ValueError(f"channel count {c} not divisible by num_groups {self.num_groups}")


# ---------------------------------------------------------------------------------------------- blocks
def _reuse_structure(parent: sp.SparseTensor, key: str, child: sp.SparseTensor) -> sp.SparseTensor:
    """``child`` (coords derived from ``parent``'s) attached to a structure cache kept on ``parent``.

    Re-running a block on the same structure (activation-checkpoint recompute, a repeated batch) then reuses
    the child's kernel maps instead of rebuilding them.
    """
    template = parent.cached(key, lambda: sp.SparseTensor(
        child.feats.new_zeros(child.num_voxels, 0), child.coords, resolution=child.resolution,
        batch_size=child.batch_size, validate=False))
    return template.replace(child.feats)


# Cache key of a pooled level's structure on its parent level (SparseDownBlock3d).
POOL_KEY = "vae_pool2"


def prepare_structure(x: sp.SparseTensor, window_size: int = 8,
                      structure: sp.SparseTensor | None = None) -> sp.SparseTensor:
    """Build on ``x`` the structure the encoder derives from its coordinates with host syncs on a GPU (unique
    parents, window groups): per sample voxel counts and the pooled structure of the three down blocks, and the
    latent level's two window partitions (on ``structure``, the latent voxels given to the encoder, when given).
    Run it where syncs are free (DataLoader workers, on the CPU); the structure travels with the batch
    (``SparseTensor.to``) and the model reuses it. Returns ``x``.
    """
    h = x
    for _ in range(3):
        h.batch_counts  # noqa: B018 - cached on access (with cu_seqlens)
        parents, _, _ = h.cached("down_2", lambda h=h: sp.downsample_structure(h, 2))
        h = h.cached(POOL_KEY, lambda h=h, parents=parents: sp.SparseTensor(
            torch.zeros(parents.shape[0], 0, device=parents.device), parents, resolution=h.resolution // 2,
            batch_size=h.batch_size, validate=False))
    latent = h if structure is None else structure
    latent.batch_counts  # noqa: B018
    for shift in (0, window_size // 2):
        sp.window_partition(latent, window_size, shift)
    return x


class SparseDownBlock3d(nn.Module):
    """Residual down block: ``GN → SiLU → mean-pool ×2 → conv3 → GN → SiLU → conv3`` plus the pooled input
    (through a 1×1 conv when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.act_layers = nn.Sequential(sp.SparseGroupNorm(num_groups, in_channels), sp.SparseSiLU())
        self.out_layers = nn.Sequential(
            sp.SparseConv3d(in_channels, out_channels, 3),
            sp.SparseGroupNorm(num_groups, out_channels),
            sp.SparseSiLU(),
            sp.SparseConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection = (sp.SparseConv3d(in_channels, out_channels, 1) if in_channels != out_channels
                                else nn.Identity())

    @staticmethod
    def _pool(x: sp.SparseTensor) -> sp.SparseTensor:
        return _reuse_structure(x, POOL_KEY, sp.sparse_downsample(x, 2))

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        h = self.out_layers(self._pool(self.act_layers(x)))
        skip = self.skip_connection(self._pool(x))
        return h.replace(h.feats + skip.feats)


class SparseSubdivideBlock3d(nn.Module):
    """``conv3 (C_in→C_out) → SiLU → subdivide (8 children) → conv3 → SiLU``; no norm, no residual."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.act_layers = nn.Sequential(sp.SparseConv3d(in_channels, out_channels, 3), sp.SparseSiLU())
        self.out_layers = nn.Sequential(sp.SparseConv3d(out_channels, out_channels, 3), sp.SparseSiLU())

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        h = self.act_layers(x)
        return self.out_layers(_reuse_structure(h, "vae_subdivide", sp.sparse_subdivide(h)))


# ---------------------------------------------------------------------------------------------- encoder
class SparseSDFEncoder(SparseWindowTransformer):
    """``[N, 1]`` SDF at resolution R -> ``[NL, 2Z]`` (mean | logvar) at R/8."""

    def __init__(self, cfg: SparseSDFVAEConfig) -> None:
        super().__init__(cfg.model_channels, cfg.model_channels, cfg.num_blocks, cfg.num_heads,
                         window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, pe_factor=cfg.pe_factor)
        c0, c1, c2 = cfg.down_channels
        self.input_layer1 = nn.Linear(1, c0)
        self.downsample = nn.ModuleList([
            SparseDownBlock3d(c0, c1, cfg.num_groups),
            SparseDownBlock3d(c1, c2, cfg.num_groups),
            SparseDownBlock3d(c2, cfg.model_channels, cfg.num_groups),
        ])
        self.out_layer = nn.Linear(cfg.model_channels, 2 * cfg.latent_channels)

    def forward(self, x: sp.SparseTensor, *, factor: float | None = None,  # type: ignore[override]
                structure: sp.SparseTensor | None = None) -> sp.SparseTensor:
        """``structure``: the latent voxels to emit (coords at R/8, feats unused), a superset of the band's
        blocks (e.g. every occupied block of the data); blocks without band voxels enter the transformer with
        zero features. None: the band's blocks."""
        if x.num_channels != 1:
            raise ValueError(f"expected one SDF channel per voxel, got {x.num_channels}")
        if x.resolution % UPSAMPLE:
            raise ValueError(f"expected a resolution divisible by {UPSAMPLE}, got {x.resolution}")
        h = x.replace(self.input_layer1(x.feats))
        for block in self.downsample:
            h = block(h)
        if structure is not None:
            h = _onto_structure(h, structure)
        h = super().forward(h, factor=factor)
        return h.replace(self.out_layer(F.layer_norm(h.feats, h.feats.shape[-1:])))


def _onto_structure(h: sp.SparseTensor, structure: sp.SparseTensor) -> sp.SparseTensor:
    """``h`` ``[NL, C]`` scattered into the rows of ``structure`` (``NB ≥ NL`` voxels, every one of ``h``'s among
    them); the other rows are zero. No host sync: the row count comes from ``structure``."""
    if structure.resolution != h.resolution or structure.batch_size != h.batch_size:
        raise ValueError(f"expected a structure at resolution {h.resolution} with {h.batch_size} samples, got "
                         f"{structure.resolution} with {structure.batch_size}")
    rows = lookup(structure.coords, h.coords, h.resolution).long()  # [NL]; the caller guarantees rows >= 0
    feats = h.feats.new_zeros(structure.num_voxels, h.num_channels).index_copy(0, rows, h.feats)
    return structure.replace(feats)  # shares the structure's cache (window partitions prepared with it)


# ---------------------------------------------------------------------------------------------- decoder
class SparseSDFDecoder(SparseWindowTransformer):
    """``[NL, Z]`` latent at R/8 -> ``[512·NL, 1]`` tanh SDF at R: every voxel of every occupied 8³ block.

    Output order: latent rows in input order, each followed by its 512 fine voxels in subdivide order.
    """

    def __init__(self, cfg: SparseSDFVAEConfig) -> None:
        super().__init__(cfg.latent_channels, cfg.model_channels, cfg.num_blocks, cfg.num_heads,
                         window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, pe_factor=cfg.pe_factor)
        self.cfg = cfg
        c0, c1, c2 = cfg.up_channels
        self.upsample = nn.ModuleList([
            SparseSubdivideBlock3d(cfg.model_channels, c0),
            SparseSubdivideBlock3d(c0, c1),
            SparseSubdivideBlock3d(c1, c2),
        ])
        self.out_layer = nn.Linear(c2, 1)
        # Zero head: the untrained decoder predicts the surface level everywhere.
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def upsample_head(self, h: sp.SparseTensor, *, return_feat: bool = False) -> sp.SparseTensor:
        """Latent-level features ``[NL, C]`` -> ``[512·NL, 1]`` tanh SDF (the convolutional part only).

        ``return_feat``: feats ``[512·NL, 1 + C_last]`` = ``[tanh SDF | the features before out_layer]`` (the
        published ``return_feat``, which the 512³ refiner reads).
        """
        for block in self.upsample:
            h = block(h)
        sdf = torch.tanh(self.out_layer(h.feats))
        return h.replace(torch.cat([sdf, h.feats.to(sdf.dtype)], 1) if return_feat else sdf)

    def trunk(self, z: sp.SparseTensor, *, factor: float | None = None) -> sp.SparseTensor:
        """Latent ``[NL, Z]`` -> transformer features ``[NL, C]`` (the attention part only)."""
        if z.num_channels != self.input_layer.in_features:
            raise ValueError(f"expected {self.input_layer.in_features} latent channels, got {z.num_channels}")
        return super().forward(z, factor=factor)

    def forward(self, z: sp.SparseTensor, *, factor: float | None = None,  # type: ignore[override]
                chunk_size: int = 0, return_feat: bool = False) -> sp.SparseTensor:
        """Decode; ``chunk_size > 0`` runs the convolutional upsampling per spatial chunk of that many latent
        voxels per edge (bounded memory, same result), see :func:`decode_chunked`. ``return_feat``: see
        :meth:`upsample_head`."""
        h = self.trunk(z, factor=factor)
        head = functools.partial(self.upsample_head, return_feat=return_feat)
        if chunk_size <= 0:
            return head(h)
        return decode_chunked(head, h, chunk_size, self.cfg.chunk_padding)


def _box_mask(coords: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """bool [N]: spatial coords (columns 1..3) inside the half-open box [lo, hi)."""
    xyz = coords[:, 1:]
    lo_t = torch.as_tensor(lo, device=coords.device, dtype=xyz.dtype)
    hi_t = torch.as_tensor(hi, device=coords.device, dtype=xyz.dtype)
    return ((xyz >= lo_t) & (xyz < hi_t)).all(dim=1)


def decode_region(head: Head, h: sp.SparseTensor, lo: Sequence[int], hi: Sequence[int],
                  padding: int) -> tuple[sp.SparseTensor, torch.Tensor]:
    """Run ``head`` on the latent voxels of the box ``[lo, hi)`` plus a ``padding`` halo; keep the box's output.

    Returns the decoded tensor (whole 8³ blocks of the box's latent voxels, in their latent order) and the
    int64 latent rows of ``h`` they come from.
    """
    r = h.resolution
    plo = [max(0, a - padding) for a in lo]
    phi = [min(r, b + padding) for b in hi]
    rows = _box_mask(h.coords, plo, phi).nonzero().squeeze(1)
    sub = sp.SparseTensor(h.feats[rows], h.coords[rows], resolution=r, batch_size=h.batch_size, validate=False)
    out = head(sub)
    # Crop at latent granularity: a latent voxel's 512 outputs are contiguous (subdivide keeps children together).
    core = _box_mask(sub.coords, lo, hi)  # [n_sub]
    keep = core.repeat_interleave(UPSAMPLE**3)
    cropped = sp.SparseTensor(out.feats[keep], out.coords[keep], resolution=out.resolution,
                              batch_size=out.batch_size, validate=False)
    return cropped, rows[core]


def decode_chunked(head: Head, h: sp.SparseTensor, chunk_size: int, padding: int) -> sp.SparseTensor:
    """Apply ``head`` chunk by chunk over the occupied ``chunk_size³`` latent boxes with a ``padding`` halo.

    With ``padding`` at least the head's receptive radius in latent voxels (≈2.6 for the SS-VAE decoder) the
    result equals ``head(h)`` voxel for voxel, in the same order; peak memory scales with the chunk volume.
    """
    r = h.resolution
    if h.num_voxels == 0:
        return head(h)
    pieces: list[sp.SparseTensor] = []
    sources: list[torch.Tensor] = []
    # Only boxes holding latent voxels (at 1024³ most of the grid is empty).
    boxes = torch.unique(torch.div(h.coords[:, 1:], chunk_size, rounding_mode="floor"), dim=0)  # [NC, 3]
    for box in boxes.tolist():
        lo = tuple(b * chunk_size for b in box)
        hi = tuple(min(r, a + chunk_size) for a in lo)
        out, src = decode_region(head, h, lo, hi, padding)
        pieces.append(out)
        sources.append(src)
    src = torch.cat(sources)
    # Put the 512-voxel groups back in latent row order, which is the unchunked output order.
    group_order = torch.argsort(src)
    idx = (group_order[:, None] * UPSAMPLE**3 + torch.arange(UPSAMPLE**3, device=src.device)).reshape(-1)
    feats = torch.cat([p.feats for p in pieces])[idx]
    coords = torch.cat([p.coords for p in pieces])[idx]
    return sp.SparseTensor(feats, coords, resolution=r * UPSAMPLE, batch_size=h.batch_size, validate=False)


# ---------------------------------------------------------------------------------------------- batch
def _block_structure(target: sp.SparseTensor) -> sp.SparseTensor:
    blocks = UPSAMPLE**3
    if target.num_voxels % blocks:
        raise ValueError(f"expected whole 8³ blocks of target rows, got {target.num_voxels} rows")
    first = target.coords[::blocks]  # [NB, 4] the first voxel of each block's run
    coords = torch.cat([first[:, :1], first[:, 1:] // UPSAMPLE], 1)
    return sp.SparseTensor(first.new_zeros(first.shape[0], 0).float(), coords,
                           resolution=target.resolution // UPSAMPLE, batch_size=target.batch_size, validate=False)


@dataclass
class SparseSDFBatch:
    """One training batch of the SS-VAE.

    Attributes:
        sdf: encoder input; feats ``[N, 1]`` float32 SDF / τ in (-1, 1) of the band voxels, coords
            ``(b, x, y, z)`` at resolution R (divisible by 8).
        target: ``[M, 1]`` float32 truncated SDF / τ in [-1, 1] of every voxel of every occupied 8³ block
            (the decoder's output set), same batch layout and resolution.
        in_band: bool ``[M]``: target row is a band (input) voxel → ``L_in``; the rest → ``L_ext``.
        sharp: bool ``[M]``: target row lies near a sharp edge → ``L_sharp``.
        factor: APE coordinate factor for this batch (None: the model's ``pe_factor``).
        blocks: the occupied blocks at R/8 (``[NB, *]``, coords only used) whose 512-voxel runs make up
            ``target``, when the batch was unpacked from them (their structure cache may be prepared); None:
            derived from ``target``.
    """

    sdf: sp.SparseTensor
    target: sp.SparseTensor
    in_band: torch.Tensor
    sharp: torch.Tensor
    factor: float | None = None
    blocks: sp.SparseTensor | None = None

    def block_structure(self) -> sp.SparseTensor:
        """The occupied blocks at R/8 (coords ``[NB, 4]``, no feats), in the target's block order: the target
        holds each block's 512 voxels as one run of rows."""
        if self.blocks is not None:
            return self.blocks
        return self.target.cached("vae_block_structure", lambda: _block_structure(self.target))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SparseSDFBatch:
        """Move to ``device`` (structure caches come along, see ``SparseTensor.to``)."""
        return dataclasses.replace(self, sdf=self.sdf.to(device, non_blocking=non_blocking),
                                   target=self.target.to(device, non_blocking=non_blocking),
                                   in_band=self.in_band.to(device, non_blocking=non_blocking),
                                   sharp=self.sharp.to(device, non_blocking=non_blocking),
                                   blocks=None if self.blocks is None else
                                   self.blocks.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SparseSDFBatch:
        """Page-locked host copy (the DataLoader's ``pin_memory=True`` calls it): the copies to the GPU then run
        asynchronously instead of blocking the host as pageable copies do."""
        return dataclasses.replace(self, sdf=self.sdf.pin_memory(), target=self.target.pin_memory(),
                                   in_band=self.in_band.pin_memory(), sharp=self.sharp.pin_memory(),
                                   blocks=None if self.blocks is None else self.blocks.pin_memory())

    @property
    def num_tokens(self) -> int:
        """Encoder input voxels (what a token budget counts)."""
        return self.sdf.num_voxels

    @classmethod
    def from_blocks(cls, sdf: sp.SparseTensor, blocks: sp.SparseTensor, *, sharp: torch.Tensor | None = None,
                    tau: float = 1.0, factor: float | None = None) -> SparseSDFBatch:
        """Build from batched tensors (the layout of ``d3s2.data.collate_sparse``).

        Args:
            sdf: band voxels, feats ``[N, 1]`` SDF at resolution R (in the units of ``tau``).
            blocks: occupied 8³ blocks, feats ``[NB, 512]`` truncated SDF of every voxel of the block (in-block
                column ``(lx·8 + ly)·8 + lz``, as ``SparseSDF.block_targets``), coords in block units at R/8.
            sharp: bool ``[N]`` band voxels near sharp edges (None: no sharp supervision).
            tau: the band half-width τ; values are divided by it (and targets clamped to [-1, 1]).
        """
        return PackedSDFBatch.pack(sdf, blocks, sharp=sharp, tau=tau, factor=factor).unpack()

    @classmethod
    def from_samples(
        cls,
        coords: Sequence[torch.Tensor],
        sdf: Sequence[torch.Tensor],
        block_coords: Sequence[torch.Tensor],
        block_sdf: Sequence[torch.Tensor],
        *,
        resolution: int,
        sharp: Sequence[torch.Tensor] | None = None,
        tau: float = 1.0,
        factor: float | None = None,
    ) -> SparseSDFBatch:
        """Collate per-sample arrays: :meth:`PackedSDFBatch.from_samples` (same arguments), expanded here."""
        return PackedSDFBatch.from_samples(coords, sdf, block_coords, block_sdf, resolution=resolution, sharp=sharp,
                                           tau=tau, factor=factor).unpack()


@dataclass
class PackedSDFBatch:
    """A :class:`SparseSDFBatch` before its per-decoded-voxel tensors exist: what DataLoader workers hand over.

    The target coordinates, values and masks have one row per voxel of every occupied 8³ block (≈ 6× the band
    voxels at 256³); :meth:`to` builds them on the destination device from the blocks instead, so workers do
    not compute them and the host does not pin and copy them (about 20 bytes per decoded voxel).

    With ``inside`` (:meth:`from_inside_bits`, what the ``vae`` training task collates) even the blocks' targets
    travel packed: 64 bytes of inside bits per block instead of 2 KiB of values, expanded as
    ``SparseSDF.block_targets`` does (∓τ by the inside bit, the band voxels' SDF at their rows).

    Attributes:
        sdf: encoder input, as :attr:`SparseSDFBatch.sdf` (feats ``[N, 1]`` SDF / τ).
        blocks: occupied blocks at R/8, feats ``[NB, 512]`` truncated SDF in the units of ``tau`` (``[NB, 0]``
            when ``inside`` is given).
        rows: int64 ``[N]`` target row of each band voxel (block row · 512 + in-block column).
        sharp: bool ``[N]`` band voxels near sharp edges, or None.
        tau, factor: as :meth:`SparseSDFBatch.from_blocks`.
        inside: uint8 ``[NB, 64]`` ``np.packbits`` of the 512 inside bits of each block (big-endian bit order,
            bit = in-block column), or None.
        fill: float32 ``[B]`` each sample's truncation value (targets outside the band are ``-fill`` inside,
            ``+fill`` outside), with ``inside``.
        band_sdf: float32 ``[N]`` the band voxels' SDF before the division by τ, with ``inside``.
    """

    sdf: sp.SparseTensor
    blocks: sp.SparseTensor
    rows: torch.Tensor
    sharp: torch.Tensor | None
    tau: float
    factor: float | None = None
    inside: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    band_sdf: torch.Tensor | None = None

    @classmethod
    def pack(cls, sdf: sp.SparseTensor, blocks: sp.SparseTensor, *, sharp: torch.Tensor | None = None,
             tau: float = 1.0, factor: float | None = None) -> PackedSDFBatch:
        """Check the inputs of :meth:`SparseSDFBatch.from_blocks` and find each band voxel's target row."""
        r = sdf.resolution
        if blocks.resolution * UPSAMPLE != r or blocks.num_channels != UPSAMPLE**3:
            raise ValueError(f"expected blocks [NB, {UPSAMPLE**3}] at resolution {r // UPSAMPLE}, got "
                             f"[{blocks.num_voxels}, {blocks.num_channels}] at {blocks.resolution}")
        if sdf.num_channels != 1:
            raise ValueError(f"expected one SDF channel, got {sdf.num_channels}")
        if sharp is not None and sharp.shape != (sdf.num_voxels,):
            raise ValueError(f"expected sharp of shape [{sdf.num_voxels}], got {tuple(sharp.shape)}")
        x = sdf.replace(sdf.feats.float() / tau)
        # A search among the NB blocks, not the NB·512 voxels: block row · 512 + in-block column.
        parent = x.coords.clone()
        parent[:, 1:] = torch.div(parent[:, 1:], UPSAMPLE, rounding_mode="floor")
        block_row = lookup(blocks.coords, parent, blocks.resolution).long()
        lxyz = (x.coords[:, 1:] % UPSAMPLE).long()
        rows = torch.where(block_row >= 0, block_row * UPSAMPLE**3 + (lxyz[:, 0] * UPSAMPLE + lxyz[:, 1]) * UPSAMPLE
                           + lxyz[:, 2], -1)
        if bool((rows < 0).any()):
            raise ValueError(f"{int((rows < 0).sum())} band voxels lie outside the given blocks")
        return cls(x, blocks, rows, None if sharp is None else sharp.bool(), float(tau), factor)

    @classmethod
    def from_samples(
        cls,
        coords: Sequence[torch.Tensor],
        sdf: Sequence[torch.Tensor],
        block_coords: Sequence[torch.Tensor],
        block_sdf: Sequence[torch.Tensor],
        *,
        resolution: int,
        sharp: Sequence[torch.Tensor] | None = None,
        tau: float = 1.0,
        factor: float | None = None,
    ) -> PackedSDFBatch:
        """Collate per-sample arrays (see :meth:`SparseSDFBatch.from_blocks`).

        Args:
            coords: per sample int ``[n, 3]`` band voxel coords at ``resolution``.
            sdf: per sample float ``[n]`` (or ``[n, 1]``) SDF of those voxels.
            block_coords: per sample int ``[nb, 3]`` occupied 8³ blocks (block units: voxel // 8).
            block_sdf: per sample float ``[nb, 512]`` truncated SDF of every voxel of each block.
            sharp: per sample bool ``[n]`` band voxels near sharp edges (None: no sharp supervision).
        """
        n_samples = len(coords)
        if not (len(sdf) == len(block_coords) == len(block_sdf) == n_samples):
            raise ValueError("expected coords, sdf, block_coords and block_sdf with one entry per sample")
        for b in range(n_samples):
            if block_sdf[b].shape != (block_coords[b].shape[0], UPSAMPLE**3):
                raise ValueError(f"sample {b}: expected block_sdf of shape [{block_coords[b].shape[0]}, 512], got "
                                 f"{tuple(block_sdf[b].shape)}")
        x = sp.SparseTensor.from_samples([c.to(torch.int32) for c in coords],
                                         [s.float().reshape(-1, 1) for s in sdf], resolution=resolution)
        blocks = sp.SparseTensor.from_samples([c.to(torch.int32) for c in block_coords],
                                              [s.float() for s in block_sdf], resolution=resolution // UPSAMPLE)
        sharp_all = torch.cat([s.bool().reshape(-1) for s in sharp]) if sharp is not None else None
        return cls.pack(x, blocks, sharp=sharp_all, tau=tau, factor=factor)

    @classmethod
    def from_inside_bits(cls, sdf: sp.SparseTensor, blocks: sp.SparseTensor, rows: torch.Tensor,
                         inside: torch.Tensor, fill: torch.Tensor, *, sharp: torch.Tensor | None = None,
                         tau: float = 1.0, factor: float | None = None) -> PackedSDFBatch:
        """The batch whose block targets are the stored inside bits (``d3s2.data.collate_packed``'s layout).

        Args:
            sdf: band voxels, feats ``[N, 1]`` SDF at resolution R (in the units of ``tau``).
            blocks: occupied 8³ blocks at R/8 (block units), ``NB`` rows; their feats are not used.
            rows: int64 ``[N]`` each band voxel's row in the flattened ``[NB·512]`` targets.
            inside: uint8 ``[NB, 64]`` packed inside bits. fill: float ``[B]`` per-sample truncation value.
        """
        nb, n = blocks.num_voxels, sdf.num_voxels
        if blocks.resolution * UPSAMPLE != sdf.resolution:
            raise ValueError(f"expected blocks at resolution {sdf.resolution // UPSAMPLE}, got {blocks.resolution}")
        if sdf.num_channels != 1:
            raise ValueError(f"expected one SDF channel, got {sdf.num_channels}")
        if inside.dtype != torch.uint8 or inside.shape != (nb, UPSAMPLE**3 // 8):
            raise ValueError(f"expected uint8 inside of shape [{nb}, 64], got {inside.dtype} {tuple(inside.shape)}")
        if rows.shape != (n,) or fill.shape != (sdf.batch_size,):
            raise ValueError(f"expected rows [{n}] and fill [{sdf.batch_size}], got {tuple(rows.shape)} and "
                             f"{tuple(fill.shape)}")
        if sharp is not None and sharp.shape != (n,):
            raise ValueError(f"expected sharp of shape [{n}], got {tuple(sharp.shape)}")
        band_sdf = sdf.feats[:, 0].float()
        return cls(sdf.replace(sdf.feats.float() / tau), blocks, rows.long(), None if sharp is None else sharp.bool(),
                   float(tau), factor, inside, fill.float(), band_sdf)

    @property
    def num_tokens(self) -> int:
        """Encoder input voxels (what a token budget counts)."""
        return self.sdf.num_voxels

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], sparse: Callable[[sp.SparseTensor], sp.SparseTensor]
             ) -> PackedSDFBatch:
        """This batch with ``sparse`` applied to its SparseTensors and ``fn`` to its other tensors."""
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return dataclasses.replace(self, sdf=sparse(self.sdf), blocks=sparse(self.blocks), rows=fn(self.rows),
                                   sharp=opt(self.sharp), inside=opt(self.inside), fill=opt(self.fill),
                                   band_sdf=opt(self.band_sdf))

    def pin_memory(self) -> PackedSDFBatch:
        """Page-locked host copy (called by the DataLoader's ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory() if t.numel() else t, lambda x: x.pin_memory())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SparseSDFBatch:
        """The full :class:`SparseSDFBatch` on ``device`` (its per-voxel tensors built there, without host syncs)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking),
                         lambda x: x.to(device, non_blocking=non_blocking)).unpack()

    def unpack(self) -> SparseSDFBatch:
        """The full :class:`SparseSDFBatch` on this batch's device."""
        dev = self.sdf.device
        blocks = self.blocks
        local = torch.stack(torch.meshgrid(*[torch.arange(UPSAMPLE, device=dev)] * 3, indexing="ij"),
                            -1).reshape(-1, 3)  # [512, 3], z fastest
        local = torch.cat([torch.zeros_like(local[:, :1]), local], 1).to(blocks.coords.dtype)  # [512, 4] (0, l)
        # No tensor literals or scalar index_put here: on a GPU both copy from the host and synchronise.
        base = blocks.coords.clone()
        base[:, 1:] *= UPSAMPLE
        # [NB·512, 4]: block b's voxels (b, 8·block + l), blocks in order (batch order kept); one broadcast op.
        fine = (base[:, None, :] + local[None]).reshape(-1, 4)
        target_feats = (self._block_values().reshape(-1, 1) / self.tau).clamp_(-1.0, 1.0)
        target = sp.SparseTensor(target_feats, fine, resolution=self.sdf.resolution, batch_size=self.sdf.batch_size,
                                 validate=False)
        in_band = torch.zeros(target.num_voxels, dtype=torch.bool, device=dev).index_fill_(0, self.rows, True)
        sharp_mask = torch.zeros(target.num_voxels, dtype=torch.bool, device=dev)
        if self.sharp is not None:
            sharp_mask.index_copy_(0, self.rows, self.sharp)
        return SparseSDFBatch(self.sdf, target, in_band, sharp_mask, self.factor, blocks)

    def _block_values(self) -> torch.Tensor:
        """float32 ``[NB, 512]`` truncated SDF of the blocks' voxels (in the units of ``tau``)."""
        if self.inside is None:
            return self.blocks.feats.float()
        dev = self.inside.device
        shifts = (7 - torch.arange(8, device=dev)).to(torch.uint8)  # np.packbits order: the first bit is the MSB
        bits = ((self.inside[:, :, None] >> shifts) & 1).reshape(-1, UPSAMPLE**3).bool()  # [NB, 512]
        fill = self.fill[self.blocks.batch_index][:, None]  # [NB, 1]
        values = torch.where(bits, -fill, fill).reshape(-1)
        return values.index_copy_(0, self.rows, self.band_sdf).reshape(-1, UPSAMPLE**3)


@dataclass
class SparseSDFVAEOutput:
    """``decoded``: ``[M', 1]`` tanh SDF (all blocks, or one sub-volume when chunk-training);
    ``posterior``: over the latent voxels; ``latent``: the sampled (or mode) latent ``[NL, Z]``."""

    decoded: sp.SparseTensor
    posterior: DiagonalGaussian
    latent: sp.SparseTensor


# ---------------------------------------------------------------------------------------------- model
class SparseSDFVAE(nn.Module):
    """The SS-VAE. ``out = model(batch)`` then ``loss, logs = model.loss(out, batch)``."""

    Config = SparseSDFVAEConfig

    def __init__(self, config: SparseSDFVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or SparseSDFVAEConfig()
        self.encoder = SparseSDFEncoder(self.config)
        self.decoder = SparseSDFDecoder(self.config)

    def encode(self, x: sp.SparseTensor, *, factor: float | None = None, sample_posterior: bool = True,
               generator: torch.Generator | None = None,
               structure: sp.SparseTensor | None = None) -> tuple[sp.SparseTensor, DiagonalGaussian]:
        """``[N, 1]`` SDF / τ at R -> (latent ``[NL, Z]`` at R/8, posterior).

        ``structure``: the data's occupied blocks at R/8 (coords only; a superset of the band's blocks); with
        ``config.latent_structure == "blocks"`` the latent covers exactly these. None, or ``"band"``: the band's
        blocks.
        """
        use = structure if self.config.latent_structure == "blocks" else None
        params = self.encoder(x, factor=factor, structure=use)
        posterior = DiagonalGaussian(params.feats, dim=1)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return params.replace(z), posterior

    def decode(self, z: sp.SparseTensor, *, factor: float | None = None, chunk_size: int = 0,
               return_feat: bool = False) -> sp.SparseTensor | tuple[sp.SparseTensor, torch.Tensor]:
        """Latent ``[NL, Z]`` at R/8 -> ``[512·NL, 1]`` tanh SDF at R; ``chunk_size`` (latent voxels per
        chunk edge, 0 = whole) bounds the decoder's memory at 1024³ without changing the result.

        ``return_feat``: also return the decoder's last features before its output layer, ``[512·NL, C_last]``
        (32 published) in the rows of the SDF: ``(sdf, feats)``, the input of the 512³ refiner.
        """
        out = self.decoder(z, factor=factor, chunk_size=chunk_size, return_feat=return_feat)
        if not return_feat:
            return out
        return out.replace(out.feats[:, :1].contiguous()), out.feats[:, 1:]

    def decode_random_chunk(self, z: sp.SparseTensor, chunk_size: int, *, factor: float | None = None,
                            generator: torch.Generator | None = None) -> sp.SparseTensor:
        """Training-time decode of one random ``chunk_size³`` latent sub-volume (all samples, same box).

        The box contains at least one latent voxel: it is placed around a uniformly drawn latent voxel.
        """
        h = self.decoder.trunk(z, factor=factor)
        r = h.resolution
        size = min(chunk_size, r)
        pick = int(torch.randint(h.num_voxels, (1,), generator=generator))
        centre = h.coords[pick, 1:].tolist()
        jitter = torch.randint(size, (3,), generator=generator).tolist()
        lo = [min(max(c - j, 0), r - size) for c, j in zip(centre, jitter)]
        hi = [a + size for a in lo]
        out, _ = decode_region(self.decoder.upsample_head, h, lo, hi, self.config.chunk_padding)
        return out

    def forward(self, batch: SparseSDFBatch) -> SparseSDFVAEOutput:
        """Encode the band, sample the posterior (mode in eval mode), decode (one random chunk if
        ``train_chunk_size > 0`` in training mode)."""
        factor = batch.factor
        z, posterior = self.encode(batch.sdf, factor=factor, sample_posterior=self.training,
                                   structure=batch.block_structure())
        if self.training and self.config.train_chunk_size > 0:
            decoded = self.decode_random_chunk(z, self.config.train_chunk_size, factor=factor)
        else:
            decoded = self.decode(z, factor=factor)
        return SparseSDFVAEOutput(decoded, posterior, z)

    def loss(self, out: SparseSDFVAEOutput, batch: SparseSDFBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted ``L_in + L_ext + L_sharp + KL`` (paper eq. 3); see :func:`sparse_sdf_loss`."""
        return sparse_sdf_loss(out.decoded, batch.target, batch.in_band, batch.sharp, out.posterior,
                               self.config.loss)
