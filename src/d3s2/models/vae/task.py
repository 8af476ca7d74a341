"""The ``vae`` training task: the SS-VAE on a built data folder (``d3s2 data build``), at one or more resolutions.

Multi-resolution training: the train split is loaded once per resolution and every item reports its
resolution as its packing ``group``, so each micro-batch holds one resolution and the trainer's seeded batch
shuffle decides which resolution each step sees (deterministic by ``(seed, epoch)``, identical after a resume).

Validation decodes each validation shape, extracts the closed mesh (:func:`d3s2.pipeline.extract.closed_mesh`)
and compares it with the closed mesh of the shape's own block SDF targets (:func:`d3s2.geometry.metrics`).

Dimension legend: N band voxels, M decoded voxels (every voxel of every occupied 8³ block), NL latent voxels,
R resolution.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import nn
from torch.utils.data import Dataset

from ... import sparse as sp
from ...config import keys_of
from .export_info import TASK_FILE
from .sparse_sdf_vae import PackedSDFBatch, SparseSDFBatch, SparseSDFVAE, SparseSDFVAEConfig, prepare_structure

__all__ = ["SparseVAETaskConfig", "MultiResolutionDataset", "SparseVAETask", "decode_mesh", "latent_meshes",
           "target_mesh", "TASK_FILE", "load_model_config", "shape_metrics", "EMPTY_MESH_METRICS"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class SparseVAETaskConfig:
    data: str  # a built data folder (d3s2 data build)
    resolutions: list[int] = dataclasses.field(default_factory=lambda: [256])  # each must be in the folder
    model_config: str | None = None  # YAML with model: {name, args} (e.g. configs/vae/ss_vae_512.yaml)
    model_args: dict[str, Any] = keys_of(lambda: SparseSDFVAEConfig)  # overrides / inline args of the model
    band: float = 0.0  # τ in [-1, 1] units; 0 = the folder's build band
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    val_resolution: int = 0  # resolution validated at; 0 = the largest of ``resolutions``
    val_samples: int = 20_000  # surface samples per mesh for the validation metrics
    decode_chunk: int = 0  # latent voxels per decode chunk edge in validation (0 = whole shape)
    # Cost of one decoded voxel relative to one band voxel when packing micro-batches (0: pack by band voxels).
    # The decoder's 256³-level convolutions and the loss run on every voxel of every occupied 8³ block, 4-14x the
    # band voxels per 0 A.D. asset, so band voxels alone make equal-token micro-batches differ 2-3x in time.
    decode_cost: float = 1.0

    def __post_init__(self) -> None:
        if not self.resolutions or any(r % 8 or r < 8 for r in self.resolutions):
            raise ValueError(f"expected resolutions that are multiples of 8, got {self.resolutions}")
        if self.decode_cost < 0:
            raise ValueError(f"expected decode_cost >= 0, got {self.decode_cost}")
        if self.band < 0:
            raise ValueError(f"expected band >= 0, got {self.band}")
        if self.val_resolution and self.val_resolution not in self.resolutions:
            raise ValueError(f"val_resolution {self.val_resolution} is not one of {self.resolutions}")


def load_model_config(path: str | None, overrides: dict[str, Any], *, default_name: str = "sparse_sdf_vae"
                      ) -> tuple[str, dict[str, Any]]:
    """(registry name, args) from a model YAML (``model: {name, args}``; no YAML: ``default_name``) with
    ``overrides`` merged in key by key, nested sections too (:func:`d3s2.config.merge_args`)."""
    from ...config import load_yaml, merge_args

    name, args = default_name, {}
    if path is not None:
        data = load_yaml(path)
        model = data.get("model")
        if not isinstance(model, dict) or "name" not in model:
            raise ValueError(f"{path}: expected a 'model: {{name, args}}' section")
        name, args = model["name"], model.get("args") or {}
    return name, merge_args(args, overrides)


class MultiResolutionDataset(Dataset):
    """The concatenation of one :class:`~d3s2.data.SparseSDFDataset` per resolution; ``group(i)`` is R.

    ``item_costs``: the relative compute of a training step on each item, band voxels plus ``decode_cost`` per
    decoded voxel (512 per occupied 8³ block); the trainer packs micro-batches by it.
    """

    def __init__(self, parts: Sequence[Dataset], *, decode_cost: float = 0.0) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.decode_cost = float(decode_cost)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k], index - int(self.offsets[k])

    @property
    def token_counts(self) -> list[int]:
        return [c for p in self.parts for c in p.token_counts]

    def item_costs(self) -> list[float]:
        if self.decode_cost <= 0:
            return [float(c) for c in self.token_counts]
        blocks = [b for p in self.parts for b in p.block_counts]
        return [n + self.decode_cost * 512 * b for n, b in zip(self.token_counts, blocks)]

    def group(self, index: int) -> int:
        part, _ = self._locate(index)
        return part.resolution

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        part, i = self._locate(index)
        return part[i]


def decode_mesh(model: SparseSDFVAE, batch_sdf: sp.SparseTensor, *, structure: sp.SparseTensor | None = None,
                chunk_size: int = 0, factor: float | None = None) -> list[trimesh.Trimesh]:
    """Encode (posterior mode), decode and extract one closed mesh per sample, vertices in ``[-1, 1]``.

    Args:
        batch_sdf: band voxels, feats ``[N, 1]`` SDF / τ, at resolution R.
        structure: the data's occupied blocks at R/8 (see :meth:`SparseSDFVAE.encode`); None: the band's.
    """
    z, _ = model.encode(batch_sdf, factor=factor, sample_posterior=False, structure=structure)
    return latent_meshes(model, z, chunk_size=chunk_size, factor=factor)


def latent_meshes(model: SparseSDFVAE, z: sp.SparseTensor, *, chunk_size: int = 0,
                  factor: float | None = None) -> list[trimesh.Trimesh]:
    """Decode latent ``[NL, Z]`` at R/8 and extract one closed mesh per sample, vertices in ``[-1, 1]``."""
    from ...pipeline.extract import closed_mesh

    decoded = model.decode(z, factor=factor, chunk_size=chunk_size)
    return [closed_mesh(d.coords[:, 1:], d.feats[:, 0].float(), b.coords[:, 1:], decoded.resolution)
            for d, b in zip(decoded.unbind(), z.unbind())]


def unpacked(batch: SparseSDFBatch | PackedSDFBatch) -> SparseSDFBatch:
    """The full batch: a packed one (what :meth:`SparseVAETask.collate` returns) expanded on its device."""
    return batch.unpack() if isinstance(batch, PackedSDFBatch) else batch


def target_mesh(batch: SparseSDFBatch | PackedSDFBatch) -> list[trimesh.Trimesh]:
    """The closed mesh of each sample's own block SDF targets (the reference of the validation metrics)."""
    from ...pipeline.extract import closed_mesh

    meshes = []
    for t in unpacked(batch).target.unbind():
        blocks = torch.unique(t.coords[:, 1:] // 8, dim=0)
        meshes.append(closed_mesh(t.coords[:, 1:], t.feats[:, 0].float(), blocks, t.resolution))
    return meshes


# Scores of an empty reconstruction (every decoded value on one side): no surface to sample, so the worst
# value of each metric; chamfer 1.0 is half the [-1, 1] cube's edge.
EMPTY_MESH_METRICS = {"chamfer_l1": 1.0, "chamfer_l2": 1.0, "normal_consistency": 0.0, "fscore@0.01": 0.0,
                      "fscore@0.005": 0.0, "volume_iou": 0.0, "watertight": 0.0}


def shape_metrics(pred: trimesh.Trimesh, ref: trimesh.Trimesh, num_samples: int) -> dict[str, float]:
    """:func:`d3s2.geometry.metrics.mesh_metrics` plus ``empty_mesh`` (1.0 when ``pred`` has no faces, scored
    with :data:`EMPTY_MESH_METRICS`); the same keys for every shape, so means over shapes and ranks line up."""
    from ...geometry.metrics import mesh_metrics

    if len(pred.faces) == 0 or len(ref.faces) == 0:
        return {**EMPTY_MESH_METRICS, "empty_mesh": 1.0}
    return {**mesh_metrics(pred, ref, num_samples=num_samples, num_volume_points=num_samples), "empty_mesh": 0.0}


class SparseVAETask:
    """The ``vae`` task (family ``vae``): see the module docstring."""

    family = "vae"
    Config = SparseVAETaskConfig

    def __init__(self, config: SparseVAETaskConfig) -> None:
        from ..registry import model_config

        self.cfg = config
        settings_path = Path(config.data) / "build.json"
        if not settings_path.is_file():
            raise FileNotFoundError(f"{config.data} is not a built data folder (no build.json); run `d3s2 data build`")
        settings = json.loads(settings_path.read_text())
        missing = sorted(set(config.resolutions) - set(settings["resolutions"]))
        if missing:
            raise ValueError(f"{config.data} has resolutions {settings['resolutions']}, not {missing}")
        self.band = float(config.band or settings["band"])
        self.val_resolution = config.val_resolution or max(config.resolutions)
        name, model_args = load_model_config(config.model_config, config.model_args)
        if name != "sparse_sdf_vae":
            raise ValueError(f"{config.model_config}: expected model name 'sparse_sdf_vae', got {name!r}")
        # Checked here, so a mistyped value fails before the trainer writes anything to the run folder.
        self.vae_config: SparseSDFVAEConfig = model_config(name, model_args, "model.args")
        self.window_size = self.vae_config.window_size
        self.latent_structure = self.vae_config.latent_structure

    def build_model(self) -> SparseSDFVAE:
        from ..registry import build_model

        return build_model("sparse_sdf_vae", self.vae_config)

    def _dataset(self, resolution: int, split: str):
        from ...data.dataset import SparseSDFDataset

        return SparseSDFDataset(self.cfg.data, resolution, split=split, val_fraction=self.cfg.val_fraction,
                                test_fraction=self.cfg.test_fraction, with_blocks="packed", with_image=False)

    def build_datasets(self) -> tuple[MultiResolutionDataset, MultiResolutionDataset | None]:
        train = MultiResolutionDataset([self._dataset(r, "train") for r in self.cfg.resolutions],
                                       decode_cost=self.cfg.decode_cost)
        if len(train) == 0:
            raise ValueError(f"{self.cfg.data}: the train split is empty")
        val = MultiResolutionDataset([self._dataset(self.val_resolution, "val")])
        return train, (val if len(val) else None)

    def collate(self, items: Sequence[dict]) -> PackedSDFBatch:
        """The packed batch (``.to(device)`` gives the :class:`SparseSDFBatch`), structure prepared."""
        from ...data.collate import collate_packed

        c = collate_packed(items)
        batch = PackedSDFBatch.from_inside_bits(c["sdf"], c["blocks"], c["rows"], c["inside"], c["fill"],
                                                sharp=c["sharp"], tau=self.band)
        # In the DataLoader workers: no GPU syncs for it later. The latent level is the blocks' (or the band's).
        prepare_structure(batch.sdf, self.window_size,
                          structure=batch.blocks if self.latent_structure == "blocks" else None)
        return batch

    def loss(self, model: nn.Module, batch: SparseSDFBatch | PackedSDFBatch
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ...train.distributed import unwrap

        batch = unpacked(batch)
        out = model(batch)
        loss, logs = unwrap(model).loss(out, batch)
        return loss, {k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items() if k != "loss"}

    def validate(self, model: nn.Module, loader: Iterable[SparseSDFBatch], *, step: int,
                 out_dir: Path | None) -> dict[str, float]:
        from ...geometry.export import export_mesh
        sums: dict[str, float] = {}
        count = 0
        snapshot_written = False
        for batch in loader:
            batch = unpacked(batch)
            out = model(batch)
            _, logs = model.loss(out, batch)
            preds = decode_mesh(model, batch.sdf, structure=batch.block_structure(), chunk_size=self.cfg.decode_chunk,
                                factor=batch.factor)
            for pred, ref in zip(preds, target_mesh(batch)):
                metrics = {k: float(v) for k, v in logs.items() if k != "supervised"}
                metrics.update(shape_metrics(pred, ref, self.cfg.val_samples))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if out_dir is not None and not snapshot_written and len(pred.faces):
                    export_mesh(pred, Path(out_dir) / "reconstruction.glb")
                    export_mesh(ref, Path(out_dir) / "reference.glb")
                    snapshot_written = True
        return {k: v / max(count, 1) for k, v in sums.items()}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ...fileio import atomic_write_text
        from ..registry import save_pretrained

        save_pretrained(model, out_dir)
        # What reconstruct, eval vae and data encode check their inputs against (see export_info).
        info = {"band": self.band, "resolutions": list(self.cfg.resolutions), "val_fraction": self.cfg.val_fraction,
                "test_fraction": self.cfg.test_fraction}
        atomic_write_text(Path(out_dir) / TASK_FILE, json.dumps(info, indent=2) + "\n")
