"""The ``dense_vae`` training task: the dense structure VAE on the occupancy of SS-VAE latent voxels.

The data is an encoded latent folder (``d3s2 data encode``): each asset's latent coords at ``S = R / 8`` form a
binary ``S³`` occupancy grid (32³ at 256³), which the VAE compresses to ``Z × (S / f)³`` (f = 2^(levels - 1)).
The dense DiT then generates that latent and the pipeline decodes it back to the sparse stage's token set.

Dimension legend: B batch, S occupancy side.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import keys_of
from ..registry import model_class

__all__ = ["DenseVAETaskConfig", "DenseVAETask", "DENSE_TASK_FILE"]

DENSE_TASK_FILE = "dense_vae_task.json"  # written beside config.json by export: the occupancy side S


@dataclasses.dataclass(kw_only=True)
class DenseVAETaskConfig:
    latents: str  # an encoded latent folder (d3s2 data encode)
    model_config: str | None = None  # YAML with model: {name, args} (e.g. configs/demo/dense_vae.yaml)
    model_args: dict[str, Any] = keys_of(lambda: model_class("dense_shape_vae").Config)  # overrides / inline model args
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    repeat: int = 1  # each asset this many times per epoch (short epochs restart the data workers)
    threshold: float = 0.1  # sigmoid(logit) ≥ threshold counts as occupied in the validation IoU (pipeline value)


class DenseVAETask:
    """The ``dense_vae`` task (family ``vae``): see the module docstring."""

    family = "vae"
    Config = DenseVAETaskConfig

    def __init__(self, config: DenseVAETaskConfig) -> None:
        from ...data.encode import read_settings
        from ..registry import model_config
        from .task import load_model_config

        self.cfg = config
        self.side = int(read_settings(config.latents)["latent_resolution"])
        name, args = load_model_config(config.model_config, config.model_args, default_name="dense_shape_vae")
        if name != "dense_shape_vae":
            raise ValueError(f"{config.model_config}: expected model name 'dense_shape_vae', got {name!r}")
        # Checked here, so a mistyped value fails before the trainer writes anything to the run folder.
        self.vae_config = model_config(name, args, "model.args")

    def build_model(self) -> nn.Module:
        from ..registry import build_model

        model = build_model("dense_shape_vae", self.vae_config)
        f = model.config.downsample
        if self.side % f:
            raise ValueError(f"the {self.side}³ occupancy is not divisible by the VAE's downsampling {f}")
        return model

    def _dataset(self, split: str):
        from ...data.latents import LatentDataset

        return LatentDataset(self.cfg.latents, split=split, val_fraction=self.cfg.val_fraction,
                             test_fraction=self.cfg.test_fraction, with_latents=False, with_occupancy=True,
                             occupancy_tokens=True, repeat=self.cfg.repeat if split == "train" else 1)

    def build_datasets(self):
        train = self._dataset("train")
        if len(train) == 0:
            raise ValueError(f"{self.cfg.latents}: the train split is empty")
        val = self._dataset("val")
        return train, (val if len(val) else None)

    def collate(self, items: Sequence[dict]) -> torch.Tensor:
        return torch.stack([it["occupancy"] for it in items])  # [B, 1, S, S, S]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ...train.distributed import unwrap

        out = model(batch)
        loss, logs = unwrap(model).loss(out, batch)
        return loss, {k: v for k, v in logs.items() if k != "loss"}

    def validate(self, model: nn.Module, loader: Iterable[torch.Tensor], *, step: int,
                 out_dir: Path | None) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        for occ in loader:
            out = model(occ)
            _, logs = model.loss(out, occ)
            pred = torch.sigmoid(out.logits.float()) >= self.cfg.threshold
            target = occ >= 0.5
            inter = (pred & target).flatten(1).sum(1).float()
            union = (pred | target).flatten(1).sum(1).float().clamp_min(1)
            b = occ.shape[0]
            metrics = {k: float(v) * b for k, v in logs.items()}
            metrics["iou"] = float((inter / union).sum())
            metrics["recall"] = float((inter / target.flatten(1).sum(1).float().clamp_min(1)).sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += b
        return {k: v / max(count, 1) for k, v in sums.items()}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ...fileio import atomic_write_text
        from ..registry import save_pretrained

        save_pretrained(model, out_dir)
        info = {"occupancy_resolution": self.side, "latents": str(self.cfg.latents)}
        atomic_write_text(Path(out_dir) / DENSE_TASK_FILE, json.dumps(info, indent=2) + "\n")
