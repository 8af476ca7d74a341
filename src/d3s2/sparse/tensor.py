"""The sparse voxel batch that carries tokens through every d3s2 model.

Dimension legend: N active voxels (all samples), B batch size, C channels, R resolution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _flat_keys(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """int64 [N] key b·R³ + x·R² + y·R + z; unique per voxel, ordered by batch first."""
    c = coords.long()
    r = resolution
    return ((c[:, 0] * r + c[:, 1]) * r + c[:, 2]) * r + c[:, 3]


class SparseTensor:
    """A batch of sparse voxel sets.

    Attributes:
        feats: ``[N, C]`` features, one row per active voxel.
        coords: int32 ``[N, 4]`` rows ``(batch, x, y, z)``; rows of one sample are contiguous and samples
            appear in batch order (``coords[:, 0]`` non-decreasing).
        resolution: R; every spatial coordinate is in ``[0, R)``.
        batch_size: B; a sample may have zero voxels.

    Structure-derived data (neighbour maps, window partitions, block sorts) lives in a cache dict that is
    shared by every tensor made with :meth:`replace`, because they have the same coordinates.
    """

    __slots__ = ("feats", "coords", "resolution", "batch_size", "_cache")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        *,
        resolution: int,
        batch_size: int | None = None,
        validate: bool = True,
        _cache: dict[str, Any] | None = None,
    ) -> None:
        if validate:
            _validate(feats, coords, resolution, batch_size)
        self.feats = feats
        self.coords = coords
        self.resolution = int(resolution)
        if batch_size is None:
            batch_size = int(coords[-1, 0].item()) + 1 if coords.shape[0] else 0
        self.batch_size = int(batch_size)
        self._cache = {} if _cache is None else _cache

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(
        cls,
        coords: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor],
        *,
        resolution: int,
    ) -> SparseTensor:
        """Pack per-sample ``coords [n_i, 3]`` and ``feats [n_i, C]`` into one batch."""
        if len(coords) != len(feats):
            raise ValueError(f"expected as many feats as coords, got {len(feats)} and {len(coords)}")
        if not coords:
            raise ValueError("expected at least one sample")
        rows = []
        for b, c in enumerate(coords):
            if c.ndim != 2 or c.shape[1] != 3:
                raise ValueError(f"sample {b}: expected coords of shape [n, 3], got {tuple(c.shape)}")
            bcol = torch.full((c.shape[0], 1), b, dtype=torch.int32, device=c.device)
            rows.append(torch.cat([bcol, c.to(torch.int32)], dim=1))
        return cls(torch.cat(list(feats), 0), torch.cat(rows, 0), resolution=resolution,
                   batch_size=len(coords))

    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None,
                resolution: int | None = None) -> SparseTensor:
        """Same structure (and cache) with new features; new coords start a fresh cache."""
        if coords is None:
            if feats.shape[0] != self.feats.shape[0]:
                raise ValueError(
                    f"replace(feats) keeps the structure: expected {self.feats.shape[0]} rows, got {feats.shape[0]}"
                )
            return SparseTensor(feats, self.coords, resolution=self.resolution, batch_size=self.batch_size,
                                validate=False, _cache=self._cache)
        return SparseTensor(feats, coords, resolution=resolution or self.resolution,
                            batch_size=self.batch_size, validate=False)

    # ------------------------------------------------------------------ layout
    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_counts(self) -> torch.Tensor:
        """int64 ``[B]`` voxels per sample."""
        return self.cached("batch_counts", lambda: (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long())

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[B+1]`` start offset of each sample's rows, then N."""
        def build() -> torch.Tensor:
            # Rows are sorted by batch: a binary search finds each sample's start with no host sync (a CUDA
            # bincount reads the maximum on the host).
            starts = torch.arange(self.batch_size + 1, dtype=self.coords.dtype, device=self.coords.device)
            return torch.searchsorted(self.coords[:, 0].contiguous(), starts).to(torch.int32)
        return self.cached("cu_seqlens", build)

    @property
    def max_seqlen(self) -> int:
        return self.cached("max_seqlen", lambda: int(self.batch_counts.max().item()) if self.batch_size else 0)

    @property
    def batch_index(self) -> torch.Tensor:
        """int64 ``[N]`` sample of each row."""
        return self.cached("batch_index", lambda: self.coords[:, 0].long())

    # ------------------------------------------------------------------ cache
    def cached(self, key: str, build: Callable[[], T]) -> T:
        """Return the cached structure-derived value ``key``, building it once."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def get_cache(self, key: str) -> Any:
        return self._cache.get(key)

    def set_cache(self, key: str, value: Any) -> None:
        self._cache[key] = value

    # ------------------------------------------------------------------ batches
    @staticmethod
    def cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
        """Concatenate batches: sample b of tensor i becomes sample (offset_i + b)."""
        if not tensors:
            raise ValueError("expected at least one SparseTensor")
        res = {t.resolution for t in tensors}
        if len(res) != 1:
            raise ValueError(f"expected one resolution, got {sorted(res)}")
        coords, offset = [], 0
        for t in tensors:
            c = t.coords.clone()
            c[:, 0] += offset
            coords.append(c)
            offset += t.batch_size
        return SparseTensor(torch.cat([t.feats for t in tensors]), torch.cat(coords),
                            resolution=res.pop(), batch_size=offset, validate=False)

    def unbind(self) -> list[SparseTensor]:
        """Split into B single-sample tensors (batch index reset to 0)."""
        out = []
        cu = self.cu_seqlens.tolist()
        for b in range(self.batch_size):
            c = self.coords[cu[b]: cu[b + 1]].clone()
            c[:, 0] = 0
            out.append(SparseTensor(self.feats[cu[b]: cu[b + 1]], c, resolution=self.resolution,
                                    batch_size=1, validate=False))
        return out

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """``feats.to(...)``; a device move also moves coords and the structure cache (its tensors, tuples and
        dataclasses of tensors and SparseTensors; other entries are dropped), so structure built on the host
        (e.g. in DataLoader workers) is not rebuilt on the device. ``non_blocking`` applies to every copy."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.feats.device:
            return self.replace(feats)
        non_blocking = bool(kwargs.get("non_blocking", False))
        return self._map_structure(feats, lambda t: t.to(feats.device, non_blocking=non_blocking), {})

    def pin_memory(self) -> SparseTensor:
        """A copy in page-locked host memory (feats, coords and the structure cache), for asynchronous copies to
        the GPU; the DataLoader calls it when ``pin_memory=True``."""
        def pin(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory() if t.numel() else t  # empty tensors (structure templates) have nothing to copy
        return self._map_structure(pin(self.feats), pin, {})

    def _map_structure(self, feats: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                       memo: dict[int, Any]) -> SparseTensor:
        """This tensor with ``feats``, ``fn`` applied to coords and to the tensors of the cache (shared caches stay
        shared through ``memo``)."""
        cache = memo.get(id(self._cache))
        if cache is None:
            cache = memo[id(self._cache)] = {}
            for key, value in self._cache.items():
                moved = _map_tensors(value, fn, memo)
                if moved is not _UNMOVABLE:
                    cache[key] = moved
        coords = memo.get(id(self.coords))
        if coords is None:
            coords = memo[id(self.coords)] = fn(self.coords)
        return SparseTensor(feats, coords, resolution=self.resolution, batch_size=self.batch_size, validate=False,
                            _cache=cache)

    def dense(self) -> torch.Tensor:
        """``[B, C, R, R, R]`` dense grid, zeros at inactive sites (for tests and small R only)."""
        r = self.resolution
        out = self.feats.new_zeros(self.batch_size, r, r, r, self.num_channels)
        c = self.coords.long()
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out.permute(0, 4, 1, 2, 3).contiguous()

    def __repr__(self) -> str:
        return (f"SparseTensor(N={self.num_voxels}, C={self.num_channels}, B={self.batch_size}, "
                f"R={self.resolution}, dtype={self.dtype}, device={self.device})")


_UNMOVABLE = object()


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, or ``_UNMOVABLE`` for a type it cannot walk."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = fn(value)
        return memo[id(value)]
    if isinstance(value, SparseTensor):
        return value._map_structure(_map_tensors(value.feats, fn, memo), fn, memo)
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, tuple | list):
        items = [_map_tensors(v, fn, memo) for v in value]
        return _UNMOVABLE if any(v is _UNMOVABLE for v in items) else type(value)(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _map_tensors(getattr(value, f.name), fn, memo) for f in dataclasses.fields(value)}
        if any(v is _UNMOVABLE for v in fields.values()):
            return _UNMOVABLE
        return dataclasses.replace(value, **fields)
    return _UNMOVABLE


