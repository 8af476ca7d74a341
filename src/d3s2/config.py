"""Typed configs: dataclass schemas filled from YAML strictly, ``--a.b=c`` overrides, resolved-config records.

Every config is a ``@dataclass(kw_only=True)``. :func:`from_dict` builds one from plain data and rejects
unknown keys, missing required keys and values of the wrong type with an error naming the dotted path,
e.g. ``train.max_steps: expected int, got str ('ten')``. YAML is read with :func:`load_yaml`, which also
rejects duplicate keys and reads ``1e-4`` as a float (PyYAML alone reads it as a string).

Overrides (``--train.max_steps=10``, ``--optim.betas=[0.9,0.95]``) are applied to the raw data before
validation, so they get the same checks; a value is parsed as YAML unless the field is a string. An error about a
value an override gave names that override, also inside a section or list given whole (``--optim={lr: 1e-3}``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")

__all__ = ["ConfigError", "load_yaml", "resolve_config_path", "from_dict", "keys_of", "merge_args", "to_dict",
           "Override", "parse_overrides", "apply_overrides", "resolve_section", "dump_yaml", "git_info",
           "write_run_record", "TrainConfig", "TaskSpec", "TrainSection", "DataConfig", "OptimConfig", "EMAConfig"]


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names its dotted path."""


