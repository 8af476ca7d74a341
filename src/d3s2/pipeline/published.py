"""Load the published Direct3D-S2 checkpoints (Hugging Face ``wushuang98/Direct3D-S2``, folders
``direct3d-s2-v-1-0`` / ``direct3d-s2-v-1-1``) into d3s2 modules.

A published folder holds ``config.yaml`` (one ``{target, params}`` entry per component) and five torch pickles:

==================  ==========================  =============================================
component           file / top-level key        d3s2 module
==================  ==========================  =============================================
``dense_vae``       ``model_dense.ckpt`` vae     :class:`~d3s2.models.vae.DenseShapeVAE`
``dense_dit``       ``model_dense.ckpt`` dit     :class:`~d3s2.models.dit.DenseDiT`
``sparse_vae_512``  ``model_sparse_512.ckpt``    :class:`~d3s2.models.vae.SparseSDFVAE`
``sparse_dit_512``  ``model_sparse_512.ckpt``    :class:`~d3s2.models.dit.SparseDiT`
``sparse_vae_1024``  ``model_sparse_1024.ckpt``  :class:`~d3s2.models.vae.SparseSDFVAE`
``sparse_dit_1024``  ``model_sparse_1024.ckpt``  :class:`~d3s2.models.dit.SparseDiT`
``refiner``         ``model_refiner.ckpt``       :class:`~d3s2.models.refiner.VoxelRefinerXL`
``refiner_1024``    ``model_refiner_1024.ckpt``  :class:`~d3s2.models.refiner.VoxelRefinerXLSign`
==================  ==========================  =============================================

Checkpoints are read with ``torch.load(weights_only=True)`` only. Key mapping, strict: the d3s2 modules keep the
published parameter names, except that a torchsparse convolution ``<m>.conv.kernel`` (``[27, C_in, C_out]``,
or ``[C_in, C_out]`` for 1×1×1) and ``<m>.conv.bias`` become ``<m>.weight`` ``[K, C_in, C_out]`` and
``<m>.bias`` of a :class:`~d3s2.sparse.SparseConv3d` (same offset order, x fastest, input at p + offset).
Fused ``to_qkv`` (rows ``[q | k | v]``, heads contiguous) and ``to_kv`` (``[k | v]``) are kept as they are:
the d3s2 attention modules split them the same way. Every key must be used, none may be missing and no shape
is coerced; all violations are listed in one error.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"

# component -> (checkpoint file, top-level key)
CHECKPOINTS: dict[str, tuple[str, str]] = {
    "dense_vae": ("model_dense.ckpt", "vae"),
    "dense_dit": ("model_dense.ckpt", "dit"),
    "sparse_vae_512": ("model_sparse_512.ckpt", "vae"),
    "sparse_dit_512": ("model_sparse_512.ckpt", "dit"),
    "sparse_vae_1024": ("model_sparse_1024.ckpt", "vae"),
    "sparse_dit_1024": ("model_sparse_1024.ckpt", "dit"),
    "refiner": ("model_refiner.ckpt", "refiner"),
    "refiner_1024": ("model_refiner_1024.ckpt", "refiner"),
}
COMPONENTS = tuple(CHECKPOINTS)


# ------------------------------------------------------------------------------------------------- defaults
@dataclass(frozen=True)
class StageDefaults:
    """Sampling settings of one flow stage (diffusers ``FlowMatchEulerDiscreteScheduler`` + CFG)."""

    steps: int
    guidance_scale: float
    shift: float
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class PublishedDefaults:
    """The published pipeline's settings (``direct3d_s2/pipeline.py`` defaults and ``config.yaml``)."""

    version: str  # "v1.0" or "v1.1"
    dense: StageDefaults = StageDefaults(steps=50, guidance_scale=7.0, shift=6.0)
    sparse_512: StageDefaults = StageDefaults(steps=30, guidance_scale=7.0, shift=6.0)
    sparse_1024: StageDefaults = StageDefaults(steps=15, guidance_scale=7.0, shift=8.0)
    occupancy_threshold: float = 0.1  # dense VAE decode: sigmoid(logit) >= this → occupied 64³ voxel
    selection_block_size: int = 8  # tokens sorted by blocks of this many latent voxels per edge (SSA order)
    sdf_resolution: int = 1024  # final resolution (512 or 1024)
    mc_threshold: float = 0.2  # marching-cubes level on the 1024³ grid
    refiner_512_level: float = 0.4  # level on the 512 refiner's tanh output (2 · mc_threshold)
    remove_interior: bool = True  # apply the sign refiner at 1024³
    mesh_scale: float = 0.95  # normalize_mesh scale before indexing the 512 mesh at 1024³
    index_udf_voxels: float = 4.0  # 1024 token index: voxels whose UDF < this many voxels (of 1024)
    sparse_1024_decode_chunk: int = 32  # d3s2 decode chunk (latent voxels per chunk edge); published: 4 per axis
    image_encoder: str = "dinov2_vitl14_reg"
    image_size: int = 518
    sparse_conditions: bool = False  # v1.0: only foreground DINO patches (+ cls/registers) with coords
    remesh: bool = False
    remesh_target_reduction: float = 0.95  # published 'simplify_ratio': fraction of faces removed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- config.yaml
