"""A complete, tiny example task: a sparse convolutional SDF autoencoder on random spheres and boxes.

It is what tests and ``benchmarks/bench_train_step.py`` train, and a template for real tasks: a strict
``Config`` dataclass, a :class:`~d3s2.train.task.TokenDataset` with per-item token counts and key-derived
augmentation, a collate into :class:`~d3s2.sparse.SparseTensor`, a loss that calls ``model(...)`` once,
validation that writes a snapshot on rank 0, and an export in the package weight format
(``config.json`` + ``model.safetensors``).

Dimension legend: N active voxels of a batch, C channels, L latent channels, R resolution.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import sparse as sp
from .checkpoint import atomic_write, atomic_write_text
from .data import item_rng

__all__ = ["ToyConfig", "ToyShapes", "ToyAutoencoder", "ToyTask"]


@dataclasses.dataclass(kw_only=True)
class ToyConfig:
    num_train: int = 64  # random shapes in the training split
    num_val: int = 8  # shapes in the validation split (different seeds)
    resolution: int = 16  # R of the voxel grid; must be even (one 2x downsampling)
    band: float = 1.5  # voxels with |SDF| < band (in voxels) are active; features are SDF / band
    channels: int = 16  # C, width of the convolutions
    latent_channels: int = 4  # L, the bottleneck at R/2
    flip: bool = True  # random axis flips per (epoch, item): an example of resumable augmentation
    seed: int = 0  # shapes come from (seed, split, index)

    def __post_init__(self) -> None:
        if self.resolution < 4 or self.resolution % 2:
            raise ValueError(f"resolution must be even and >= 4, got {self.resolution}")
        if self.channels % 4:
            raise ValueError(f"channels must be divisible by 4 (GroupNorm groups), got {self.channels}")
        if self.num_train < 1 or self.num_val < 0 or self.band <= 0:
            raise ValueError("need num_train >= 1, num_val >= 0 and band > 0")


def _shape_sdf(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """``[R, R, R]`` signed distance (in voxels) of a random sphere or axis-aligned box, negative inside."""
    r = resolution
    grid = np.stack(np.meshgrid(*(np.arange(r) + 0.5,) * 3, indexing="ij"), -1)  # [R, R, R, 3]
    centre = rng.uniform(0.35 * r, 0.65 * r, size=3)
    if rng.random() < 0.5:
        radius = rng.uniform(0.15 * r, 0.3 * r)
        return np.linalg.norm(grid - centre, axis=-1) - radius
    half = rng.uniform(0.1 * r, 0.28 * r, size=3)
    q = np.abs(grid - centre) - half
    outside = np.linalg.norm(np.maximum(q, 0), axis=-1)
    inside = np.minimum(q.max(-1), 0)
    return outside + inside


class ToyShapes(torch.utils.data.Dataset):
    """Random SDF band shapes. Item: ``{"coords": int32 [n, 3], "feats": float32 [n, 1]}`` (SDF / band)."""

    def __init__(self, num: int, *, resolution: int, band: float, seed: int, split: int, flip: bool) -> None:
        self.resolution, self.seed, self.split, self.flip = resolution, seed, split, flip
        self.epoch = 0
        self.items = []
        for i in range(num):
            sdf = _shape_sdf(item_rng(seed, split, i), resolution)
            coords = np.argwhere(np.abs(sdf) < band).astype(np.int32)  # [n, 3]
            feats = (sdf[tuple(coords.T)] / band).astype(np.float32)[:, None]  # [n, 1]
            self.items.append((torch.from_numpy(coords), torch.from_numpy(feats)))

    def __len__(self) -> int:
        return len(self.items)

    def num_tokens(self, index: int) -> int:
        return int(self.items[index][0].shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        coords, feats = self.items[index]
        if self.flip:
            # Derived from (seed, split, epoch, index): identical in any worker and after a resume.
            axes = item_rng(self.seed, self.split, self.epoch, index).random(3) < 0.5
            coords = coords.clone()
            for a in np.flatnonzero(axes).tolist():
                coords[:, a] = self.resolution - 1 - coords[:, a]
        return {"coords": coords, "feats": feats}


class ToyAutoencoder(nn.Module):
    """SDF band → conv → mean-pool to R/2 → L-channel latent → back to every input voxel → conv → SDF.

    The decoder gives each voxel its parent's latent plus an embedding of which of the 8 children it is.
    """

    def __init__(self, *, channels: int = 16, latent_channels: int = 4) -> None:
        super().__init__()
        c = channels
        self.stem = sp.SparseLinear(1, c)
        self.encoder = nn.Sequential(sp.SparseConv3d(c, c), sp.SparseGroupNorm(4, c), sp.SparseSiLU())
        self.pool = sp.SparseDownsample(2)
        self.to_latent = nn.Sequential(sp.SparseConv3d(c, c), sp.SparseSiLU(), sp.SparseLinear(c, latent_channels))
        self.from_latent = nn.Linear(latent_channels, c)
        self.child = nn.Embedding(8, c)
        self.decoder = nn.Sequential(sp.SparseConv3d(c, c), sp.SparseGroupNorm(4, c), sp.SparseSiLU(),
                                     sp.SparseLinear(c, 1))

    def forward(self, x: sp.SparseTensor) -> sp.SparseTensor:
        z = self.to_latent(self.pool(self.encoder(self.stem(x))))  # [M parents, L]
        _, parent, _ = x.cached("down_2", lambda: sp.downsample_structure(x, 2))  # [N] parent row
        xyz = x.coords[:, 1:].long() % 2
        child = xyz[:, 0] + 2 * xyz[:, 1] + 4 * xyz[:, 2]  # [N] in 0..7
        h = self.from_latent(z.feats)[parent] + self.child(child)  # [N, C]
        return self.decoder(x.replace(h))


class ToyTask:
    """The ``toy`` task (family ``toy``): see the module docstring."""

    family = "toy"
    Config = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        self.cfg = config

    def build_model(self) -> ToyAutoencoder:
        return ToyAutoencoder(channels=self.cfg.channels, latent_channels=self.cfg.latent_channels)

    def build_datasets(self) -> tuple[ToyShapes, ToyShapes | None]:
        c = self.cfg
        train = ToyShapes(c.num_train, resolution=c.resolution, band=c.band, seed=c.seed, split=0, flip=c.flip)
        val = ToyShapes(c.num_val, resolution=c.resolution, band=c.band, seed=c.seed, split=1, flip=False)
        return train, (val if c.num_val else None)

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> sp.SparseTensor:
        return sp.SparseTensor.from_samples([it["coords"] for it in items], [it["feats"] for it in items],
                                            resolution=self.cfg.resolution)

    def loss(self, model: nn.Module, batch: sp.SparseTensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pred = model(batch).feats.float()
        target = batch.feats.float()
        mse = F.mse_loss(pred, target)
        return mse, {"mse": mse.detach(), "l1": (pred - target).abs().mean().detach()}

    def validate(self, model: nn.Module, loader: Iterable[sp.SparseTensor], *, step: int,
                 out_dir: Path | None) -> dict[str, float]:
        mse = sign = count = 0.0
        first: dict[str, Any] | None = None
        for batch in loader:
            pred = model(batch).feats.float()
            target = batch.feats.float()
            mse += F.mse_loss(pred, target, reduction="sum").item()
            sign += ((pred > 0) == (target > 0)).float().sum().item()
            count += target.numel()
            if first is None:
                first = {"coords": batch.coords.cpu().numpy(), "target": target.cpu().numpy(),
                         "pred": pred.cpu().numpy()}
        if out_dir is not None and first is not None:
            atomic_write(Path(out_dir) / "snapshot.npz", lambda f: np.savez_compressed(f, **first))
        return {"mse": mse / max(count, 1), "sign_acc": sign / max(count, 1)}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(Path(out_dir) / "model.safetensors", lambda f: f.write(save(tensors)))
        config = {"name": "toy_autoencoder", "channels": self.cfg.channels,
                  "latent_channels": self.cfg.latent_channels}
        atomic_write_text(Path(out_dir) / "config.json", json.dumps(config, indent=2) + "\n")