def _validate(feats: torch.Tensor, coords: torch.Tensor, resolution: int, batch_size: int | None) -> None:
    if coords.dtype != torch.int32:
        raise ValueError(f"expected coords of dtype torch.int32, got {coords.dtype}")
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"expected coords of shape [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if feats.ndim != 2:
        raise ValueError(f"expected feats of shape [N, C], got {tuple(feats.shape)}")
    if not (feats.is_floating_point() or feats.is_complex()):
        raise ValueError(f"expected floating-point feats, got {feats.dtype}")
    if feats.shape[0] != coords.shape[0]:
        raise ValueError(f"expected one feats row per voxel: {coords.shape[0]} coords, {feats.shape[0]} feats rows")
    if feats.device != coords.device:
        raise ValueError(f"feats on {feats.device} but coords on {coords.device}")
    if resolution <= 0:
        raise ValueError(f"expected a positive resolution, got {resolution}")
    if coords.shape[0] == 0:
        return
    b = coords[:, 0]
    if bool((b[1:] < b[:-1]).any()):
        raise ValueError("coords are not sorted by batch index: the rows of each sample must be contiguous "
                         "and in batch order (sort by coords[:, 0] first)")
    if int(b[0]) < 0 or (batch_size is not None and int(b[-1]) >= batch_size):
        raise ValueError(f"batch index out of range [0, {batch_size}): got {int(b[0])}..{int(b[-1])}")
    xyz = coords[:, 1:]
    lo, hi = int(xyz.min()), int(xyz.max())
    if lo < 0 or hi >= resolution:
        raise ValueError(f"coords out of range [0, {resolution}): found values in [{lo}, {hi}]")
    keys = _flat_keys(coords, resolution)
    if bool((keys[1:] > keys[:-1]).all()):
        return  # strictly increasing keys (the usual sorted layout) cannot repeat; skips the sort below
    if torch.unique(keys).numel() != keys.numel():
        repeated = keys.numel() - torch.unique(keys).numel()
        raise ValueError(f"duplicate voxels: {repeated} repeated (batch, x, y, z) rows")
