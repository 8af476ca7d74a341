"""Image → watertight mesh: the Direct3D-S2 inference pipeline.

Stages (one tqdm bar over them, one per flow sampler):

1. **prepare**: the conditioner's published preprocessing (alpha → crop → pad square → resize), 1 × 3 × S².
2. **condition**: encoder tokens; dense ``[1, T, C]`` for every DiT, or foreground tokens with coords for a
   DiT with ``sparse_conditions``. The unconditional input is zero tokens with the same mask and coords.
3. **dense**: Euler + CFG on the ``Z × s³`` structure latent, dense VAE decode → occupancy logits at ``4s``
   (64³ published), ``sigmoid ≥ occupancy_threshold`` → latent coords of the first sparse stage.
4. **sparse R₀** (512³ published): tokens sorted by blocks (SSA order), Euler + CFG on ``[N, 16]`` latents,
   SS-VAE decode (chunked when asked) → :func:`~d3s2.pipeline.extract.closed_mesh`.
5. **cascade R₁** (1024³, optional): the latent index of the R₀ mesh from a sparse band computation
   (:func:`~d3s2.geometry.sdf.compute_sparse_sdf` at R₁; its occupied 8³ blocks are the tokens, never a dense
   R₁³ grid), sparse DiT R₁, chunked decode, closed mesh.
6. **post**: drop tiny floating components, optional decimation to N faces. Vertices in ``[-1, 1]``.

Weights (:mod:`d3s2.pipeline.residency`): on CUDA only the running model and the next two of the call are on the
GPU, the next ones copied in from page-locked host memory on a side stream while the current one computes
(``residency="resident"`` keeps them all there; ``low_vram`` holds only the running one).

Refiners (``settings.refine``, on for folders converted from the published checkpoints): after a stage's decode,
a :class:`~d3s2.models.refiner.VoxelRefinerXL` (published: 512³) replaces the decoded SDF by its refined values
(from the SDF and the decoder's 32-channel features, ``decode(return_feat=True)``) and the mesh is taken at
``refine_level``; a :class:`~d3s2.models.refiner.VoxelRefinerXLSign` (published: 1024³) predicts inside/outside,
which decides the side of enclosed empty regions in :func:`~d3s2.pipeline.extract.closed_mesh` (the published
code meshes a dense grid; here only the decoded voxels plus a one-voxel halo, so the mesh stays closed and no
R³ grid is built). Patches of the 512³ refiner that hold no decoded voxel are skipped.

A pipeline folder holds ``pipeline.json`` and one sub-folder per component, each written with
:func:`d3s2.models.registry.save_pretrained` (a DINOv2 conditioner is saved in Hugging Face format). Components:
``conditioner``, ``dense_dit``, ``dense_vae``, ``sparse_dit_<R>`` and ``sparse_vae_<R>`` per mesh resolution R, and
optionally ``refiner_<R>`` (``refiner`` alone = 512, the published name).
A DiT trained with its own image encoder (the small from-scratch encoders of ``d3s2 train dit_dense|dit_sparse``)
has it as ``conditioner_<dit component>`` (``conditioner_dense_dit``, ``conditioner_sparse_dit_<R>``); a DiT
without one uses ``conditioner``, which may then be absent. Each encoder sees the input image prepared at its own
size. DiTs trained on normalised latents (``(z - mean) / std`` per channel) have the statistics in the settings
(``dense_latent``, ``sparse_latent[R]``); samples are un-normalised before the VAE decodes them.
The folders ``d3s2 convert`` writes from the published checkpoints use the same names (their ``defaults``
become the settings, refiners on; the DINOv2 conditioner is passed separately).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import nn
from tqdm.auto import tqdm

from ..fileio import atomic_dir
from ..models.dit.condition import ConditionTokens
from .residency import RESIDENCY, WeightResidency

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
FORMAT = "d3s2-image-to-3d"
_SPARSE_NAME = re.compile(r"^sparse_(dit|vae)_(\d+)$")
_REFINER_NAME = re.compile(r"^refiner(?:_(\d+))?$")  # "refiner" alone: the published 512³ one
_OWN_PREFIX = "conditioner_"  # conditioner_<DiT component>: that DiT's own image encoder
# torch.Generator takes seeds below 2**64 and stage i seeds seed + i: any seed below 2**63 works for every stage.
MAX_SEED = 2**63 - 1


# ------------------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class StageSettings:
    """Euler + CFG settings of one flow stage (diffusers ``FlowMatchEulerDiscreteScheduler`` schedule)."""

    steps: int
    guidance_scale: float = 7.0
    shift: float = 1.0
    num_train_timesteps: int = 1000


def _published_sparse(resolution: int) -> StageSettings:
    # Published: 30 steps shift 6 at 512³, 15 steps shift 8 at 1024³; CFG 7 everywhere.
    return StageSettings(steps=30, shift=6.0) if resolution <= 512 else StageSettings(steps=15, shift=8.0)


@dataclass(kw_only=True)
class LatentNorm:
    """Per-channel statistics a DiT's latents were normalised with: the DiT samples ``(z - mean) / std``."""

    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"expected equal non-empty mean and std lists, got {len(self.mean)} and {len(self.std)}")

    def denormalize(self, z: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``z · std + mean`` along ``channel_dim`` (float32 arithmetic, ``z``'s dtype back)."""
        if z.shape[channel_dim] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} channels on dim {channel_dim}, got {tuple(z.shape)}")
        shape = [1] * z.ndim
        shape[channel_dim] = -1
        mean = torch.tensor(self.mean, device=z.device).view(shape)
        std = torch.tensor(self.std, device=z.device).view(shape)
        return (z.float() * std + mean).to(z.dtype)


@dataclass(kw_only=True)
class PipelineSettings:
    """Everything the pipeline runs with besides the weights. Defaults are the published ones.

    ``sparse`` and ``decode_chunk`` are keyed by mesh resolution (512, 1024); a missing entry uses the published
    settings for that resolution (``decode_chunk``: 0 = decode whole, else latent voxels per chunk edge).
    """

    dense: StageSettings = field(default_factory=lambda: StageSettings(steps=50, shift=6.0))
    sparse: dict[int, StageSettings] = field(default_factory=dict)
    occupancy_threshold: float = 0.1  # sigmoid(dense VAE logit) ≥ this → occupied latent voxel
    mc_level: float = 0.0  # iso level of the decoded SDF / τ
    index_band_voxels: float = 4.0  # cascade index: voxels closer than this many voxels of R₁ to the R₀ mesh
    decode_chunk: dict[int, int] = field(default_factory=dict)
    min_component_fraction: float = 0.01  # drop components with fewer faces than this × the largest one's
    refine: bool = False  # apply the refiners (published folders); d3s2's own models have none
    refine_level: float = 0.4  # iso level on a VoxelRefinerXL's tanh output (published: 2 × mc_threshold)
    dense_latent: LatentNorm | None = None  # the dense DiT's latent normalisation (None: raw latents)
    sparse_latent: dict[int, LatentNorm] = field(default_factory=dict)  # per mesh resolution

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError for a value no run can use (fields may be assigned later: every call checks again)."""
        # sigmoid ≥ 1 holds nowhere; 0 keeps the whole grid (a full structure, for tests), as below 0 would.
        if not 0.0 <= self.occupancy_threshold < 1.0:
            raise ValueError(f"expected occupancy_threshold in [0, 1) (a level on sigmoid(logit)), got "
                             f"{self.occupancy_threshold}")

    def stage(self, resolution: int) -> StageSettings:
        return self.sparse.get(resolution) or _published_sparse(resolution)

    def chunk(self, resolution: int) -> int:
        # Published: the 1024 VAE decodes in 4 chunks per axis of the 128³ latent grid = 32 latent voxels.
        return self.decode_chunk.get(resolution, 32 if resolution >= 1024 else 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sparse"] = {str(k): v for k, v in d["sparse"].items()}
        d["decode_chunk"] = {str(k): v for k, v in d["decode_chunk"].items()}
        d["sparse_latent"] = {str(k): v for k, v in d["sparse_latent"].items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"pipeline settings: unknown keys {unknown}; expected some of {sorted(known)}")
        kw = dict(d)
        if "dense" in kw:
            kw["dense"] = StageSettings(**kw["dense"])
        kw["sparse"] = {int(k): StageSettings(**v) for k, v in kw.get("sparse", {}).items()}
        kw["decode_chunk"] = {int(k): int(v) for k, v in kw.get("decode_chunk", {}).items()}
        if kw.get("dense_latent") is not None:
            kw["dense_latent"] = LatentNorm(**kw["dense_latent"])
        kw["sparse_latent"] = {int(k): LatentNorm(**v) for k, v in kw.get("sparse_latent", {}).items()}
        return cls(**kw)

    @classmethod
    def from_published(cls, defaults: Any) -> PipelineSettings:
        """From the published helper's ``PublishedDefaults`` (or its ``to_dict()``)."""
        d = defaults.to_dict() if hasattr(defaults, "to_dict") else dict(defaults)

        def stage(x: Any) -> StageSettings:
            x = dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x)
            return StageSettings(**{k: x[k] for k in ("steps", "guidance_scale", "shift", "num_train_timesteps")
                                    if k in x})

        # PublishedDefaults.sparse_1024_decode_chunk is already in d3s2 units (latent voxels per chunk edge).
        chunk = int(d.get("sparse_1024_decode_chunk", 32))
        return cls(dense=stage(d["dense"]), sparse={512: stage(d["sparse_512"]), 1024: stage(d["sparse_1024"])},
                   occupancy_threshold=float(d.get("occupancy_threshold", 0.1)),
                   mc_level=float(d.get("mc_threshold", 0.0)),
                   index_band_voxels=float(d.get("index_udf_voxels", 4.0)),
                   decode_chunk={1024: max(chunk, 0)},
                   refine=True, refine_level=float(d.get("refiner_512_level", 0.4)))