def read_config(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The published ``config.yaml`` as ``{entry: {"target": str, "params": dict}}`` (parsed with PyYAML)."""
    import yaml

    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (a published Direct3D-S2 folder holds config.yaml and "
                                f"model_*.ckpt files)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        # One line: PyYAML's own message spans several, with a quote of the text.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of components, got {type(data).__name__}")
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
            raise ValueError(f"{path}: entry {name!r}: expected a mapping with a 'target' string")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{path}: entry {name!r}: expected 'params' to be a mapping")
        entry["params"] = params
    return data


class _Params:
    """Strict reader of one component's ``params``: every key must be consumed or explicitly ignored."""

    def __init__(self, params: Mapping[str, Any], where: str) -> None:
        self.params, self.where, self.used = dict(params), where, set()

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.params:
            if default is ...:
                raise ValueError(f"{self.where}: missing parameter {key!r}")
            return default
        return self.params[key]

    def expect(self, key: str, allowed: Iterable[Any], default: Any = ...) -> Any:
        value = self.get(key, default)
        allowed = list(allowed)
        if value not in allowed:
            raise ValueError(f"{self.where}: parameter {key!r}: expected one of {allowed}, got {value!r}")
        return value

    def same(self, *keys: str) -> Any:
        values = [self.get(k) for k in keys]
        if any(v != values[0] for v in values):
            raise ValueError(f"{self.where}: expected {' == '.join(keys)}, got {values}")
        return values[0]

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def finish(self) -> None:
        unknown = sorted(set(self.params) - self.used)
        if unknown:
            raise ValueError(f"{self.where}: unknown parameters {unknown}")


# Runtime switches of the published modules, meaningless for d3s2's construction.
_RUNTIME = ("use_checkpoint", "use_fp16")


def _identity_latents(p: _Params) -> None:
    # d3s2 applies no latent normalization; the published configs use the identity.
    p.expect("latents_scale", [1.0], 1.0)
    p.expect("latents_shift", [0.0], 0.0)


def _dense_vae(p: _Params) -> nn.Module:
    from ..models.vae.dense_vae import DenseShapeVAE, DenseShapeVAEConfig

    p.ignore(*_RUNTIME)
    _identity_latents(p)
    cfg = DenseShapeVAEConfig(
        in_channels=p.get("in_channels", 1), out_channels=p.get("out_channels", 1),
        latent_channels=p.get("embed_dim"), encoder_channels=list(p.get("model_channels_encoder")),
        num_res_blocks_encoder=p.get("num_res_blocks_encoder"),
        num_res_blocks_middle_encoder=p.get("num_res_blocks_middle_encoder"),
        decoder_channels=list(p.get("model_channels_decoder")), num_res_blocks_decoder=p.get("num_res_blocks_decoder"),
        num_res_blocks_middle_decoder=p.get("num_res_blocks_middle_decoder"))
    return DenseShapeVAE(cfg)


def _sparse_vae(p: _Params) -> nn.Module:
    from ..models.vae import SparseSDFVAE, SparseSDFVAEConfig

    # resolution is the latent grid side (taken from the input here); chunk_size is a decode setting
    # (PublishedDefaults.sparse_1024_decode_chunk).
    p.ignore(*_RUNTIME, "resolution", "chunk_size")
    _identity_latents(p)
    p.expect("out_channels", [1], 1)
    channels = p.same("model_channels_encoder", "model_channels_decoder")
    heads = p.same("num_heads_encoder", "num_heads_decoder")
    head_channels = p.same("num_head_channels_encoder", "num_head_channels_decoder")
    if heads * head_channels != channels:
        raise ValueError(f"{p.where}: expected num_heads × num_head_channels = model_channels, got {heads} × "
                         f"{head_channels} != {channels}")
    cfg = SparseSDFVAEConfig(latent_channels=p.get("embed_dim"), model_channels=channels,
                             num_blocks=p.same("num_blocks_encoder", "num_blocks_decoder"), num_heads=heads,
                             latent_structure="band")  # the published encoder's latents: the band's blocks only
    return SparseSDFVAE(cfg)


def _dense_dit(p: _Params) -> nn.Module:
    from ..models.dit import DenseDiT

    p.ignore(*_RUNTIME)
    p.expect("patch_size", [1], 1)
    p.expect("pe_mode", ["ape"], "ape")
    cfg = DenseDiT.Config(resolution=p.get("resolution"), in_channels=p.get("in_channels"),
                          out_channels=p.get("out_channels"), model_channels=p.get("model_channels"),
                          cond_channels=p.get("cond_channels"), num_blocks=p.get("num_blocks"),
                          num_heads=p.get("num_heads"), mlp_ratio=float(p.get("mlp_ratio", 4.0)),
                          qk_rms_norm=bool(p.get("qk_rms_norm", False)))
    r = cfg.resolution
    p.expect("latent_shape", [[cfg.in_channels, r, r, r]], [cfg.in_channels, r, r, r])
    return DenseDiT(cfg)


def _sparse_dit(p: _Params) -> nn.Module:
    from ..models.dit import SparseDiT

    # With SSA the published sparse DiT never reads qk_rms_norm (it only applies to non-SSA attention).
    p.ignore(*_RUNTIME, "qk_rms_norm")
    p.expect("pe_mode", ["ape"], "ape")
    cfg = SparseDiT.Config(
        resolution=p.get("resolution"), in_channels=p.get("in_channels"), out_channels=p.get("out_channels"),
        model_channels=p.get("model_channels"), cond_channels=p.get("cond_channels"),
        num_blocks=p.get("num_blocks"), num_heads=p.get("num_heads"), num_kv_heads=p.get("num_kv_heads"),
        mlp_ratio=float(p.get("mlp_ratio", 4.0)), attention="ssa",
        compression_block_size=p.get("compression_block_size"), selection_block_size=p.get("selection_block_size"),
        topk=p.get("topk"), window_size=p.get("window_size", 8),
        compression_version=p.expect("compression_version", ["v1", "v2"]), use_shift=bool(p.get("use_shift")),
        pe_factor=float(p.get("factor", 1.0)), sparse_conditions=bool(p.get("sparse_conditions", False)))
    return SparseDiT(cfg)


def _refiner_common(p: _Params) -> dict[str, Any]:
    p.ignore(*_RUNTIME)
    p.ignore("res")  # the grid side; d3s2 takes it from the input
    return dict(in_channels=p.get("in_channels", 1), out_channels=p.get("out_channels", 1),
                layers_per_block=p.get("layers_per_block", 2), layers_mid_block=p.get("layers_mid_block", 2),
                patch_size=p.get("patch_size"))


def _refiner(p: _Params) -> nn.Module:
    from ..models.refiner import VoxelRefinerXL

    # The published run() tiles with a fixed stride of 160 (3 patches of 192 over 512, 32-voxel overlaps).
    return VoxelRefinerXL(VoxelRefinerXL.Config(**_refiner_common(p), patch_stride=160))


def _refiner_sign(p: _Params) -> nn.Module:
    from ..models.refiner import VoxelRefinerXLSign

    p.ignore("infer_patch_size")  # stored by the published class, never read by its run()
    # The published run() tiles with a fixed stride of 128 (3 patches of 256 over 512).
    return VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**_refiner_common(p), patch_stride=128))