# --------------------------------------------------------------------------- YAML
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads 1e-4 / 1E+3 as floats."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            mark = key_node.start_mark
            raise ConfigError(f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 wants a dot in floats ("1.0e-4"); accept the "1e-4" everyone writes.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/, installed with d3s2


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a file; else, for a relative ``configs/...`` path, the packaged copy of that config, so
    the shipped configs (and the model configs they name) load from any directory after a pip install."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and path.parts[:1] == ("configs",):
        packaged = PACKAGED_CONFIGS.joinpath(*path.parts[1:])
        if packaged.is_file():
            return packaged
        raise FileNotFoundError(f"config file not found: {path} (nor as {packaged}, the packaged configs)")
    raise FileNotFoundError(f"config file not found: {path}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is ``{}``); ``configs/...`` falls back to the packaged configs
    (:func:`resolve_config_path`)."""
    path = resolve_config_path(path)
    with path.open() as f:
        try:
            data = yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- overrides
@dataclasses.dataclass(frozen=True)
class Override:
    """One override: the dotted key, its raw value (converted once the target field's type is known), and what the
    user typed to give it, which errors name (a command's own option, such as ``d3s2 train``'s ``--max-steps 5`` for
    ``train.max_steps``). :func:`apply_overrides` puts it in the data in place of the value."""

    key: str
    value: str
    source: str


def parse_overrides(args: Sequence[str | Override]) -> list[Override]:
    """``["--a.b=1", "--c=x"]`` → ``[Override("a.b", "1", "--a.b=1"), Override("c", "x", "--c=x")]``; the leading
    ``--`` is optional, and an :class:`Override` passes as it is. A key given twice is an error (the last one would
    win silently)."""
    out: dict[str, Override] = {}
    for arg in args:
        if not isinstance(arg, Override):
            body = arg[2:] if arg.startswith("--") else arg
            key, sep, value = body.partition("=")
            if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
                raise ConfigError(f"expected an override of the form --section.key=value, got {arg!r}")
            arg = Override(key, value, f"--{key}={value}")
        if arg.key in out:
            raise ConfigError(f"{arg.key} given twice ({out[arg.key].source} and {arg.source}): expected it once")
        out[arg.key] = arg
    return list(out.values())


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted key set; intermediate mappings are created as needed. A section
    given whole (``--optim={lr: 1e-3}``) replaces the file's; one override inside another's section is an error,
    in either order (whichever came last would silently drop the other)."""
    data = _deep_copy(data)
    for override in overrides:
        key, source = override.key, override.source
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, Override):
                raise ConfigError(f"{source}: {child.source} already gives {'.'.join(parts[:i + 1])} whole; "
                                  "expected one of the two")
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        earlier = _override_source(node.get(parts[-1]))
        if earlier is not None:
            raise ConfigError(f"{source} replaces {key} whole, which {earlier} sets a key of; expected one of the two")
        node[parts[-1]] = override
    return data


def resolve_section(value: Any) -> tuple[Any, str | None]:
    """``(data, source)``: a section as data, and the override that gave it whole as YAML text (``--task={...}``;
    None when it comes from the file or key by key), for :func:`from_dict`'s ``source``."""
    if isinstance(value, Override):
        return _parse_scalar(value.value), value.source
    return value, None


def merge_args(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a model YAML's ``args``) with ``overrides`` (a task's ``model_args``) set key by key: where both
    give a mapping (a nested section such as the VAE's ``loss``), the two merge the same way, at any depth; any
    other value (a number, a list) replaces base's. The inputs are not modified."""
    merged = _deep_copy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_args(merged[key], value)
        else:
            merged[key] = _deep_copy(value)
    return merged


def _deep_copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deep_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deep_copy(v) for v in x]
    return x


# --------------------------------------------------------------------------- dataclasses
def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _resolve_override(value: Any, tp: Any) -> Any:
    if not isinstance(value, Override):
        return value
    union_args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    if type(None) in union_args and value.value in ("null", "~"):
        return None
    if tp is str or str in union_args:
        return value.value
    return _parse_scalar(value.value)


def _named(path: str, source: str | None) -> str:
    return f"{path} (from {source})" if source else path


def _source(value: Any, inherited: str | None) -> str | None:
    """The override that gave ``value``: its own, else the one that gave the section or list holding it."""
    return value.source if isinstance(value, Override) else inherited


def _convert(value: Any, tp: Any, path: str, source: str | None = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (lists to tuples etc.); errors name
    ``path`` and the override ``source`` that gave the value (or a section or list holding it)."""
    source = _source(value, source)
    value = _resolve_override(value, tp)
    where = _named(path, source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any:
        return _strip_overrides(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, path, source)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path=path, source=source)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, f"{path}[{i}]", source)
                     for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, path, source): _convert(v, vt, f"{path}.{k}", source) for k, v in value.items()}
    if tp is float:
        # bool is an int subclass: reject it explicitly; ints are fine where a float is expected.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} ({value!r})")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)} in the schema")


def _strip_overrides(x: Any) -> Any:
    if isinstance(x, Override):
        return _parse_scalar(x.value)
    if isinstance(x, dict):
        return {k: _strip_overrides(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strip_overrides(v) for v in x]
    return x


def _override_source(value: Any) -> str | None:
    """The first ``--a.b=c`` that set ``value`` or a key below it (so an unknown key is not blamed on the file)."""
    if isinstance(value, Override):
        return value.source
    if isinstance(value, dict):
        return next((src for v in value.values() if (src := _override_source(v))), None)
    return None


_KEYS_OF = "d3s2.config.keys_of"  # the field metadata key of keys_of


def keys_of(config_class: Callable[[], type]) -> Any:
    """A ``dict[str, Any]`` field (default ``{}``) holding some keys of the dataclass ``config_class()``, e.g. a
    task's overrides of its model's config, which :func:`merge_args` merges into that config's args. :func:`from_dict`
    checks each key as it checks its own fields: an unknown key names the ``--a.b=c`` that set it and the valid
    keys, a value must match its annotation. A nested config section is checked the same way, key by key, as the
    merge sets it key by key. ``config_class`` is called only then, so the model's module is imported only when a
    config is checked."""
    return dataclasses.field(default_factory=dict, metadata={_KEYS_OF: config_class})


def _reject_unknown_keys(cls: type, data: Mapping[str, Any], path: str, source: str | None) -> None:
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        named = [_named(prefix + str(k), _override_source(data[k]) or source) for k in unknown]
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
                          f"{path or cls.__name__} accepts: {', '.join(fields)}")


def _check_some_keys(cls: type, data: Any, path: str, source: str | None) -> None:
    """Check the keys ``data`` gives of dataclass ``cls`` (a subset: the rest comes from where they are merged
    into); a nested config section is a subset too. A ``data`` that is no mapping is left to the caller."""
    source = _source(data, source)
    data = _resolve_override(data, dict)  # a section given whole arrives as YAML text
    if not isinstance(data, Mapping):
        return
    _reject_unknown_keys(cls, data, path, source)
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(_resolve_override(value, dict), Mapping):
            _check_some_keys(hints[name], value, f"{path}.{name}", source)
        else:
            _convert(value, hints[name], f"{path}.{name}", source)


def _checked_fields(cls: type, data: Mapping[str, Any], path: str, source: str | None) -> dict[str, Any]:
    """The keys of ``data`` converted to the annotations of dataclass ``cls``; unknown keys and mistyped values
    are ConfigErrors naming the dotted path (and the override that set it, or ``source``, that gave all of
    ``data``)."""
    _reject_unknown_keys(cls, data, path, source)
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init or field.name not in data:
            continue
        if _KEYS_OF in field.metadata:
            _check_some_keys(field.metadata[_KEYS_OF](), data[field.name], prefix + field.name, source)
        kwargs[field.name] = _convert(data[field.name], hints[field.name], prefix + field.name, source)
    return kwargs


def from_dict(cls: type[C], data: Mapping[str, Any], *, path: str = "", source: str | None = None) -> C:
    """Build dataclass ``cls`` from ``data``, checking every key and value type (nested dataclasses too).
    ``source``: the override that gave ``data`` whole (:func:`resolve_section`), named in its errors."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    data, source = resolve_section(data) if isinstance(data, Override) else (data, source)
    where = _named(path or cls.__name__, source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    kwargs = _checked_fields(cls, data, path, source)
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    for field in dataclasses.fields(cls):
        missing = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if field.init and missing and field.name not in data:
            raise ConfigError(f"missing required key {prefix + field.name} ({_type_name(hints[field.name])})"
                              + (f", not in {source}" if source else ""))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a dataclass config, tuples as lists; inverse of from_dict."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# --------------------------------------------------------------------------- run records
def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding ``path`` (default: d3s2)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


def write_run_record(out_dir: str | os.PathLike, cfg: Any, *, command: Sequence[str], seed: int,
                     extra: Mapping[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (resolved config) and ``run.json`` (git commit, command, seed, extra) atomically."""
    from .fileio import atomic_write_text

    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(to_dict(cfg)))
    record = {"git": git_info(), "command": list(command), "seed": seed, **(extra or {})}
    atomic_write_text(out_dir / "run.json", json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------- the training run schema
@dataclasses.dataclass(kw_only=True)
class TaskSpec:
    name: str  # a registered task (d3s2.train.task.TASKS): toy, vae, dense_vae, dit_dense, dit_sparse, ...
    args: Any = dataclasses.field(default_factory=dict)  # the task's own Config, checked against its schema


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    max_tokens: int = 65536  # token budget of one micro-batch; a token is what the dataset's num_tokens() counts
    # (datasets with item_costs, e.g. the VAE's band + decoded voxels, are packed by cost scaled to token units)
    max_batch_size: int = 0  # also cap samples per micro-batch; 0 = no cap
    micro_batches_per_step: int = 1  # global micro-batches per optimizer step, split evenly over the ranks
    num_workers: int = 2  # DataLoader worker processes per rank
    shuffle: bool = True
    sort_window: int = 64  # sort by length inside windows of this many shuffled samples: tighter packing, still random
    balance_steps: bool = True  # one step's micro-batches have similar cost, so the ranks finish it together
    val_max_batches: int = 0  # cap on validation micro-batches (over all ranks); 0 = the whole split

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.micro_batches_per_step < 1 or self.sort_window < 1:
            raise ValueError("max_tokens, micro_batches_per_step and sort_window must be >= 1")
        if self.max_batch_size < 0 or self.num_workers < 0 or self.val_max_batches < 0:
            raise ValueError("max_batch_size, num_workers and val_max_batches must be >= 0")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4  # peak AdamW learning rate (paper VAE: 1e-4, 1e-5 for the 1024³ fine-tune)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # matrices only: biases, norm scales and other 1-D parameters get none
    warmup_steps: int = 0  # linear warmup from 0
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup, over train.max_steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, warmup_steps >= 0, grad_clip >= 0 and 0 <= min_lr_ratio <= 1")


@dataclasses.dataclass(kw_only=True)
class EMAConfig:
    decay: float = 0.9999  # 0 disables the EMA
    warmup: bool = True  # effective decay min(decay, (1+n)/(10+n)): the EMA follows the fast early changes
    validate_with_ema: bool = True  # validation (and the final export) uses the EMA weights

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")


@dataclasses.dataclass(kw_only=True)
class TrainSection:
    max_steps: int  # optimizer steps; also the length of the lr schedule
    max_minutes: float = 0.0  # wall clock from the trainer's start (setup included); then stop, checkpoint,
    # validate, export as at max_steps. 0 = no limit
    init_from: str | None = None  # start from these weights (a checkpoint .pt, or an export dir / .safetensors)
    init_from_ema: bool = True  # with a checkpoint: take its EMA weights when it has them
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with more than one process: DDP, or FSDP2 sharding for big models
    fsdp_units: list[str] = dataclasses.field(default_factory=list)  # modules sharded as their own FSDP unit
    activation_checkpointing: list[str] = dataclasses.field(default_factory=list)  # modules recomputed in backward
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket size; all-reduces of full buckets overlap the backward
    log_every: int = 10  # steps between logged (rank-averaged) metrics
    val_every: int = 0  # steps between validations (and one at the end); 0 = no validation
    ckpt_every: int = 1000  # steps between checkpoints; 0 = only the final one
    keep_last: int = 3  # checkpoints kept on disk
    progress: bool = True  # rank 0: a tqdm bar on a terminal, else a log line every log_every steps
    stop_grace_s: float = 10.0  # > 1 process: after SIGINT/SIGTERM, a step not ended within this (or twice the last
    # step's time) is stuck (e.g. in a collective whose peer is gone): exit 128 + signal without a checkpoint;
    # validation batches and checkpoint gathers likewise, against their own earlier times (docs/training.md)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-identical reruns, slower; ops without a
    # deterministic kernel raise an error

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.log_every < 1 or self.keep_last < 1:
            raise ValueError("max_steps, log_every and keep_last must be >= 1")
        if self.val_every < 0 or self.ckpt_every < 0:
            raise ValueError("val_every and ckpt_every must be >= 0")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if self.ddp_bucket_mb <= 0:
            raise ValueError(f"ddp_bucket_mb must be > 0, got {self.ddp_bucket_mb}")
        if not (math.isfinite(self.stop_grace_s) and self.stop_grace_s > 0):
            raise ValueError(f"stop_grace_s must be a finite number of seconds > 0, got {self.stop_grace_s}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """A training run: ``d3s2 train FAMILY --config FILE``. World size comes from torchrun, never from here."""

    task: TaskSpec
    train: TrainSection
    seed: int = 0  # model init uses seed; rank r's RNGs (data workers, noise) use seed + 1000·r
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
