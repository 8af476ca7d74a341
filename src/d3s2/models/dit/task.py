"""The ``dit_dense`` and ``dit_sparse`` training tasks: rectified-flow DiTs conditioned on a small image encoder
trained jointly from scratch, on the latents of an encoded folder (``d3s2 data encode``) and the renders of the
built folder it came from.

- ``dit_dense``: the DenseDiT on the dense structure latent ``[Z, s, s, s]`` of each asset's latent-voxel
  occupancy ``S³`` (S = R / 8), encoded on the fly (posterior mean) by a frozen dense VAE (``dense_vae`` export).
- ``dit_sparse``: the SparseDiT on the SS-VAE latents ``[n, C]``, a fresh posterior sample each step
  (``sample_posterior``; the mean otherwise), tokens in SSA block order.

Both normalise latents per channel, ``(z - mean) / std``, with statistics of the train split (at most
``stats_items`` assets), and write them with the export so the pipeline un-normalises its samples. Condition
dropout (``cond_dropout``) zeroes the condition tokens of a sample, the unconditional input of CFG.

Export layout (``run/export``): ``dit/`` and ``conditioner/`` (registry folders) and ``dit_task.json``
(``stage``, ``mesh_resolution``, ``latent_mean``, ``latent_std``, ``sampler``, ``dense_vae``).

Dimension legend: B batch, N tokens (all samples), C latent channels, S occupancy side, s dense latent side,
H image side.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import keys_of, merge_args
from ...sparse import SparseTensor
from ..registry import model_class

__all__ = ["ConditionedDiT", "DiTTaskConfig", "DenseDiTTaskConfig", "SparseDiTTaskConfig", "DenseDiTTask",
           "SparseDiTTask", "DIT_TASK_FILE", "load_dit_yaml"]

DIT_TASK_FILE = "dit_task.json"


def load_dit_yaml(path: str | None) -> dict[str, Any]:
    """A DiT model YAML (``model: {name, args}``, ``conditioner: {name: small, sparse, args}``, ``sampler``)."""
    from ...config import load_yaml

    if path is None:
        return {}
    data = load_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: expected a 'model: {{name, args}}' section")
    return data


class ConditionedDiT(nn.Module):
    """A DiT and its image encoder as one trainable module (one ``forward`` for DDP).

    ``forward(x_t, t, rgb [B, 3, H, H], mask [B, H, H], drop [B] bool)``: encode the images, zero the dropped
    samples' condition tokens, return the DiT's velocity (same kind and shape as ``x_t``).
    """

    def __init__(self, dit: nn.Module, encoder: nn.Module) -> None:
        super().__init__()
        if encoder.out_channels != dit.config.cond_channels:
            raise ValueError(f"the encoder's width {encoder.out_channels} differs from the DiT's cond_channels "
                             f"{dit.config.cond_channels}")
        self.dit = dit
        self.encoder = encoder

    def forward(self, x: Any, t: torch.Tensor, rgb: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> Any:
        sparse = bool(getattr(self.dit.config, "sparse_conditions", False))
        cond = self.encoder.condition(rgb, mask, sparse=sparse).drop(drop)
        return self.dit(x, t, cond)


@dataclasses.dataclass(kw_only=True)
class DiTTaskConfig:
    latents: str  # encoded latent folder (d3s2 data encode)
    data: str  # the built data folder it was encoded from (renders)
    model_config: str | None = None  # DiT YAML: model, conditioner (name small), sampler
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of model.args (each stage's
    # config checks them against its model's)
    conditioner_args: dict[str, Any] = keys_of(lambda: model_class("small_image_encoder").Config)  # overrides of
    # conditioner.args
    cond_dropout: float = 0.1  # probability of training a sample unconditionally (CFG)
    t_mean: float = 0.0  # logit-normal timestep sampling: t = shift(sigmoid(N(t_mean, t_std²)), t_shift)
    t_std: float = 1.0
    t_shift: float = 1.0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    repeat: int = 1  # each asset this many times per epoch, each copy with its own view
    stats_items: int = 256  # train assets used for the latent statistics
    seed: int = 0  # view choice

    def __post_init__(self) -> None:
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"expected cond_dropout in [0, 1), got {self.cond_dropout}")
        if self.stats_items < 1:
            raise ValueError(f"expected stats_items >= 1, got {self.stats_items}")


@dataclasses.dataclass(kw_only=True)
class DenseDiTTaskConfig(DiTTaskConfig):
    dense_vae: str  # frozen dense VAE folder (`d3s2 train dense_vae` export)
    model_args: dict[str, Any] = keys_of(lambda: model_class("dense_dit").Config)  # overrides of model.args


@dataclasses.dataclass(kw_only=True)
class SparseDiTTaskConfig(DiTTaskConfig):
    sample_posterior: bool = True  # x0 = a posterior sample each step (False: the posterior mean)
    model_args: dict[str, Any] = keys_of(lambda: model_class("sparse_dit").Config)  # overrides of model.args


def _stats_device() -> torch.device:
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class _DiTTask:
    """What both DiT tasks share: model + encoder from the YAML, image data, conditioning, export."""

    family = "dit"
    stage = ""
    model_name = ""

    def __init__(self, config: DiTTaskConfig) -> None:
        from ...data.encode import read_settings
        from ..registry import model_config

        self.cfg = config
        self.settings = read_settings(config.latents)
        self.yaml = load_dit_yaml(config.model_config)
        cond = dict(self.yaml.get("conditioner") or {})
        if cond.get("name", "small") != "small":
            raise ValueError(f"{config.model_config}: the DiT tasks train the small encoder jointly; expected "
                             f"conditioner name 'small', got {cond.get('name')!r}")
        model = self.yaml.get("model", {"name": self.model_name})
        if model.get("name", self.model_name) != self.model_name:
            raise ValueError(f"{config.model_config}: expected model name {self.model_name!r}, got "
                             f"{model.get('name')!r}")
        # Checked here, so a mistyped value fails before the trainer writes anything to the run folder.
        self.dit_config = model_config(self.model_name, merge_args(model.get("args") or {}, config.model_args),
                                       "model.args")
        self.encoder_config = model_config("small_image_encoder",
                                           merge_args(cond.get("args") or {}, config.conditioner_args),
                                           "conditioner.args")
        self.sparse_conditions = cond.get("sparse", False)
        if not isinstance(self.sparse_conditions, bool):
            raise ValueError(f"{config.model_config}: conditioner.sparse: expected bool, got "
                             f"{type(self.sparse_conditions).__name__} ({self.sparse_conditions!r})")
        self.mean = torch.zeros(0)
        self.std = torch.ones(0)

    # model ----------------------------------------------------------------------------------------------
    def build_dit(self) -> nn.Module:
        from ..registry import build_model

        dit = build_model(self.model_name, self.dit_config)
        if bool(getattr(dit.config, "sparse_conditions", False)) != self.sparse_conditions:
            raise ValueError(f"{self.cfg.model_config}: conditioner.sparse = {self.sparse_conditions} but the "
                             f"model's sparse_conditions = {getattr(dit.config, 'sparse_conditions', False)}")
        return dit

    def build_model(self) -> ConditionedDiT:
        from ..registry import build_model

        dit = self.build_dit()
        encoder = build_model("small_image_encoder", self.encoder_config)
        return ConditionedDiT(dit, encoder)

    @property
    def image_size(self) -> int:
        return self.encoder_config.image_size

    # data -----------------------------------------------------------------------------------------------
    def _dataset(self, split: str, **kw: Any):
        from ...data.latents import LatentDataset

        return LatentDataset(self.cfg.latents, build=self.cfg.data, split=split, val_fraction=self.cfg.val_fraction,
                             test_fraction=self.cfg.test_fraction, image_size=self.image_size,
                             repeat=self.cfg.repeat if split == "train" else 1, seed=self.cfg.seed, **kw)

    def _datasets(self, **kw: Any):
        train = self._dataset("train", **kw)
        if len(train) == 0:
            raise ValueError(f"{self.cfg.latents}: the train split is empty")
        val = self._dataset("val", **kw)
        return train, (val if len(val) else None)

    @staticmethod
    def _images(items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([it["rgb"] for it in items]), torch.stack([it["mask"] for it in items])

    # flow -----------------------------------------------------------------------------------------------
    def normalize(self, z: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * z.ndim
        shape[channel_dim] = -1
        mean = self.mean.to(device=z.device, dtype=torch.float32).view(shape)
        std = self.std.to(device=z.device, dtype=torch.float32).view(shape)
        return (z.float() - mean) / std

    def _flow_loss(self, model: nn.Module, x0: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ...flow import cfm_loss, interpolate, model_timesteps, randn_like_latent, sample_timesteps

        rgb = batch["rgb"]
        b = rgb.shape[0]
        cfg = self.cfg
        t = sample_timesteps(b, mean=cfg.t_mean, std=cfg.t_std, shift=cfg.t_shift, device=rgb.device)
        noise = randn_like_latent(x0)
        xt = interpolate(x0, noise, t)
        drop = (torch.rand(b) < cfg.cond_dropout).to(rgb.device)
        pred = model(xt, model_timesteps(t), rgb, batch["mask"], drop)
        loss = cfm_loss(pred, x0, noise)
        return loss, {"t_mean": t.mean().detach(), "dropped": drop.float().mean()}

    def validate(self, model: nn.Module, loader: Iterable[dict], *, step: int,
                 out_dir: Path | None) -> dict[str, float]:
        """Flow loss at fixed timesteps t = 0.25, 0.5, 0.75 (conditional; seeded noise): comparable across steps."""
        from ...flow import cfm_loss, interpolate, model_timesteps, randn_like_latent

        sums: dict[str, float] = {}
        count = 0
        gen = torch.Generator().manual_seed(1234)
        for batch in loader:
            x0 = self.target(batch, sample=False)
            rgb = batch["rgb"]
            b = rgb.shape[0]
            drop = torch.zeros(b, dtype=torch.bool, device=rgb.device)
            for tv in (0.25, 0.5, 0.75):
                t = torch.full((b,), tv, device=rgb.device)
                noise = randn_like_latent(x0, gen)
                pred = model(interpolate(x0, noise, t), model_timesteps(t), rgb, batch["mask"], drop)
                key = f"loss_t{int(tv * 100)}"
                sums[key] = sums.get(key, 0.0) + float(cfm_loss(pred, x0, noise)) * b
            count += b
        out = {k: v / max(count, 1) for k, v in sums.items()}
        if out:
            out["loss"] = sum(out.values()) / len(out)
        return out

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._flow_loss(model, self.target(batch, sample=True), batch)  # target(): each subclass's x0

    # export ---------------------------------------------------------------------------------------------
    def export_info(self) -> dict[str, Any]:
        return {"stage": self.stage, "mesh_resolution": int(self.settings["resolution"]),
                "latent_mean": [float(v) for v in self.mean], "latent_std": [float(v) for v in self.std],
                "sampler": dict(self.yaml.get("sampler") or {}), "latents": str(self.cfg.latents)}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from ...fileio import atomic_write_text
        from ..registry import save_pretrained

        out = Path(out_dir)
        save_pretrained(model.dit, out / "dit")
        save_pretrained(model.encoder, out / "conditioner")
        atomic_write_text(out / DIT_TASK_FILE, json.dumps(self.export_info(), indent=2) + "\n")


def _stats_subset(n: int, k: int) -> list[int]:
    """``min(n, k)`` evenly spread indices of ``n`` (deterministic)."""
    if n <= k:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


class DenseDiTTask(_DiTTask):
    """``dit_dense`` (family ``dit``): see the module docstring."""

    Config = DenseDiTTaskConfig
    stage = "dense"
    model_name = "dense_dit"

    def __init__(self, config: DenseDiTTaskConfig) -> None:
        from ..registry import from_pretrained

        super().__init__(config)
        self.vae = from_pretrained(config.dense_vae).requires_grad_(False)
        if type(self.vae).__name__ != "DenseShapeVAE":
            raise ValueError(f"{config.dense_vae} holds a {type(self.vae).__name__}, expected a DenseShapeVAE")
        side = int(self.settings["latent_resolution"])
        if side % self.vae.config.downsample:
            raise ValueError(f"the {side}³ occupancy is not divisible by the dense VAE's downsampling "
                             f"{self.vae.config.downsample}")
        self.latent_side = side // self.vae.config.downsample
        self.mean, self.std = self._statistics()

    def build_dit(self) -> nn.Module:
        dit = super().build_dit()
        if dit.config.resolution != self.latent_side or dit.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"the dense DiT takes [{dit.config.in_channels}, {dit.config.resolution}³] latents; the "
                             f"dense VAE makes [{self.vae.config.latent_channels}, {self.latent_side}³]")
        return dit

    def _encode(self, occupancy: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``[B, Z, s, s, s]`` (float32) of occupancy ``[B, 1, S, S, S]``, on its device."""
        if self.vae.encoder.input_layer.weight.device != occupancy.device:
            self.vae.to(occupancy.device)
        with torch.no_grad():
            z, _ = self.vae.encode(occupancy, sample_posterior=False)
        return z.float()

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ...data.latents import LatentDataset

        ds = LatentDataset(self.cfg.latents, split="train", val_fraction=self.cfg.val_fraction,
                           test_fraction=self.cfg.test_fraction, with_latents=False, with_occupancy=True)
        if len(ds) == 0:
            raise ValueError(f"{self.cfg.latents}: the train split is empty")
        idx = _stats_subset(len(ds), self.cfg.stats_items)
        device = _stats_device()
        zs = []
        for start in range(0, len(idx), 64):
            occ = torch.stack([ds[i]["occupancy"] for i in idx[start:start + 64]]).to(device)
            zs.append(self._encode(occ).cpu())
        self.vae.to("cpu")
        z = torch.cat(zs).transpose(0, 1).reshape(self.vae.config.latent_channels, -1)  # [Z, B·s³]
        return z.mean(1), z.std(1).clamp_min(1e-4)

    def build_datasets(self):
        return self._datasets(with_latents=False, with_occupancy=True, occupancy_tokens=True)

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        rgb, mask = self._images(items)
        return {"occupancy": torch.stack([it["occupancy"] for it in items]), "rgb": rgb, "mask": mask}

    def target(self, batch: dict, *, sample: bool) -> torch.Tensor:
        return self.normalize(self._encode(batch["occupancy"]), 1)

    def export_info(self) -> dict[str, Any]:
        return {**super().export_info(), "dense_vae": str(self.cfg.dense_vae)}


