"""What a model family gives the trainer: the :class:`TrainTask` interface and the task registry.

A task is a class; the trainer builds one per process with the parsed ``task.args`` and asks it for a
single-device model, datasets, a collate function and a loss. Everything distributed (DDP/FSDP, autocast,
activation checkpointing, accumulation, EMA, checkpoints) is applied from outside, so models stay plain
``nn.Module``s.

Registering a task (one line, no import cost): add ``"name": "package.module:ClassName"`` to :data:`TASKS`.
Code outside the package can call :func:`register_task` instead. ``d3s2 train FAMILY`` accepts a config whose
``task.name`` is a task of that ``family`` (or the task name itself).

Rules a task must follow:

- ``loss`` calls ``model(...)`` exactly once per micro-batch and derives everything from its outputs: DDP and
  FSDP synchronise through the module's ``forward``, so calling ``model.module.encode(...)`` or any other
  method that uses parameters would skip gradient synchronisation. Parameter-free helpers of the model (a
  ``loss(out, batch)`` method) are reached with :func:`d3s2.train.distributed.unwrap` (``model`` may be a
  DDP wrapper). The output may be anything (tensors, SparseTensors, dataclasses, custom classes): the
  wrappers find the tensors inside it.
- Randomness: use the global torch/numpy/python RNGs in ``loss`` (the trainer seeds them per rank and saves
  them in checkpoints). Datasets and ``collate`` run in DataLoader workers, which restart on resume: the trainer
  seeds the global RNGs from ``(seed, epoch, index)`` before it loads each training item, and from the
  micro-batch's first key before ``collate``, so draws from them resume to the same losses, for any
  ``data.num_workers``. An item's own generator (:func:`d3s2.train.data.item_rng`, from the index and the
  epoch given by ``set_epoch``) does the same without depending on that.
- Datasets report each item's cost in tokens (``num_tokens(i)``) so micro-batches are packed to
  ``data.max_tokens``; items that must not share a batch (e.g. different resolutions) report different
  ``group(i)`` values.
"""

from __future__ import annotations

import importlib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["TrainTask", "TokenDataset", "TASKS", "register_task", "get_task", "task_names", "token_lengths",
           "item_costs"]


