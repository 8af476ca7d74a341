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

from d3s2.data.build import asset_path, read_manifest

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
        8³ block with its truncated target (``SparseSDF.block_targets``), when ``with_blocks``;
        ``image`` float32 ``[4, H, W]`` RGBA in [0, 1], ``intrinsics`` float32 ``[3, 3]`` (pixels of the returned
        image), ``world_to_camera`` float32 ``[4, 4]`` (OpenCV) and ``view`` int, when ``with_image``.

    The view is ``view`` if given, else drawn from (name, seed, epoch): call :meth:`set_epoch` each epoch.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, *, split: str | None = "train",
                 val_fraction: float = 0.05, test_fraction: float = 0.05, with_blocks: bool = True,
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
                with np.load(asset_path(self.root, n)) as z:
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
        from d3s2.geometry.sdf import SparseSDF

        name = self.names[index]
        prefix = f"sdf{self.resolution}/"
        with np.load(asset_path(self.root, name), allow_pickle=False) as z:
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