# ------------------------------------------------------------------------------------------------ pipeline
@dataclass
class StageTiming:
    """Seconds per stage of the last call (CUDA-synchronised), and tokens per sparse stage."""

    seconds: dict[str, float] = field(default_factory=dict)  # stages, plus "decode R", "refine R", "mesh R", "index R"
    tokens: dict[int, int] = field(default_factory=dict)  # latent tokens per sparse stage
    voxels: dict[int, int] = field(default_factory=dict)  # decoded voxels per sparse stage
    # CUDA only: max allocated bytes during each entry of ``seconds`` ("total": the whole call, weights included).
    # Measuring resets torch.cuda's peak memory statistics.
    peak_bytes: dict[str, int] = field(default_factory=dict)


class ImageTo3DPipeline:
    """Image → watertight ``trimesh.Trimesh`` in ``[-1, 1]³``.

    Args:
        conditioner: an :class:`~d3s2.models.conditioner.ImageEncoder` (DINOv2 or the small encoder) for every
            DiT without its own; None when ``conditioners`` covers every DiT.
        dense_dit / dense_vae: the structure stage (:class:`DenseDiT`, :class:`DenseShapeVAE`).
        sparse_dits / sparse_vaes: ``{mesh resolution: module}``, e.g. ``{512: ..., 1024: ...}``; the lowest
            resolution takes its tokens from the dense stage, higher ones cascade from the previous mesh.
        settings: :class:`PipelineSettings` (published defaults when None).
        refiners: ``{mesh resolution: VoxelRefinerXL | VoxelRefinerXLSign}``, used when ``settings.refine``.
        conditioners: per-DiT encoders ``{"dense_dit" | "sparse_dit_<R>": encoder}`` (DiTs trained jointly with
            their own encoder).

    Modules built any way (random, :func:`~d3s2.models.registry.from_pretrained`, the published loaders) work.
    """

    def __init__(self, conditioner: nn.Module | None, dense_dit: nn.Module, dense_vae: nn.Module,
                 sparse_dits: Mapping[int, nn.Module], sparse_vaes: Mapping[int, nn.Module],
                 settings: PipelineSettings | None = None, refiners: Mapping[int, nn.Module] | None = None,
                 conditioners: Mapping[str, nn.Module] | None = None) -> None:
        if not sparse_dits:
            raise ValueError("expected at least one sparse stage (sparse_dits), got none")
        if set(sparse_dits) != set(sparse_vaes):
            raise ValueError(f"expected a VAE for every sparse DiT resolution, got DiTs {sorted(sparse_dits)} "
                             f"and VAEs {sorted(sparse_vaes)}")
        _check_kinds(conditioner, conditioners, dense_dit, dense_vae, sparse_dits, sparse_vaes)
        for r, dit in sparse_dits.items():
            if r != dit.config.resolution * 8:
                raise ValueError(f"sparse DiT for {r}³ has a {dit.config.resolution}³ latent grid; expected "
                                 f"{r // 8}³")
        dit_names = ["dense_dit", *[f"sparse_dit_{r}" for r in sorted(sparse_dits)]]
        conditioners = dict(conditioners or {})
        unknown = sorted(set(conditioners) - set(dit_names))
        if unknown:
            raise ValueError(f"conditioners for unknown DiTs {unknown}; expected keys among {dit_names}")
        uncovered = [n for n in dit_names if n not in conditioners]
        if conditioner is None and uncovered:
            raise ValueError(f"no conditioner for {uncovered}: pass conditioner= or conditioners[...]")
        self.conditioner = conditioner.eval() if conditioner is not None else None
        self.conditioners = {k: m.eval() for k, m in conditioners.items()}
        self.dense_dit = dense_dit.eval()
        self.dense_vae = dense_vae.eval()
        self.sparse_dits = {int(r): m.eval() for r, m in sorted(sparse_dits.items())}
        self.sparse_vaes = {int(r): m.eval() for r, m in sorted(sparse_vaes.items())}
        self.refiners = {int(r): m.eval() for r, m in sorted((refiners or {}).items())}
        for r, m in self.refiners.items():
            _check_refiner(r, m, self.sparse_vaes.get(r))
        self.settings = settings or PipelineSettings()
        self.low_vram = False  # shorthand for residency "low_vram"
        # Where the weights live during a call (see d3s2.pipeline.residency): None = "prefetch" on CUDA (only the
        # running model and the next two on the GPU, brought in on a side stream), "resident" elsewhere.
        self.residency: str | None = None
        self.weights = WeightResidency()
        self.cuda_graphs: bool | None = None  # replay sampling steps from CUDA graphs; None: $D3S2_CUDA_GRAPHS (on)
        self.last_timing = StageTiming()
        self._peak_floors: list[int] = []  # peaks of the enclosing _timed blocks (CUDA)
        base = self.resolutions[0] // 8
        occ = dense_dit.config.resolution * dense_vae.config.downsample
        if occ != base:
            raise ValueError(f"the dense stage decodes a {occ}³ occupancy but the {self.resolutions[0]}³ sparse "
                             f"stage needs a {base}³ latent grid")

    @property
    def resolutions(self) -> list[int]:
        """Mesh resolutions this pipeline can produce, ascending."""
        return sorted(self.sparse_dits)

    def components(self) -> dict[str, nn.Module]:
        out = {} if self.conditioner is None else {"conditioner": self.conditioner}
        out.update({"dense_dit": self.dense_dit, "dense_vae": self.dense_vae})
        for r in self.resolutions:
            out[f"sparse_dit_{r}"] = self.sparse_dits[r]
            out[f"sparse_vae_{r}"] = self.sparse_vaes[r]
        for r, m in self.refiners.items():
            out["refiner" if r == 512 else f"refiner_{r}"] = m
        out.update({f"{_OWN_PREFIX}{k}": m for k, m in self.conditioners.items()})
        return out

    def encoder_for(self, dit_name: str) -> nn.Module:
        """The image encoder of DiT component ``dit_name`` (its own, else the shared ``conditioner``)."""
        return self.conditioners.get(dit_name, self.conditioner)

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_components(cls, models: Mapping[str, nn.Module], *, conditioner: nn.Module | None = None,
                        settings: PipelineSettings | None = None) -> ImageTo3DPipeline:
        """From ``{component name: module}`` (e.g. ``load_published(...).models``); refiners are kept under
        their resolution (``refiner`` = 512, ``refiner_<R>``); unknown names are ignored with a log line."""
        sparse: dict[str, dict[int, nn.Module]] = {"dit": {}, "vae": {}}
        refiners: dict[int, nn.Module] = {}
        own: dict[str, nn.Module] = {}
        for name, module in models.items():
            m = _SPARSE_NAME.match(name)
            ref = _REFINER_NAME.match(name)
            if m:
                sparse[m.group(1)][int(m.group(2))] = module
            elif ref:
                refiners[int(ref.group(1) or 512)] = module
            elif name.startswith(_OWN_PREFIX):
                own[name[len(_OWN_PREFIX):]] = module
            elif name not in ("conditioner", "dense_dit", "dense_vae"):
                logger.info("not using component %s", name)
        conditioner = conditioner if conditioner is not None else models.get("conditioner")
        missing = [n for n in ("dense_dit", "dense_vae") if n not in models]
        dit_names = ["dense_dit", *[f"sparse_dit_{r}" for r in sparse["dit"]]]
        if conditioner is None and any(n not in own for n in dit_names):
            missing.insert(0, "conditioner")
        if missing:
            raise ValueError(f"missing pipeline components {missing}; got {sorted(models)}")
        refiners = {r: m for r, m in refiners.items() if r in sparse["dit"]}  # stages not loaded have no use
        return cls(conditioner, models["dense_dit"], models["dense_vae"], sparse["dit"], sparse["vae"], settings,
                   refiners, conditioners=own)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, conditioner: str | os.PathLike | nn.Module | None = None,
                        resolutions: list[int] | None = None, dtype: torch.dtype | None = None,
                        progress: bool = True) -> ImageTo3DPipeline:
        """Load a pipeline folder (``pipeline.json`` + component folders) on the CPU.

        ``conditioner`` overrides or supplies the image encoder: a module, a DINOv2 Hugging Face folder or a
        torch-hub ``.pth`` file (folders converted from the published checkpoints hold no encoder).
        ``resolutions`` loads only the sparse stages up to the highest one listed, each one of the folder's
        (:func:`read_resolutions`). Refiners are loaded only when the settings apply them (``refine``, on for
        converted published folders). ``progress``: a bar over the components while they load.
        """
        from ..models.registry import from_pretrained

        root = Path(directory)
        path = root / PIPELINE_FILE
        manifest = _read_manifest(root)
        available = _manifest_resolutions(manifest)
        unknown = sorted(set(resolutions or []) - set(available))
        if unknown:
            raise ValueError(f"expected resolutions among {available} for {root}, got {unknown}")
        if "settings" in manifest:
            settings = PipelineSettings.from_dict(manifest["settings"])
        elif "defaults" in manifest:  # a folder converted from the published checkpoints
            settings = PipelineSettings.from_published(manifest["defaults"])
        else:
            settings = PipelineSettings()
        names = list(manifest["components"])
        if resolutions:
            top = max(resolutions)

            def above(n: str) -> bool:
                m = _SPARSE_NAME.match(n.removeprefix(_OWN_PREFIX))
                ref = _REFINER_NAME.match(n)
                return (m is not None and int(m.group(2)) > top) or (ref is not None and int(ref.group(1) or 512) > top)
            names = [n for n in names if not above(n)]
        if not settings.refine:
            names = [n for n in names if not _REFINER_NAME.match(n)]
        # What is missing is named before any weights load (a published 1024³ pipeline takes a while to).
        own = {n[len(_OWN_PREFIX):] for n in names if n.startswith(_OWN_PREFIX)}
        dits = [n for n in names if n == "dense_dit" or n.startswith("sparse_dit_")]
        if conditioner is None and "conditioner" not in names and any(n not in own for n in dits):
            raise FileNotFoundError(f"{root} holds no conditioner: pass conditioner= (a DINOv2 Hugging Face folder "
                                    "or dinov2_vitl14_reg4_pretrain.pth; CLI: --conditioner)")
        encoders = {n for n in names if n.startswith(_OWN_PREFIX) or (n == "conditioner" and conditioner is None)}
        loading = [n for n in names if n in encoders or n in ("dense_dit", "dense_vae") or _SPARSE_NAME.match(n)
                   or _REFINER_NAME.match(n)]
        for name in names:
            if name not in loading and name != "conditioner":
                logger.info("not loading component %s", name)
            elif name in loading and not (root / name).is_dir():
                raise FileNotFoundError(f"{path} lists component {name!r} but {root / name} is missing")
        if conditioner is not None and not isinstance(conditioner, nn.Module):
            conditioner = load_conditioner(conditioner)
        models: dict[str, nn.Module] = {}
        for name in tqdm(loading, desc="loading", leave=False, disable=not progress or len(loading) < 3):
            sub = root / name
            models[name] = load_conditioner(sub) if name in encoders else from_pretrained(sub, dtype=dtype)
        return cls.from_components(models, conditioner=conditioner, settings=settings)

    def save_pretrained(self, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the folder :meth:`from_pretrained` reads; the whole folder is replaced atomically."""
        from ..models.conditioner import DinoV2Encoder
        from ..models.registry import save_pretrained

        out = Path(directory)
        self.weights.release()  # packed weights share one buffer per model: give every tensor its own storage
        with atomic_dir(out) as tmp:
            for name, module in self.components().items():
                if isinstance(module, DinoV2Encoder):
                    module.model.save_pretrained(tmp / name, safe_serialization=True)
                else:
                    save_pretrained(module, tmp / name, dtype=dtype)
            manifest = {"format": FORMAT, "components": list(self.components()),
                        "settings": self.settings.to_dict()}
            (tmp / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    # -------------------------------------------------------------------------------------------- running
    def __call__(self, image: Any, *, resolution: int | None = None, seed: int = 0, steps: int | None = None,
                 cfg: float | None = None, faces: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True, low_vram: bool | None = None,
                 residency: str | None = None, structure: Mapping[int, torch.Tensor] | None = None,
                 on_stage: Callable[[str, int, int], None] | None = None) -> trimesh.Trimesh:
        """Generate a mesh from ``image`` (path, PIL image or uint8 ``[H, W, 3|4]``; RGBA preferred).

        Args:
            resolution: mesh resolution, one of :attr:`resolutions` (default: the highest).
            seed: in [0, :data:`MAX_SEED`]; the same seed, inputs and device give the same mesh.
            steps / cfg: override every stage's step count (≥ 1) / guidance scale (finite, ≥ 0; 0 is the
                unconditional prediction). None keeps each stage's.
            faces: decimate to about this many faces.
            device: default CUDA when available. dtype: default bf16 on CUDA, float32 on the CPU.
            low_vram: keep models on the CPU and move each to the device only while it runs (residency
                ``"low_vram"``; default :attr:`low_vram`).
            residency: where the weights live during the call, one of :data:`~d3s2.pipeline.residency.RESIDENCY`
                (default :attr:`residency`; None: ``"prefetch"`` on CUDA, ``"resident"`` elsewhere).
                ``"prefetch"`` keeps on the device only the running model and the next two, copied in ahead on
                a side stream; ``"resident"`` keeps every model the call uses on the device (the opt-out).
            structure: ``{mesh resolution: int [N, 3] latent coords}`` used instead of that stage's own token
                set (the dense structure or the cascade index), e.g. a known layout for benchmarks; the dense
                stage still runs.
            on_stage: called as ``on_stage(name, index, total)`` when each stage starts (progress reports; an
                exception it raises stops the run, e.g. a timeout).
        """
        resolution = self.resolutions[-1] if resolution is None else int(resolution)
        if resolution not in self.resolutions:
            raise ValueError(f"expected resolution in {self.resolutions}, got {resolution}")
        if faces is not None and faces <= 0:
            raise ValueError(f"expected a positive face count, got {faces}")
        if steps is not None and steps < 1:
            raise ValueError(f"expected steps ≥ 1 (None: each stage's own), got {steps}")
        if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
            raise ValueError(f"expected a finite cfg (guidance scale) ≥ 0 (0: the unconditional prediction), got {cfg}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"expected seed in [0, {MAX_SEED}], got {seed}")
        self.settings.check()
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        mode = self._residency_mode(residency, low_vram, device)
        stages = [r for r in self.resolutions if r <= resolution]
        timing = StageTiming()
        self.last_timing = timing
        names = ["prepare", "condition", "dense", *[f"sparse {r}" for r in stages], "post"]

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            bar.set_postfix_str(name)
            if on_stage is not None:
                on_stage(name, names.index(name), len(names))
            with self._timed(name, device):
                yield
            bar.update(1)

        self.weights.begin(self._plan(stages), device, dtype, mode, others=list(self.components().values()))
        bar = tqdm(total=len(names), desc="generate", unit="stage", disable=not progress)
        # closing(bar): also on errors, or the bar left open is drawn again after the error message.
        with contextlib.closing(bar), self._timed("total", device), torch.inference_mode(), self._weights_call():
            with stage("prepare"):
                prepared = {e.image_size: self._prepare(image, e.image_size) for e in self._encoders(stages)}
            with stage("condition"):
                encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(encoder) -> (features, mask)
                for e in self._encoders(stages):
                    rgb, mask = prepared[e.image_size]
                    with self._on(e):
                        encoded[id(e)] = (e(rgb.to(device)).float(), mask)  # [1, T, C], [1, S, S]
                features = {n: encoded[id(self.encoder_for(n))] for n in self._dit_names(stages)}
            with stage("dense"):
                coords = self._dense_stage(*features["dense_dit"], seed, steps, cfg, device, dtype, progress)
            if coords.shape[0] == 0 and not (structure is not None and stages[0] in structure):
                raise RuntimeError(f"the dense stage produced an empty structure (no voxel with occupancy ≥ "
                                   f"{self.settings.occupancy_threshold}); try another seed or a lower "
                                   "occupancy_threshold")
            mesh = None
            for i, r in enumerate(stages):
                with stage(f"sparse {r}"):
                    if structure is not None and r in structure:
                        coords = torch.as_tensor(structure[r]).to(torch.int32)
                        if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] == 0:
                            raise ValueError(f"expected structure[{r}] of shape [N > 0, 3], got "
                                             f"{tuple(coords.shape)}")
                    elif i > 0:
                        with self._timed(f"index {r}", device):
                            coords = self._cascade_index(mesh, r, device)
                    timing.tokens[r] = int(coords.shape[0])
                    mesh = self._sparse_stage(r, coords, *features[f"sparse_dit_{r}"], seed + 1 + i, steps, cfg,
                                              device, dtype, progress)
            with stage("post"):
                mesh = self._post(mesh, faces, device)
        return mesh

    # weights -------------------------------------------------------------------------------------------
    def _residency_mode(self, residency: str | None, low_vram: bool | None, device: torch.device) -> str:
        if low_vram if low_vram is not None else self.low_vram:
            return "low_vram" if device.type != "cpu" else "resident"  # the CPU holds everything anyway
        mode = residency if residency is not None else self.residency
        if mode is None:
            return "prefetch" if device.type == "cuda" else "resident"
        if mode not in RESIDENCY:
            raise ValueError(f"expected residency in {RESIDENCY}, got {mode!r}")
        return mode

    def _plan(self, stages: list[int]) -> list[nn.Module]:
        """The models a call over ``stages`` runs, in order (what :class:`WeightResidency` brings in ahead)."""
        plan = [*self._encoders(stages), self.dense_dit, self.dense_vae]
        for r in stages:
            plan += [self.sparse_dits[r], self.sparse_vaes[r]]
            if self.settings.refine and r in self.refiners:
                plan.append(self.refiners[r])
        return plan

    @contextlib.contextmanager
    def _weights_call(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.weights.end()

    def _on(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Run a block with ``model``'s weights on the call's device (see :attr:`residency`)."""
        return self.weights.use(model)

    # stage implementations ---------------------------------------------------------------------------
    @staticmethod
    def _dit_names(stages: list[int]) -> list[str]:
        return ["dense_dit", *[f"sparse_dit_{r}" for r in stages]]

    def _encoders(self, stages: list[int]) -> list[nn.Module]:
        """The distinct image encoders the DiTs of ``stages`` use, in first-use order."""
        out: dict[int, nn.Module] = {}
        for n in self._dit_names(stages):
            e = self.encoder_for(n)
            out.setdefault(id(e), e)
        return list(out.values())

    def _prepare(self, image: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ..models.conditioner import preprocess_image

        prepared = preprocess_image(image, size=size)
        return prepared.rgb[None], prepared.mask[None]

    def _condition(self, model: nn.Module, encoder: nn.Module, features: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[ConditionTokens, ConditionTokens]:
        """(cond, uncond) for ``model``: foreground tokens with coords when it uses sparse conditions."""
        from ..models.conditioner import sparse_condition_tokens

        if getattr(model.config, "sparse_conditions", False):
            c = sparse_condition_tokens(features, mask.to(features.device),
                                        patch_size=encoder.patch_size,
                                        num_prefix_tokens=encoder.num_prefix_tokens)
        else:
            c = ConditionTokens(features)
        return c, ConditionTokens(torch.zeros_like(c.tokens), c.mask, c.coords)

    def _sample(self, model: nn.Module, noise: Any, cond: ConditionTokens, uncond: ConditionTokens,
                st: StageSettings, steps: int | None, cfg: float | None, progress: bool, desc: str) -> Any:
        from ..flow.sampler import sample_euler

        scale = st.guidance_scale if cfg is None else float(cfg)
        return sample_euler(model, noise, steps=st.steps if steps is None else steps, cond=cond,
                            uncond=uncond if scale != 1 else None, guidance_scale=scale, shift=st.shift,
                            num_train_timesteps=st.num_train_timesteps, progress=progress, desc=desc,
                            cuda_graph=self.cuda_graphs)

    def _dense_stage(self, features: torch.Tensor, mask: torch.Tensor, seed: int, steps: int | None,
                     cfg: float | None, device: torch.device, dtype: torch.dtype, progress: bool) -> torch.Tensor:
        """Occupied latent coords int32 ``[N, 3]`` of the first sparse stage (possibly none)."""
        dit_cfg = self.dense_dit.config
        r = dit_cfg.resolution
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, dit_cfg.in_channels, r, r, r, generator=gen).to(device)
        with self._on(self.dense_dit):
            cond, uncond = self._condition(self.dense_dit, self.encoder_for("dense_dit"), features, mask)
            latent = self._sample(self.dense_dit, noise, cond, uncond, self.settings.dense, steps, cfg, progress,
                                  "dense")
        if self.settings.dense_latent is not None:
            latent = self.settings.dense_latent.denormalize(latent, 1)
        with self._on(self.dense_vae):
            logits = self.dense_vae.decode(latent.to(dtype))
        return self.dense_vae.occupied_coords(logits, self.settings.occupancy_threshold)[:, 1:]

    def _sparse_stage(self, r: int, coords: torch.Tensor, features: torch.Tensor, mask: torch.Tensor, seed: int,
                      steps: int | None, cfg: float | None, device: torch.device, dtype: torch.dtype,
                      progress: bool) -> trimesh.Trimesh:
        from ..models.refiner import VoxelRefinerXL
        from ..sparse import SparseTensor
        from ..sparse.serialize import sort_by_blocks
        from .extract import closed_mesh

        dit, vae = self.sparse_dits[r], self.sparse_vaes[r]
        n = coords.shape[0]
        c4 = torch.cat([coords.new_zeros(n, 1), coords], 1).to(device=device, dtype=torch.int32)
        x = SparseTensor(torch.zeros(n, dit.config.in_channels, device=device), c4,
                         resolution=dit.config.resolution, batch_size=1)
        x = sort_by_blocks(x, getattr(dit.config, "selection_block_size", 8))  # the order SSA requires
        gen = torch.Generator().manual_seed(seed)
        noise = x.replace(torch.randn(n, dit.config.in_channels, generator=gen).to(device))
        with self._on(dit):
            cond, uncond = self._condition(dit, self.encoder_for(f"sparse_dit_{r}"), features, mask)
            latent = self._sample(dit, noise, cond, uncond, self.settings.stage(r), steps, cfg, progress,
                                  f"sparse {r}")
        if r in self.settings.sparse_latent:
            latent = latent.replace(self.settings.sparse_latent[r].denormalize(latent.feats, 1))
        refiner = self.refiners.get(r) if self.settings.refine else None
        with_feat = isinstance(refiner, VoxelRefinerXL)
        with self._timed(f"decode {r}", device), self._on(vae):
            decoded = vae.decode(latent.replace(latent.feats.to(dtype)), chunk_size=self.settings.chunk(r),
                                 return_feat=with_feat)
        decoded, feats = decoded if with_feat else (decoded, None)
        self.last_timing.voxels[r] = int(decoded.num_voxels)
        values, level, outside = decoded.feats[:, 0].float(), self.settings.mc_level, None
        if refiner is not None:
            with self._timed(f"refine {r}", device), self._on(refiner):
                if with_feat:
                    values, level = refiner.refine_voxels(decoded, feats)[:, 0], self.settings.refine_level
                else:
                    outside = block_outside_fraction(refiner.predict_outside(decoded)[0])
            del feats
        voxels = decoded.coords[:, 1:]
        del decoded  # its structure cache holds the decoder's last kernel map (~108 bytes per voxel)
        with self._timed(f"mesh {r}", device):
            mesh = closed_mesh(voxels, values, latent.coords[:, 1:], r, level=level,
                               outside_fraction=outside)
        return mesh

    def _cascade_index(self, mesh: trimesh.Trimesh, r: int, device: torch.device) -> torch.Tensor:
        """Latent coords int32 ``[N, 3]`` at ``r / 8``: the 8³ blocks of the band around ``mesh`` at ``r``³."""
        from ..geometry.sdf import compute_sparse_sdf
        from .extract import drop_small_components

        mesh = drop_small_components(mesh, self.settings.min_component_fraction, device)  # floaters: not refined
        if len(mesh.faces) == 0:
            raise RuntimeError(f"no surface to refine at {r}³: the previous stage produced an empty mesh")
        band = self.settings.index_band_voxels * 2.0 / r
        backend = "torch" if device.type == "cuda" else "igl"
        sdf = compute_sparse_sdf(mesh, r, band=band, device=str(device) if device.type == "cuda" else "cpu",
                                 backend=backend)[r]
        return torch.from_numpy(sdf.block_coords.astype(np.int32))

    def _post(self, mesh: trimesh.Trimesh, faces: int | None, device: torch.device) -> trimesh.Trimesh:
        from ..geometry.export import decimate
        from .extract import drop_small_components

        mesh = drop_small_components(mesh, self.settings.min_component_fraction, device)
        if faces is not None and len(mesh.faces) > faces:
            mesh = decimate(mesh, faces)
        return mesh

    @contextlib.contextmanager
    def _timed(self, name: str, device: torch.device) -> Iterator[None]:
        """Record the seconds (CUDA-synchronised) of a block in :attr:`last_timing` under ``name`` and, on CUDA,
        its peak allocated bytes. Blocks nest: each resets the CUDA peak counter on entry and hands its peak
        to the enclosing block on exit."""
        cuda = device.type == "cuda"
        if cuda:
            _sync(device)
            if self._peak_floors:
                self._peak_floors[-1] = max(self._peak_floors[-1], torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
            self._peak_floors.append(0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.last_timing.seconds[name] = time.perf_counter() - t0
            if cuda:
                peak = max(torch.cuda.max_memory_allocated(device), self._peak_floors.pop())
                self.last_timing.peak_bytes[name] = peak
                if self._peak_floors:
                    self._peak_floors[-1] = max(self._peak_floors[-1], peak)


def require_surface(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """``mesh`` if it has faces. The pipeline returns an empty mesh when the decoded volume holds no surface (an
    evaluation scores that); callers that write a result file treat it as a failed generation."""
    if len(mesh.faces) == 0:
        raise RuntimeError("the generated mesh is empty (no surface in the decoded volume); try another seed or "
                           "more steps")
    return mesh


def _check_kinds(conditioner: nn.Module | None, conditioners: Mapping[str, nn.Module] | None, dense_dit: nn.Module,
                 dense_vae: nn.Module, sparse_dits: Mapping[int, nn.Module],
                 sparse_vaes: Mapping[int, nn.Module]) -> None:
    """Each component is the kind of model its place runs (a folder whose sub-folders were mixed up, or another
    model passed as --conditioner, would otherwise fail deep inside a call with an AttributeError)."""
    from ..models.conditioner import ImageEncoder
    from ..models.dit.dense_dit import DenseDiT
    from ..models.dit.sparse_dit import SparseDiT
    from ..models.vae.dense_vae import DenseShapeVAE
    from ..models.vae.sparse_sdf_vae import SparseSDFVAE

    places: list[tuple[str, nn.Module | None, type]] = [
        ("conditioner", conditioner, ImageEncoder), ("dense_dit", dense_dit, DenseDiT),
        ("dense_vae", dense_vae, DenseShapeVAE),
        *[(f"{_OWN_PREFIX}{name}", m, ImageEncoder) for name, m in (conditioners or {}).items()],
        *[(f"sparse_dit_{r}", m, SparseDiT) for r, m in sparse_dits.items()],
        *[(f"sparse_vae_{r}", m, SparseSDFVAE) for r, m in sparse_vaes.items()]]
    wrong = [f"{name}: expected {kind.__name__}, got {type(m).__name__}" for name, m, kind in places
             if m is not None and not isinstance(m, kind)]
    if wrong:
        raise ValueError(f"pipeline components of the wrong kind: {'; '.join(wrong)}")


def _check_refiner(resolution: int, refiner: nn.Module, vae: nn.Module | None) -> None:
    """Refiner type, tiling and feature width against the stage it refines (clear errors at load time)."""
    from ..models.refiner import VoxelRefinerXL, VoxelRefinerXLSign, patch_starts

    if vae is None:
        raise ValueError(f"refiner for {resolution}³ but no sparse stage at that resolution")
    cfg = getattr(refiner, "config", None)
    if isinstance(refiner, VoxelRefinerXL):
        patch_starts(resolution, cfg.patch_size, cfg.patch_stride)
        width = vae.config.up_channels[-1]
        if cfg.feature_channels != width:
            raise ValueError(f"refiner for {resolution}³ reads {cfg.feature_channels} decoder features, the "
                             f"SS-VAE gives {width}")
    elif isinstance(refiner, VoxelRefinerXLSign):
        patch_starts(resolution // 2, cfg.patch_size, cfg.patch_stride)
    else:
        raise ValueError(f"expected a VoxelRefinerXL or VoxelRefinerXLSign for {resolution}³, got "
                         f"{type(refiner).__name__}")


def block_outside_fraction(outside: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Fraction of each ``block``³ voxel block predicted outside: bool ``[S, S, S]`` on the sign refiner's ×2
    pooled grid → float32 ``[g, g, g]``, g = 2S / block."""
    s = outside.shape[0]
    if outside.ndim != 3 or len(set(outside.shape)) != 1:
        raise ValueError(f"expected a cubic bool grid [S, S, S], got {tuple(outside.shape)}")
    f = 2  # VoxelRefinerXLSign predicts on the ×2 mean-pooled grid
    cells = block // f
    g = s // cells
    return outside.float().reshape(g, cells, g, cells, g, cells).mean((1, 3, 5))


def _sync(device: torch.device) -> None:
    # The current stream only: weights still arriving on the side stream belong to later stages.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def read_resolutions(directory: str | os.PathLike) -> list[int]:
    """Mesh resolutions of the pipeline folder ``directory``, ascending, from its ``pipeline.json`` alone (no
    weights are read: callers check a requested resolution before the loading)."""
    return _manifest_resolutions(_read_manifest(Path(directory)))


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / PIPELINE_FILE
    if not root.is_dir():
        raise FileNotFoundError(f"weights folder not found: {root}")
    if not path.is_file():
        raise FileNotFoundError(f"expected {path}: a d3s2 pipeline folder (ImageTo3DPipeline.save_pretrained "
                                "or `d3s2 convert`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("components"), list):
        raise ValueError(f"{path}: expected an object with a 'components' list")
    return manifest


def _manifest_resolutions(manifest: Mapping[str, Any]) -> list[int]:
    found = (_SPARSE_NAME.match(str(n)) for n in manifest["components"])
    return sorted({int(m.group(2)) for m in found if m is not None and m.group(1) == "dit"})


def load_conditioner(path: str | os.PathLike) -> nn.Module:
    """An image encoder from a registry folder (small encoder), a DINOv2 Hugging Face folder or a ``.pth``."""
    from ..models.conditioner import DinoV2Encoder
    from ..models.registry import from_pretrained

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"conditioner weights not found: {p}")
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{p}: expected config.json (a registry or Hugging Face model folder)")
        cfg = json.loads(cfg_file.read_text())
        if isinstance(cfg, dict) and "model_type" in cfg:
            return DinoV2Encoder.from_pretrained(p)
        return from_pretrained(p)
    return DinoV2Encoder.from_pretrained(p)