@runtime_checkable
class TokenDataset(Protocol):
    """A map-style dataset whose items have a known token cost.

    The cost comes from ``num_tokens(index)`` or, when the dataset has it, from a ``token_counts`` sequence
    (attribute, property or method; e.g. ``d3s2.data.SparseSDFDataset``). Optional methods:
    ``group(index) -> Hashable`` (items of one micro-batch share it) and ``set_epoch(epoch)`` (called before
    each epoch's loader starts, in the main process).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def num_tokens(self, index: int) -> int:
        """Cost of item ``index`` (for sparse shapes: active voxels) without loading it."""
        ...


class TrainTask(Protocol):
    """The interface every trainable model family implements. Instantiated as ``Task(config)``.

    Required:
        ``family``: str class attribute, the ``d3s2 train FAMILY`` word (``"vae"``, ``"dit"``, ``"toy"``).
        ``Config``: a ``@dataclass(kw_only=True)`` class; YAML ``task.args`` is checked against it strictly.
        ``build_model()``: the single-device ``nn.Module`` in fp32 on the CPU, freshly initialised (the trainer
            seeds the RNG identically on every rank first, then moves and wraps it).
        ``build_datasets()``: ``(train, val)`` :class:`TokenDataset`s; ``val`` may be ``None``.
        ``collate(items)``: a list of dataset items → one batch (tensors, SparseTensors, dicts/lists of them).
        ``loss(model, batch)``: ``(loss, metrics)``; ``loss`` a scalar tensor to minimise (mean over the
            micro-batch), ``metrics`` a dict of scalar tensors or floats to log (e.g. each loss term). ``batch``
            is already on the training device; ``model`` is the wrapped model (call it, see the module rules).

    Optional:
        ``validate(model, loader, *, step, out_dir) -> dict[str, float]``: runs on every rank under
            ``torch.no_grad()`` and autocast with the unwrapped (EMA) model over that rank's share of the
            validation micro-batches (already on device, same count on each rank); returns per-rank mean
            metrics that the trainer averages over ranks. ``out_dir`` (``run/val/step_NNNNNNNN``) is given on
            rank 0 only, for snapshots such as meshes; it is ``None`` elsewhere.
        ``export(model, out_dir)``: write the final weights in the package format (e.g.
            ``d3s2.models.registry.save_pretrained``); called on rank 0 with the (EMA) weights, full state.
    """

    family: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None: ...

    def build_model(self) -> nn.Module: ...

    def build_datasets(self) -> tuple[TokenDataset, TokenDataset | None]: ...

    def collate(self, items: Sequence[Any]) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...


# Built-in tasks: name -> "module:Class". Model helpers add their line here (imported only when used).
TASKS: dict[str, str] = {
    "toy": "d3s2.train.toy:ToyTask",
    "vae": "d3s2.models.vae.task:SparseVAETask",
    "dense_vae": "d3s2.models.vae.dense_task:DenseVAETask",
    "dit_dense": "d3s2.models.dit.task:DenseDiTTask",
    "dit_sparse": "d3s2.models.dit.task:SparseDiTTask",
}

_RUNTIME: dict[str, type] = {}


def register_task(name: str):
    """Class decorator registering a task under ``name`` at run time (for tasks living outside d3s2)."""
    def deco(cls: type) -> type:
        _check_task_class(name, cls)
        _RUNTIME[name] = cls
        return cls
    return deco


def task_names() -> list[str]:
    return sorted(set(TASKS) | set(_RUNTIME))


def get_task(name: str) -> type:
    """The task class registered as ``name`` (importing its module on first use)."""
    if name in _RUNTIME:
        return _RUNTIME[name]
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    module, _, attr = TASKS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"task {name!r} is registered as {TASKS[name]} but cannot be loaded: {err}") from err
    _check_task_class(name, cls)
    return cls


def _check_task_class(name: str, cls: type) -> None:
    import dataclasses

    missing = [a for a in ("family", "Config", "build_model", "build_datasets", "collate", "loss")
               if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"task {name!r} ({cls.__qualname__}) lacks {', '.join(missing)} of the TrainTask interface")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"task {name!r}: Config must be a dataclass, got {cls.Config!r}")


def token_lengths(dataset: Any) -> list[int]:
    """Tokens per item: ``dataset.token_counts`` (a sequence, or a method returning one) when present, else
    ``dataset.num_tokens(i)`` for every item."""
    counts = getattr(dataset, "token_counts", None)
    if counts is not None:
        counts = counts() if callable(counts) else counts
        if len(counts) != len(dataset):
            raise ValueError(f"{type(dataset).__name__}.token_counts has {len(counts)} entries for {len(dataset)} "
                             "items")
        return [int(c) for c in counts]
    num_tokens = getattr(dataset, "num_tokens", None)
    if not callable(num_tokens):
        raise TypeError(f"{type(dataset).__name__} needs token_counts or num_tokens(index) so batches can be packed "
                        "to data.max_tokens")
    return [int(num_tokens(i)) for i in range(len(dataset))]


def item_costs(dataset: Any, lengths: Sequence[int]) -> list[int]:
    """What packs micro-batches: ``dataset.item_costs`` (a sequence, or a method returning one: the relative
    compute of each item, e.g. band + decoded voxels for the VAE) scaled so its total equals the total of
    ``lengths`` (so ``data.max_tokens`` keeps its scale), else ``lengths`` themselves."""
    costs = getattr(dataset, "item_costs", None)
    if costs is None:
        return [int(n) for n in lengths]
    costs = costs() if callable(costs) else costs
    if len(costs) != len(lengths):
        raise ValueError(f"{type(dataset).__name__}.item_costs has {len(costs)} entries for {len(lengths)} items")
    if any(float(c) < 0 for c in costs):
        raise ValueError(f"{type(dataset).__name__}.item_costs must be >= 0")
    total = sum(float(c) for c in costs)
    scale = sum(int(n) for n in lengths) / total if total > 0 else 1.0
    return [max(1, round(float(c) * scale)) for c in costs]


def batch_group(dataset: Any, index: int) -> Hashable:
    """The packing group of an item: ``dataset.group(index)`` when defined, else one group for all."""
    group = getattr(dataset, "group", None)
    return group(index) if group is not None else 0


def has_validate(task: Any) -> bool:
    return callable(getattr(task, "validate", None))


def val_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "val" / f"step_{step:08d}"