@dataclass(frozen=True)
class _Spec:
    classes: tuple[str, ...]  # accepted last component of the published ``target``
    build: Callable[[_Params], nn.Module]


SPECS: dict[str, _Spec] = {
    "dense_vae": _Spec(("DenseShapeVAE",), _dense_vae),
    "dense_dit": _Spec(("DenseDiT",), _dense_dit),
    "sparse_vae_512": _Spec(("SparseSDFVAE",), _sparse_vae),
    "sparse_dit_512": _Spec(("SparseDiT",), _sparse_dit),
    "sparse_vae_1024": _Spec(("SparseSDFVAE",), _sparse_vae),
    "sparse_dit_1024": _Spec(("SparseDiT",), _sparse_dit),
    "refiner": _Spec(("Voxel_RefinerXL",), _refiner),
    "refiner_1024": _Spec(("Voxel_RefinerXL_sign",), _refiner_sign),
}


def build_component(name: str, entry: Mapping[str, Any]) -> nn.Module:
    """The d3s2 module for component ``name`` from its ``config.yaml`` entry (built on the current default
    device: use ``with torch.device("meta")`` to build without allocating)."""
    if name not in SPECS:
        raise ValueError(f"unknown component {name!r}; expected one of {list(SPECS)}")
    spec = SPECS[name]
    cls = str(entry["target"]).rsplit(".", 1)[-1]
    if cls not in spec.classes:
        raise ValueError(f"config.yaml entry {name!r}: expected target class {' or '.join(spec.classes)}, got "
                         f"{entry['target']!r}")
    p = _Params(entry.get("params") or {}, f"config.yaml entry {name!r}")
    model = spec.build(p)
    p.finish()
    return model