class SparseDiTTask(_DiTTask):
    """``dit_sparse`` (family ``dit``): see the module docstring."""

    Config = SparseDiTTaskConfig
    stage = "sparse"
    model_name = "sparse_dit"

    def __init__(self, config: SparseDiTTaskConfig) -> None:
        super().__init__(config)
        self.block_size = self.dit_config.selection_block_size  # SSA m_slc: the collate sorts tokens by it
        self.mean, self.std = self._statistics()

    def build_dit(self) -> nn.Module:
        dit = super().build_dit()
        s = self.settings
        if dit.config.resolution != s["latent_resolution"] or dit.config.in_channels != s["channels"]:
            raise ValueError(f"the sparse DiT takes {dit.config.in_channels}-channel latents on a "
                             f"{dit.config.resolution}³ grid; {self.cfg.latents} has {s['channels']} channels on "
                             f"{s['latent_resolution']}³")
        return dit

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ...data.encode import load_latent
        from ...data.latents import LatentDataset

        ds = LatentDataset(self.cfg.latents, split="train", val_fraction=self.cfg.val_fraction,
                           test_fraction=self.cfg.test_fraction)
        if len(ds) == 0:
            raise ValueError(f"{self.cfg.latents}: the train split is empty")
        total = torch.zeros(int(self.settings["channels"]), dtype=torch.float64)
        sq = torch.zeros_like(total)
        noise = torch.zeros_like(total)
        n = 0
        for i in _stats_subset(len(ds), self.cfg.stats_items):
            lat = load_latent(ds.root, ds.names[i])
            m = torch.from_numpy(lat["mean"]).double()  # [n, C]
            total += m.sum(0)
            sq += (m * m).sum(0)
            noise += torch.from_numpy(lat["logvar"]).double().exp().sum(0)
            n += m.shape[0]
        mean = total / max(n, 1)
        var = (sq / max(n, 1) - mean * mean).clamp_min(0)
        if self.cfg.sample_posterior:  # the training targets are posterior samples: add E[σ²]
            var = var + noise / max(n, 1)
        return mean.float(), var.sqrt().float().clamp_min(1e-4)

    def build_datasets(self):
        return self._datasets()

    def collate(self, items: Sequence[dict]) -> dict[str, Any]:
        from ...sparse.serialize import sort_by_blocks

        res = int(self.settings["latent_resolution"])
        feats = [torch.cat([it["mean"], it["logvar"]], 1) for it in items]  # [n, 2C]
        x = SparseTensor.from_samples([it["coords"] for it in items], feats, resolution=res)
        x = sort_by_blocks(x, self.block_size)  # the order SSA requires (as in the pipeline)
        rgb, mask = self._images(items)
        return {"x": x, "rgb": rgb, "mask": mask}

    def target(self, batch: dict, *, sample: bool) -> SparseTensor:
        x = batch["x"]
        mean, logvar = x.feats.float().chunk(2, dim=1)
        z = mean
        if sample and self.cfg.sample_posterior:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return x.replace(self.normalize(z, 1))
