"""Assemble a pipeline folder from training exports: the SS-VAE (``d3s2 train vae``), the dense VAE
(``d3s2 train dense_vae``) and the two DiTs with their own image encoders (``d3s2 train dit_dense|dit_sparse``).

The DiT exports carry their latent normalisation and sampler settings (``dit_task.json``); they become the
pipeline's :class:`~d3s2.pipeline.image_to_3d.PipelineSettings` (``dense_latent``, ``sparse_latent[R]``,
``dense``, ``sparse[R]``), and the encoders become ``conditioner_dense_dit`` / ``conditioner_sparse_dit_<R>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .image_to_3d import ImageTo3DPipeline, LatentNorm, PipelineSettings, StageSettings

__all__ = ["assemble_pipeline", "read_dit_export"]


def read_dit_export(path: str | os.PathLike, stage: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """``(dit, encoder, info)`` of a DiT task export (``dit/``, ``conditioner/``, ``dit_task.json``)."""
    from ..models.dit.task import DIT_TASK_FILE
    from ..models.registry import from_pretrained

    root = Path(path)
    info_path = root / DIT_TASK_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"expected {info_path}: a `d3s2 train dit_{stage}` export")
    info = json.loads(info_path.read_text())
    if info.get("stage") != stage:
        raise ValueError(f"{root} is a {info.get('stage')!r} DiT export, expected {stage!r}")
    return from_pretrained(root / "dit"), from_pretrained(root / "conditioner"), info


def _stage(sampler: dict[str, Any], overrides: dict[str, Any]) -> StageSettings:
    keys = ("steps", "guidance_scale", "shift", "num_train_timesteps")
    values = {k: sampler[k] for k in keys if k in sampler}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "steps" not in values:
        raise ValueError("no sampler steps in the DiT export; pass them explicitly")
    return StageSettings(**values)


def assemble_pipeline(*, sparse_vae: str | os.PathLike, dense_vae: str | os.PathLike,
                      dense_dit: str | os.PathLike, sparse_dit: str | os.PathLike, out: str | os.PathLike,
                      dtype: torch.dtype | None = torch.float16, dense_sampler: dict[str, Any] | None = None,
                      sparse_sampler: dict[str, Any] | None = None, occupancy_threshold: float | None = None
                      ) -> ImageTo3DPipeline:
    """Build the pipeline from the exports, write it to ``out`` (weights cast to ``dtype``) and return it.

    ``dense_sampler`` / ``sparse_sampler`` override the exports' sampler settings (``steps``,
    ``guidance_scale``, ``shift``; a None value keeps the export's).
    """
    from ..data.encode import load_vae
    from ..models.registry import from_pretrained

    vae, _ = load_vae(sparse_vae)
    dvae = from_pretrained(dense_vae)
    ddit, denc, dinfo = read_dit_export(dense_dit, "dense")
    sdit, senc, sinfo = read_dit_export(sparse_dit, "sparse")
    r = int(sinfo["mesh_resolution"])
    settings = PipelineSettings(
        dense=_stage(dinfo.get("sampler", {}), dense_sampler or {}),
        sparse={r: _stage(sinfo.get("sampler", {}), sparse_sampler or {})},
        dense_latent=LatentNorm(mean=dinfo["latent_mean"], std=dinfo["latent_std"]),
        sparse_latent={r: LatentNorm(mean=sinfo["latent_mean"], std=sinfo["latent_std"])},
    )
    if occupancy_threshold is not None:
        settings.occupancy_threshold = float(occupancy_threshold)
    pipe = ImageTo3DPipeline(None, ddit, dvae, {r: sdit}, {r: vae}, settings,
                             conditioners={"dense_dit": denc, f"sparse_dit_{r}": senc})
    pipe.save_pretrained(out, dtype=dtype)
    return pipe
