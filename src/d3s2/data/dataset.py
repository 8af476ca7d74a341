"""A torch Dataset over a built data folder (``d3s2 data build``): sparse SDF samples at one resolution.

Splits are fixed by a hash of the asset name (never by order or a seed), so an asset stays in the same split
whatever the folder holds: by default 5 % ``val``, 5 % ``test``, the rest ``train``. Never tune on ``test``.

Dimension legend: N band voxels, NB occupied 8³ blocks, V views, H×W image size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from d3s2.data.build import asset_path, open_asset, read_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BLOCK_SIZE = 8


def split_of(name: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for an asset name, from a salted SHA-1 of the name."""
    u = int.from_bytes(hashlib.sha1(f"d3s2-split:{name}".encode()).digest()[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


class SparseSDFDataset(Dataset):
    """Samples of one resolution from a built data folder.

    Each sample is a dict:
        ``name`` str; ``resolution`` int R;
        ``coords`` int32 ``[N, 3]`` band voxels; ``sdf`` float32 ``[N, 1]``; ``sharp`` bool ``[N]``;
        ``block_coords`` int32 ``[NB, 3]`` and ``block_sdf`` float32 ``[NB, 512]``: every voxel of every occupied
        8³ block with its truncated target (``SparseSDF.block_targets``), when ``with_blocks`` is True;
        with ``with_blocks="packed"`` instead ``block_coords``, ``block_inside`` uint8 ``[NB, 64]`` (the stored
        packed inside bits), ``band`` float (the file's τ) and ``block_rows`` int64 ``[N]`` (each band voxel's row
        in the flattened ``[NB·512]`` targets, :func:`band_block_rows`): the same targets at 1/32 of the bytes,
        expanded where they are used (``PackedSDFBatch``), and ``sdf`` ``[N]`` (not ``[N, 1]``);
        ``image`` float32 ``[4, H, W]`` RGBA in [0, 1], ``intrinsics`` float32 ``[3, 3]`` (pixels of the returned
        image), ``world_to_camera`` float32 ``[4, 4]`` (OpenCV) and ``view`` int, when ``with_image``.

    The view is ``view`` if given, else drawn from (name, seed, epoch): call :meth:`set_epoch` each epoch.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, *, split: str | None = "train",
                 val_fraction: float = 0.05, test_fraction: float = 0.05, with_blocks: bool | str = True,
                 with_image: bool = True, image_size: int | None = None, view: int | None = None,
                 seed: int = 0) -> None:
        self.root = Path(root)
        if split is not None and split not in SPLITS:
            raise ValueError(f"expected split in {SPLITS} or None (all), got {split!r}")
        settings_path = self.root / "build.json"
        if not settings_path.exists():
            raise FileNotFoundError(f"{self.root} is not a built data folder (no build.json); run `d3s2 data build`")
        self.settings = json.loads(settings_path.read_text())
        if resolution not in self.settings["resolutions"]:
            raise ValueError(f"{self.root} has resolutions {self.settings['resolutions']}, got {resolution}")
        if with_blocks not in (True, False, "packed"):
            raise ValueError(f"expected with_blocks True, False or 'packed', got {with_blocks!r}")
        if with_image and not self.settings["views"]:
            raise ValueError(f"{self.root} was built without renders (views=0); pass with_image=False")
        self.resolution = int(resolution)
        self.with_blocks, self.with_image = with_blocks, with_image
        self.image_size, self.view, self.seed, self.epoch = image_size, view, seed, 0
        records = read_manifest(self.root)
        names = sorted({n for n, r in records.items() if r.get("status") == "ok"}
                       | {p.relative_to(self.root / "assets").as_posix()[:-4]
                          for p in (self.root / "assets").rglob("*.npz")})
        names = [n for n in names if asset_path(self.root, n).exists()]
        if split is not None:
            names = [n for n in names if split_of(n, val_fraction, test_fraction) == split]
        self.names = names
        self._records = records

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def token_counts(self) -> list[int]:
        """Band voxels N of each sample (from the manifest; read from the file when it lacks them)."""
        return self._per_sample("voxels", "sdf")

    @property
    def block_counts(self) -> list[int]:
        """Occupied 8³ blocks NB of each sample (the SS-VAE decodes NB·512 voxels; from the manifest, else the file)."""
        return self._per_sample("blocks", "block_coords")

    def _per_sample(self, stat: str, array: str) -> list[int]:
        """The manifest's ``stat`` at this resolution per sample, else the length of the file's ``sdf{R}/array``."""
        counts = []
        for n in self.names:
            value = self._records.get(n, {}).get(stat, {}).get(str(self.resolution))
            if value is None:
                with open_asset(asset_path(self.root, n)) as z:
                    value = len(z[f"sdf{self.resolution}/{array}"])
            counts.append(int(value))
        return counts

    def _view_index(self, name: str, num_views: int) -> int:
        if self.view is not None:
            if not 0 <= self.view < num_views:
                raise ValueError(f"{name}: expected view in [0, {num_views}), got {self.view}")
            return self.view
        digest = int.from_bytes(hashlib.sha1(f"{self.seed}:{self.epoch}:{name}".encode()).digest()[:8], "little")
        return digest % num_views

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        with open_asset(asset_path(self.root, name)) as z:
            if self.with_blocks == "packed":
                sample = self._packed_sample(name, z)
            else:
                sample = self._sample(name, z)
            if self.with_image:
                offsets = z["render/png_offsets"]
                v = self._view_index(name, len(offsets) - 1)
                png = z["render/png"][offsets[v]:offsets[v + 1]].tobytes()
                K = z["render/intrinsics"][v].astype(np.float32)
                sample["world_to_camera"] = torch.from_numpy(z["render/world_to_camera"][v].astype(np.float32))
                sample["view"] = v
        if self.with_image:
            image, K = _decode(png, K, self.image_size)
            sample["image"] = torch.from_numpy(image).permute(2, 0, 1).contiguous()
            sample["intrinsics"] = torch.from_numpy(K)
        return sample

    def _sample(self, name: str, z) -> dict:
        from d3s2.geometry.sdf import SparseSDF

        prefix = f"sdf{self.resolution}/"
        sdf = SparseSDF.from_arrays({k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)})
        sample: dict = {
            "name": name,
            "resolution": self.resolution,
            "coords": torch.from_numpy(np.asarray(sdf.coords, np.int32)),
            "sdf": torch.from_numpy(np.asarray(sdf.sdf, np.float32)).reshape(-1, 1),
            "sharp": torch.from_numpy(np.asarray(sdf.sharp, bool)),
        }
        if self.with_blocks:
            block_coords, block_sdf = sdf.block_targets(BLOCK_SIZE)
            sample["block_coords"] = torch.from_numpy(np.asarray(block_coords, np.int32))
            sample["block_sdf"] = torch.from_numpy(np.asarray(block_sdf, np.float32))
        return sample

    def _packed_sample(self, name: str, z) -> dict:
        """The ``with_blocks="packed"`` sample: stored arrays as they are, plus the band voxels' target rows."""
        prefix = f"sdf{self.resolution}/"
        coords = np.ascontiguousarray(z[prefix + "coords"], dtype=np.int32)
        n = int(z[prefix + "num_voxels"])
        block_coords = np.ascontiguousarray(z[prefix + "block_coords"], dtype=np.int32)
        inside = np.ascontiguousarray(z[prefix + "block_inside"], dtype=np.uint8)
        if coords.shape != (n, 3) or inside.shape != (len(block_coords), BLOCK_SIZE**3 // 8):
            raise ValueError(f"{name}: expected coords [{n}, 3] and block_inside [{len(block_coords)}, 64], got "
                             f"{list(coords.shape)} and {list(inside.shape)}")
        sdf = np.asarray(z[prefix + "sdf"], np.float32)
        if sdf.shape != (n,):
            raise ValueError(f"{name}: expected sdf [{n}], got {list(sdf.shape)}")
        rows = band_block_rows(coords, block_coords, self.resolution, name=name)
        return {
            "name": name,
            "resolution": self.resolution,
            "coords": torch.from_numpy(coords),
            "sdf": torch.from_numpy(sdf),
            "sharp": torch.from_numpy(np.unpackbits(z[prefix + "sharp"], count=n).view(bool)),
            "block_coords": torch.from_numpy(block_coords),
            "block_inside": torch.from_numpy(inside),
            "band": float(z[prefix + "band"]),
            "block_rows": torch.from_numpy(rows),
        }


def band_block_rows(coords: np.ndarray, block_coords: np.ndarray, resolution: int, *, name: str = "sample"
                    ) -> np.ndarray:
    """int64 ``[N]`` row of each band voxel in its sample's flattened block targets ``[NB·512]``: block row · 512
    + ``(lx·8 + ly)·8 + lz`` (the column order of ``SparseSDF.block_targets``).

    Also checks what a batch built from the voxels relies on (clear errors for a damaged file): coordinates in
    ``[0, R)``, sorted by ``(x, y, z)`` without repeats, every voxel inside a listed block.

    Args:
        coords: int32 ``[N, 3]`` band voxels. block_coords: int32 ``[NB, 3]`` occupied 8³ blocks (block units).
    """
    r, g = int(resolution), int(resolution) // BLOCK_SIZE
    if len(coords) == 0:
        return np.zeros(0, np.int64)
    if int(coords.min()) < 0 or int(coords.max()) >= r:
        raise ValueError(f"{name}: band voxel coordinates outside [0, {r}): {int(coords.min())}..{int(coords.max())}")
    x, y, z = coords[:, 0], coords[:, 1], coords[:, 2]
    key_type = np.int32 if r**3 < 2**31 else np.int64  # int32 arithmetic halves the memory traffic
    keys = x.astype(key_type)  # (x·R + y)·R + z, in place
    for c in (y, z):
        keys *= r
        keys += c
    if not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError(f"{name}: band voxels are not sorted by (x, y, z) without repeats")
    if len(block_coords) and (int(block_coords.min()) < 0 or int(block_coords.max()) >= g):
        raise ValueError(f"{name}: block coordinates outside [0, {g})")
    bkeys = (x >> 3).astype(key_type, copy=False)
    for c in (y, z):
        bkeys *= g
        bkeys += c >> 3
    table_keys = (block_coords[:, 0].astype(np.int64) * g + block_coords[:, 1]) * g + block_coords[:, 2]
    if not bool((table_keys[1:] > table_keys[:-1]).all()):
        raise ValueError(f"{name}: blocks are not sorted by (bx, by, bz) without repeats")
    if g**3 <= _DENSE_BLOCK_TABLE:
        # A dense block index (32³ entries at 256³): one gather per voxel instead of a binary search.
        table = np.full(g**3, -1, np.int32)
        table[table_keys] = np.arange(len(block_coords), dtype=np.int32)
        block_row = table[bkeys]
        missing = block_row < 0
    else:
        block_row = np.searchsorted(table_keys, bkeys).clip(max=max(len(table_keys) - 1, 0))
        missing = table_keys[block_row] != bkeys if len(table_keys) else np.ones(len(bkeys), bool)
    if bool(missing.any()):
        raise ValueError(f"{name}: {int(missing.sum())} band voxels lie outside the listed blocks")
    local = x & 7  # in-block column (lx·8 + ly)·8 + lz, with shifts
    for c in (y, z):
        local <<= 3
        local |= c & 7
    rows = block_row.astype(np.int64)
    rows <<= 9
    rows |= local
    return rows


# Block grids up to this many cells (R ≤ 1024) use a dense table in band_block_rows, larger ones a binary search.
_DENSE_BLOCK_TABLE = 1 << 21


def _decode(png: bytes, K: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[H, W, 4]`` in [0, 1] and K for it, resized to ``size``² if given."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGBA")
        if size is not None and im.size != (size, size):
            sx, sy = size / im.size[0], size / im.size[1]
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            K = K.copy()
            K[0] *= sx  # pixel-centre convention: u' + 0.5 = (u + 0.5) * s, so fx, cx scale by s
            K[1] *= sy
        return np.asarray(im, np.float32) / 255.0, K
