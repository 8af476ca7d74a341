"""Build models by name and save/load them as ``config.json`` + ``model.safetensors``.

A registered model class exposes ``Config`` (a ``@dataclass(kw_only=True)`` of plain fields, nested dataclasses
allowed, whose annotations are enforced when a config is built from a mapping), takes it as its only constructor
argument and keeps it as ``self.config``.

``config.json`` = ``{"name": <registered name>, "config": {...}}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import from_dict
from ..fileio import atomic_path, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# name -> "module:Class", imported on first use so that building one model does not import all of them.
_BUILTIN: dict[str, str] = {
    "sparse_sdf_vae": "d3s2.models.vae.sparse_sdf_vae:SparseSDFVAE",
    "dense_shape_vae": "d3s2.models.vae.dense_vae:DenseShapeVAE",
    "dense_dit": "d3s2.models.dit.dense_dit:DenseDiT",
    "sparse_dit": "d3s2.models.dit.sparse_dit:SparseDiT",
    "voxel_refiner_xl": "d3s2.models.refiner:VoxelRefinerXL",
    "voxel_refiner_xl_sign": "d3s2.models.refiner:VoxelRefinerXLSign",
    "small_image_encoder": "d3s2.models.conditioner:SmallImageEncoder",
}
_REGISTERED: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator adding a model under ``name`` (for models outside the built-in table)."""
    def wrap(cls: M) -> M:
        if name in _BUILTIN or (name in _REGISTERED and _REGISTERED[name] is not cls):
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTERED[name] = cls
        return cls
    return wrap


def model_names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def model_class(name: str) -> type[nn.Module]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown model {name!r}; expected one of {model_names()}")
    module, _, attr = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def model_name(model: nn.Module) -> str:
    """The registered name of ``model``'s class."""
    for name in model_names():
        if type(model) is model_class(name):
            return name
    raise ValueError(f"{type(model).__name__} is not a registered model; expected one of {model_names()}")


def config_from_dict(cls: type, values: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and values that do not match their field's
    annotation are ValueErrors naming the dotted key, e.g. ``model.args.num_blocks: expected int, got str ('2')``
    (ints are accepted where a float is expected); nested dataclasses recurse."""
    _reject_unknown_keys(cls, values, where)
    return from_dict(cls, values, path=where)


def _reject_unknown_keys(cls: type, values: Mapping[str, Any], where: str) -> None:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            _reject_unknown_keys(hints[key], value, f"{where}.{key}")


def model_config(name: str, values: Mapping[str, Any] | None = None, where: str | None = None) -> Any:
    """The ``Config`` of model ``name`` from a mapping of its fields (None: the defaults), checked as in
    :func:`config_from_dict`; errors start with ``where`` (default: ``name``), e.g. ``model.args``."""
    cfg_cls = model_class(name).Config  # type: ignore[attr-defined]
    return cfg_cls() if values is None else config_from_dict(cfg_cls, values, where or name)


def build_model(name: str, config: Any = None) -> nn.Module:
    """Instantiate model ``name`` from its ``Config``, a mapping of config fields, or None (defaults)."""
    cls = model_class(name)
    cfg_cls = cls.Config  # type: ignore[attr-defined]
    if config is None or isinstance(config, Mapping):
        config = model_config(name, config)
    elif not isinstance(config, cfg_cls):
        raise ValueError(f"expected a {cfg_cls.__name__} or a mapping for {name!r}, got {type(config).__name__}")
    return cls(config)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``.

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16`` for a small shipped model).
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"name": model_name(model), "config": dataclasses.asdict(model.config)}  # type: ignore[arg-type]
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous().cpu()
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp)
    atomic_write_text(out / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")
    return out


def from_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained` (strict key check), in eval mode.

    Weights keep the model's construction dtype (float32) unless ``dtype`` is given.
    """
    root = Path(directory)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / f).is_file():
            raise FileNotFoundError(f"expected {root / f} (a directory written by save_pretrained)")
    try:
        payload = json.loads((root / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{root / CONFIG_FILE}: not valid JSON ({err})") from err
    if not isinstance(payload, dict) or set(payload) != {"name", "config"}:
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{root / CONFIG_FILE}: expected keys 'name' and 'config', got {got}")
    model = build_model(payload["name"], payload["config"])
    model.load_state_dict(load_weights(root / WEIGHTS_FILE, device=map_location))
    if dtype is not None:
        model = model.to(dtype)
    return model.to(map_location).eval()


def load_weights(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file. A truncated or foreign file is a ValueError naming it (safetensors'
    own error names neither the file nor the format)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
