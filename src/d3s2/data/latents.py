"""A torch Dataset over an encoded latent folder (``d3s2 data encode``), with conditioning renders from the
built data folder it was encoded from: the training data of the dense VAE and of both DiTs.

Items are matched by asset name; the split is :func:`d3s2.data.dataset.split_of` of the name, so the DiTs hold
out exactly the assets the VAEs held out. Renders get the pipeline's own preprocessing
(:func:`d3s2.models.conditioner.preprocess_image`: crop to the alpha, composite on white, pad square, resize),
so the encoder sees at training time what it sees at generation time.

Dimension legend: n latent voxels, C latent channels, S = R / 8 latent grid side, H image side.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .build import asset_path, open_asset
from .dataset import split_of
from .encode import latent_names, load_latent, read_settings


def occupancy_grid(coords: np.ndarray, side: int) -> torch.Tensor:
    """float32 ``[1, S, S, S]``: 1 at the latent voxels ``coords [n, 3]``, 0 elsewhere."""
    grid = torch.zeros(1, side, side, side)
    c = torch.from_numpy(np.asarray(coords, np.int64))
    if len(c) and (int(c.min()) < 0 or int(c.max()) >= side):
        raise ValueError(f"expected latent coords in [0, {side}), got range [{int(c.min())}, {int(c.max())}]")
    grid[0, c[:, 0], c[:, 1], c[:, 2]] = 1.0
    return grid


class LatentDataset(Dataset):
    """Assets of an encoded latent folder, optionally with a render of the built folder.

    Each item is a dict: ``name``; ``coords`` int32 ``[n, 3]`` (lexicographic order), ``mean`` / ``logvar``
    float32 ``[n, C]`` when ``with_latents``; ``occupancy`` float32 ``[1, S, S, S]`` when ``with_occupancy``;
    ``rgb`` float32 ``[3, H, H]`` in [0, 1] and ``mask`` float32 ``[H, H]`` when ``build`` and ``image_size``
    are given (the view is drawn from (seed, epoch, repeat, name)).

    ``repeat`` lists every asset that many times per epoch (each copy with its own view), so that epochs of a
    small corpus are long enough to amortise the DataLoader start. ``num_tokens(i)`` is n (sparse latents) or
    S³ (``occupancy_tokens``, the dense models).
    """

    def __init__(self, latents: str | os.PathLike, *, build: str | os.PathLike | None = None,
                 split: str | None = "train", val_fraction: float = 0.05, test_fraction: float = 0.05,
                 image_size: int | None = None, with_latents: bool = True, with_occupancy: bool = False,
                 occupancy_tokens: bool = False, repeat: int = 1, seed: int = 0) -> None:
        self.root = Path(latents)
        self.settings = read_settings(self.root)
        self.side = int(self.settings["latent_resolution"])
        names = latent_names(self.root)
        if split is not None:
            names = [n for n in names if split_of(n, val_fraction, test_fraction) == split]
        self.build = Path(build) if build is not None else None
        if self.build is not None:
            if not (self.build / "build.json").is_file():
                raise FileNotFoundError(f"{self.build} is not a built data folder (no build.json)")
            missing = [n for n in names if not asset_path(self.build, n).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} encoded assets have no file in {self.build} (e.g. "
                                        f"{missing[0]!r}): encode the same build the renders come from")
        if repeat < 1:
            raise ValueError(f"expected repeat >= 1, got {repeat}")
        if image_size is not None and self.build is None:
            raise ValueError("images need the built data folder (build=...)")
        self.names = names
        self.image_size, self.with_latents, self.with_occupancy = image_size, with_latents, with_occupancy
        self.occupancy_tokens, self.repeat, self.seed, self.epoch = occupancy_tokens, int(repeat), int(seed), 0
        self._counts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.names) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _counts_per_asset(self) -> list[int]:
        if self._counts is None:
            self._counts = [int(load_latent(self.root, n)["coords"].shape[0]) for n in self.names]
        return self._counts

    def num_tokens(self, index: int) -> int:
        if self.occupancy_tokens:
            return self.side**3
        return self._counts_per_asset()[index % len(self.names)]

    @property
    def token_counts(self) -> list[int]:
        if self.occupancy_tokens:
            return [self.side**3] * len(self)
        return self._counts_per_asset() * self.repeat

    def _image(self, name: str, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        from ..models.conditioner import preprocess_image

        with open_asset(asset_path(self.build, name)) as z:
            if "render/png_offsets" not in z.files:
                raise ValueError(f"{name}: the built folder has no renders (built with --views 0)")
            offsets = z["render/png_offsets"]
            key = f"{self.seed}:{self.epoch}:{copy}:{name}".encode()
            v = int.from_bytes(hashlib.sha1(key).digest()[:8], "little") % (len(offsets) - 1)
            png = z["render/png"][offsets[v]:offsets[v + 1]].tobytes()
        with Image.open(io.BytesIO(png)) as im:
            rgba = np.asarray(im.convert("RGBA"))
        prepared = preprocess_image(rgba, size=self.image_size)
        return prepared.rgb, prepared.mask

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        name = self.names[index % len(self.names)]
        lat = load_latent(self.root, name)
        item: dict = {"name": name}
        if self.with_latents:
            item["coords"] = torch.from_numpy(lat["coords"].astype(np.int32))
            item["mean"] = torch.from_numpy(lat["mean"].astype(np.float32))
            item["logvar"] = torch.from_numpy(lat["logvar"].astype(np.float32))
        if self.with_occupancy:
            item["occupancy"] = occupancy_grid(lat["coords"], self.side)
        if self.image_size is not None:
            item["rgb"], item["mask"] = self._image(name, index // len(self.names))
        return item