# ------------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """A published ``model_*.ckpt``: ``{top-level key: {parameter name: tensor}}``, read with
    ``torch.load(weights_only=True)`` (memory-mapped when the file allows it). Anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected checkpoint file {path}")
    problem = not_a_checkpoint(path)
    if problem:
        raise ValueError(f"{path}: expected a torch.save checkpoint, got {problem}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):
            raise ValueError(f"{path}: refused: d3s2 reads checkpoints only with torch.load(weights_only=True), "
                             f"and this file holds Python objects other than tensors and plain containers, which "
                             f"would need arbitrary unpickling ({reason}). Re-save it as a dict of tensor "
                             "dicts.") from err
        # torch's reader on a cut-off zip archive or pickle stream
        raise ValueError(f"{path}: cannot read the checkpoint ({path.stat().st_size} bytes), truncated or "
                         f"corrupted: {reason}; download it again") from err
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of state dicts (e.g. {{'vae': {{...}}, 'dit': {{...}}}}), got "
                         f"{type(obj).__name__}")
    for top, sd in obj.items():
        bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}[{top!r}]: expected tensors only, got non-tensor entries {bad[:10]}")
    return obj


def not_a_checkpoint(path: Path) -> str | None:
    """What ``path`` holds instead of a ``torch.save`` file (a zip archive, or a pickle in the legacy format),
    judged from its first bytes; None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file (download it again)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file (fetch the file itself: git lfs pull, or huggingface-cli download)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # zip local header / pickle PROTO opcode
        return None
    return f"a file that starts with {head[:16]!r} (download it again)"


def sparse_conv_modules(model: nn.Module) -> dict[str, int]:
    """``{module name: kernel size}`` of the :class:`~d3s2.sparse.SparseConv3d` layers of ``model``."""
    from ..sparse import SparseConv3d

    return {name: m.kernel_size for name, m in model.named_modules() if isinstance(m, SparseConv3d)}


def from_published(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str = "checkpoint"
                   ) -> dict[str, torch.Tensor]:
    """Published state dict → ``model``'s, strictly (see the module docstring).

    Raises ValueError listing every missing key, unused key and shape mismatch.
    """
    from ..ops.conv.convert import from_torchsparse

    convs = sparse_conv_modules(model)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    reported = set()
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        parent, _, last = module.rpartition(".")
        new = key
        if last == "conv" and parent in convs and leaf in ("kernel", "bias"):
            new = f"{parent}.{'weight' if leaf == 'kernel' else 'bias'}"
            if leaf == "kernel":
                ndim = 2 if convs[parent] == 1 else 3
                if value.ndim == ndim:
                    value = from_torchsparse(value)
                else:
                    problems.append(f"{key}: expected a {ndim}-D torchsparse kernel, got shape {list(value.shape)}")
                    reported.add(new)
        out[new], origin[new] = value, key
    expected = model.state_dict()
    for key in expected.keys() - out.keys():
        problems.append(f"missing {_published_name(key, convs)} "
                        f"(shape {list(_published_shape(key, expected[key], convs))})")
    for key in out.keys() - expected.keys():
        problems.append(f"unexpected {origin[key]} (shape {list(out[key].shape)})")
    for key in (expected.keys() & out.keys()) - reported:
        if tuple(out[key].shape) != tuple(expected[key].shape):
            problems.append(f"{origin[key]}: expected shape {list(_published_shape(key, expected[key], convs))}, "
                            f"got {list(state_dict[origin[key]].shape)}")
    if problems:
        raise ValueError(f"{where}: {len(problems)} problem(s) mapping to {type(model).__name__}:\n  "
                         + "\n  ".join(sorted(problems)))
    return {k: out[k] for k in expected}  # in the model's order


def _published_name(key: str, convs: Mapping[str, int]) -> str:
    module, _, leaf = key.rpartition(".")
    if module in convs:
        return f"{module}.conv.{'kernel' if leaf == 'weight' else 'bias'}"
    return key


def _published_shape(key: str, value: torch.Tensor, convs: Mapping[str, int]) -> tuple[int, ...]:
    module, _, leaf = key.rpartition(".")
    if module in convs and leaf == "weight" and convs[module] == 1:
        return tuple(value.shape[1:])
    return tuple(value.shape)


def to_published(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_published`: ``model``'s state dict with the published names and layouts."""
    from ..ops.conv.convert import to_torchsparse

    convs = sparse_conv_modules(model)
    out = {}
    for key, value in (model.state_dict() if state_dict is None else state_dict).items():
        module, _, leaf = key.rpartition(".")
        if module in convs and leaf == "weight":
            value = to_torchsparse(value)
        out[_published_name(key, convs)] = value
    return out


