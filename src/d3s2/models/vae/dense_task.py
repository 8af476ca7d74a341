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

__all__ = ["DenseVAETaskConfig", "DenseVAETask", "DENSE_TASK_FILE"]

DENSE_TASK_FILE = "dense_vae_task.json"  # written beside config.json by export: the occupancy side S


@dataclasses.dataclass(kw_only=True)
class DenseVAETaskConfig:
    latents: str  # an encoded latent folder (d3s2 data encode)
    model_config: str | None = None  # YAML with model: {name, args} (e.g. configs/demo/dense_vae.yaml)
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides / inline args of the model
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

        self.cfg = config
        self.side = int(read_settings(config.latents)["latent_resolution"])

    def build_model(self) -> nn.Module:
        from ...config import load_yaml
        from ..registry import build_model

        name, args = "dense_shape_vae", {}
        if self.cfg.model_config is not None:
            model = load_yaml(self.cfg.model_config).get("model")
            if not isinstance(model, dict) or "name" not in model:
                raise ValueError(f"{self.cfg.model_config}: expected a 'model: {{name, args}}' section")
            name, args = model["name"], dict(model.get("args") or {})
        args.update(self.cfg.model_args)
        if name != "dense_shape_vae":
            raise ValueError(f"{self.cfg.model_config}: expected model name 'dense_shape_vae', got {name!r}")
        model = build_model(name, args)
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