def _check_pos_emb(model: nn.Module, mapped: Mapping[str, torch.Tensor], where: str) -> None:
    """The dense DiT stores its fixed APE; a mismatch with d3s2's formula means a layout disagreement."""
    from ..models.embeddings import sincos_position_embedding

    stored = mapped.get("pos_emb")
    if stored is None:
        return
    r = model.config.resolution
    axis = torch.arange(r)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    expect = sincos_position_embedding(grid, stored.shape[1])
    err = (stored.float() - expect).abs().max().item()
    if err > 1e-2:
        logger.warning("%s: pos_emb differs from d3s2's 3D sin-cos table by up to %.3g (expected < 1e-2); the "
                       "stored table is used, but the APE layouts may disagree", where, err)


# ------------------------------------------------------------------------------------------------- loading
def _materialize(model: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype | None) -> nn.Module:
    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    # assign=True: parameters become the loaded tensors (no second copy of the weights).
    model.load_state_dict({k: conv(v) for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left and torch.device(device).type != "meta":
        raise RuntimeError(f"{type(model).__name__}: tensors not in the checkpoint stayed unallocated: {left}")
    return model.eval()


def load_component(root: str | os.PathLike, name: str, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = torch.float32, config: Mapping[str, Any] | None = None,
                   checkpoint: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> nn.Module:
    """One published component as a ready d3s2 module (eval mode).

    Args:
        root: the published folder.
        name: one of :data:`COMPONENTS`.
        dtype: floating-point dtype of the weights; None keeps the stored dtypes (the published files mix
            fp16 weights with fp32 norms).
        config / checkpoint: an already read ``config.yaml`` / checkpoint file (to share one file between the
            VAE and DiT of a stage).
    """
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown component {name!r}; expected one of {list(COMPONENTS)}")
    root = Path(root)
    config = read_config(root) if config is None else config
    if name not in config:
        raise ValueError(f"{root / CONFIG_FILE}: no entry {name!r}")
    file, key = CHECKPOINTS[name]
    with torch.device("meta"):
        model = build_component(name, config[name])
    ckpt = load_checkpoint(root / file) if checkpoint is None else checkpoint
    if key not in ckpt:
        raise ValueError(f"{root / file}: expected top-level key {key!r}, got {sorted(ckpt)}")
    where = f"{root / file}[{key!r}]"
    try:
        mapped = from_published(model, ckpt[key], where=where)
    except ValueError as err:
        if not name.startswith("sparse_dit"):
            raise
        # The sparse DiTs are what differs between the two releases: name the likely cause after the long list.
        raise ValueError(f"{err}\n{root / CONFIG_FILE} describes the sparse DiT of Direct3D-S2 "
                         f"{read_defaults(config).version}; a checkpoint from the other release folder "
                         f"(direct3d-s2-v-1-0 or direct3d-s2-v-1-1) does not fit it: take config.yaml and every "
                         f"model_*.ckpt from one folder") from err
    if name == "dense_dit":
        _check_pos_emb(model, mapped, where)
    return _materialize(model, mapped, device, dtype)


def read_defaults(config: Mapping[str, Any]) -> PublishedDefaults:
    """Published pipeline defaults, with the scheduler shifts and image-encoder settings of ``config.yaml``."""
    def stage(base: StageDefaults, entry: str) -> StageDefaults:
        params = (config.get(entry) or {}).get("params") or {}
        return StageDefaults(steps=base.steps, guidance_scale=base.guidance_scale,
                             shift=float(params.get("shift", base.shift)),
                             num_train_timesteps=int(params.get("num_train_timesteps", base.num_train_timesteps)))

    base = PublishedDefaults(version="v1.1")
    dit = (config.get("sparse_dit_512") or config.get("sparse_dit_1024") or {}).get("params") or {}
    sparse_conditions = bool(dit.get("sparse_conditions", False))
    version = "v1.0" if sparse_conditions or dit.get("compression_version") == "v2" else "v1.1"
    enc = (config.get("sparse_image_encoder") or config.get("dense_image_encoder") or {}).get("params") or {}
    vae_1024 = (config.get("sparse_vae_1024") or {}).get("params") or {}
    # The published chunk_size counts chunks per axis of the latent grid; d3s2 counts latent voxels per chunk edge.
    chunk = (int(vae_1024["resolution"]) // int(vae_1024["chunk_size"]) if "chunk_size" in vae_1024
             else base.sparse_1024_decode_chunk)
    return PublishedDefaults(
        version=version, dense=stage(base.dense, "dense_scheduler"),
        sparse_512=stage(base.sparse_512, "sparse_scheduler_512"),
        sparse_1024=stage(base.sparse_1024, "sparse_scheduler_1024"),
        sparse_1024_decode_chunk=int(chunk), image_encoder=str(enc.get("version", base.image_encoder)),
        image_size=int(enc.get("size", base.image_size)), sparse_conditions=sparse_conditions)


@dataclass
class PublishedModels:
    """Ready d3s2 modules of a published folder plus the settings the published pipeline runs them with."""

    root: Path
    defaults: PublishedDefaults
    models: dict[str, nn.Module] = field(default_factory=dict)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.models:
            raise KeyError(f"component {name!r} was not loaded; loaded: {sorted(self.models)}")
        return self.models[name]

    def __contains__(self, name: str) -> bool:
        return name in self.models


def available_components(root: str | os.PathLike, config: Mapping[str, Any] | None = None) -> list[str]:
    """Components with a ``config.yaml`` entry and a checkpoint file present in ``root``."""
    root = Path(root)
    config = read_config(root) if config is None else config
    return [c for c in COMPONENTS if c in config and (root / CHECKPOINTS[c][0]).is_file()]


def _selected_components(root: Path, config: Mapping[str, Any], components: Iterable[str] | None) -> list[str]:
    """``components`` checked against the known names, or every available one; never empty."""
    names = available_components(root, config) if components is None else list(components)
    unknown = [n for n in names if n not in CHECKPOINTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; expected some of {list(COMPONENTS)}")
    if not names:
        raise FileNotFoundError(f"{root}: no model_*.ckpt file of a configured component found")
    missing = sorted({CHECKPOINTS[n][0] for n in names if not (root / CHECKPOINTS[n][0]).is_file()})
    if missing:
        raise FileNotFoundError(f"{root}: expected checkpoint file(s) {missing} for the components {names}")
    return names


def load_published(root: str | os.PathLike, components: Iterable[str] | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
                   ) -> PublishedModels:
    """Load ``components`` (default: every one whose checkpoint file is present) of a published folder.

    Each checkpoint file is read once (memory-mapped) and released after its components are built.
    """
    root = Path(root)
    config = read_config(root)
    names = _selected_components(root, config, components)
    skipped = [c for c in COMPONENTS if c not in names]
    if skipped:
        logger.info("not loading %s", ", ".join(skipped))
    out = PublishedModels(root, read_defaults(config))
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(CHECKPOINTS[n][0], []).append(n)
    for file, group in by_file.items():
        ckpt = load_checkpoint(root / file)
        for n in group:
            out.models[n] = load_component(root, n, device=device, dtype=dtype, config=config, checkpoint=ckpt)
            params = sum(p.numel() for p in out.models[n].parameters())
            logger.info("loaded %s (%s, %.1f M parameters)", n, type(out.models[n]).__name__, params / 1e6)
        del ckpt
    return out


# ------------------------------------------------------------------------------------------------ conversion
PIPELINE_FILE = "pipeline.json"


def convert_published(root: str | os.PathLike, out: str | os.PathLike, components: Iterable[str] | None = None, *,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a published folder as d3s2 models: ``out/<component>/{config.json, model.safetensors}`` (the
    :mod:`d3s2.models.registry` format) and ``out/pipeline.json`` (version, defaults, component list). The whole
    folder is written beside ``out`` and takes its place at the end: a failure leaves ``out`` as it was, and a
    finished conversion replaces an earlier one whole. ``dtype`` None keeps the stored dtypes."""
    from ..models.registry import save_pretrained

    root, out = Path(root), Path(out)
    if out.resolve() == root.resolve():
        raise ValueError(f"expected an output directory other than the published folder {root}")
    # Replacing the folder whole must not delete files that are not an earlier conversion's (a pipeline folder of
    # trained models, written by save_pretrained, has a pipeline.json too).
    earlier_or_empty = out.is_dir() and (_is_conversion(out) or not any(out.iterdir()))
    if out.exists() and not earlier_or_empty:
        raise ValueError(f"expected --out to be a new or empty folder, or one written by d3s2 convert (a "
                         f"{PIPELINE_FILE} with the published 'defaults'), got {out}")
    config = read_config(root)
    names = _selected_components(root, config, components)
    defaults = read_defaults(config)
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(CHECKPOINTS[n][0], []).append(n)
    with atomic_dir(out) as tmp:
        for file, group in by_file.items():
            ckpt = load_checkpoint(root / file)
            for n in group:
                model = _own_storages(load_component(root, n, dtype=dtype, config=config, checkpoint=ckpt))
                save_pretrained(model, tmp / n)
                logger.info("converted %s", n)
                del model
            del ckpt
        manifest = {"source": str(root.resolve()), "version": defaults.version, "components": names,
                    "defaults": defaults.to_dict()}
        atomic_write_text(tmp / PIPELINE_FILE, json.dumps(manifest, indent=2) + "\n")
    return out


def _is_conversion(folder: Path) -> bool:
    """Whether ``folder`` holds a :func:`convert_published` result: its ``pipeline.json`` has the published defaults."""
    try:
        manifest = json.loads((folder / PIPELINE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "defaults" in manifest


def _own_storages(model: nn.Module) -> nn.Module:
    """``model`` with every tensor in storage of its own. A checkpoint may store tensors as views of one buffer
    (flattened or tied weights), loaded as views of it, and safetensors refuses to save tensors that share memory."""
    seen: set[int] = set()
    copies = {}
    for key, t in model.state_dict().items():
        storage = t.untyped_storage().data_ptr()
        if storage in seen:
            copies[key] = t.clone()
        seen.add(storage)
    if copies:
        model.load_state_dict(copies, strict=False, assign=True)
    return model


def load_converted(out: str | os.PathLike, components: Iterable[str] | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> PublishedModels:
    """Read a folder written by :func:`convert_published` back as :class:`PublishedModels`."""
    from ..models.registry import from_pretrained

    out = Path(out)
    path = out / PIPELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (a folder written by `d3s2 convert`)")
    manifest = json.loads(path.read_text())
    d = dict(manifest["defaults"])
    for stage in ("dense", "sparse_512", "sparse_1024"):
        d[stage] = StageDefaults(**d[stage])
    models = PublishedModels(out, PublishedDefaults(**d))
    for n in manifest["components"] if components is None else components:
        models.models[n] = from_pretrained(out / n, map_location=device, dtype=dtype)
    return models
