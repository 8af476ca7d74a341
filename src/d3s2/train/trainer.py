"""The training loop shared by every model family (VAE, dense/sparse DiT, the toy task).

One process per device; ``torchrun`` starts several. Per optimizer step each rank takes its share of the
step's token-packed micro-batches (:mod:`d3s2.train.data`), runs ``task.loss`` under autocast, accumulates
gradients (synchronised on the last micro-batch only), clips them, steps AdamW and the warmup/cosine
schedule, and updates the EMA. Every ``ckpt_every`` steps a checkpoint with everything needed to resume to
the same losses is written atomically; metrics go to tensorboard and ``train_log.jsonl``. SIGINT / SIGTERM (Ctrl-C,
a preempted job) end the run after the current step with a checkpoint; ``--resume`` continues it.

Usage (see ``d3s2 train --help``)::

    d3s2 train toy --config configs/debug/tiny_toy.yaml --out runs/toy --train.max_steps=50
    torchrun --standalone --nproc_per_node 2 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --out runs/x
    d3s2 train vae --config configs/demo/ss_vae_train.yaml --out runs/x --resume  # continue from the newest checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import inspect
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import (
    ConfigError,
    Override,
    TaskSpec,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_overrides,
    resolve_section,
    to_dict,
    write_run_record,
)
from ..progress import bar_on_terminal
from . import distributed as D
from .checkpoint import CheckpointDir, atomic_write_text, capture_rng_state, restore_rng_state
from .data import EpochItems, EpochStreamSampler, already_collated, pack_batches, rank_share
from .ema import EMA
from .logger import RunLogger
from .signals import StopOnSignal
from .task import batch_group, get_task, has_validate, item_costs, token_lengths, val_dir

log = logging.getLogger(__name__)

__all__ = ["Trainer", "load_train_config", "build_train_config", "lr_lambda", "seed_everything", "to_device",
           "load_initial_weights"]

# 2: a section inside task.args.model_args (or conditioner_args) sets only its keys of the model YAML's section;
# in version 1 it replaced that section whole (its other keys took the code's defaults).
CHECKPOINT_VERSION = 2
READABLE_CHECKPOINT_VERSIONS = (1, 2)
# Config keys a resumed run may change without --allow-config-change: how long to train, how often to log,
# validate and save, how to stop, and how (not what) a step computes (max_steps stretches a cosine schedule's tail).
RESUMABLE_CHANGES = frozenset({"train.max_steps", "train.max_minutes", "train.log_every", "train.val_every",
                               "train.ckpt_every", "train.keep_last", "train.progress", "train.stop_grace_s",
                               "train.deterministic", "data.num_workers"})


# --------------------------------------------------------------------------- config
def build_train_config(data: Mapping[str, Any], overrides: Sequence[str | Override] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from plain data and ``--a.b=c`` overrides; ``task.args`` is checked against the
    registered task's ``Config`` (defaults filled in, so the saved config is complete)."""
    data = apply_overrides(dict(data), parse_overrides(overrides))
    task_data, source = resolve_section(data.get("task"))  # source: a --task={...} that gave it whole
    from_source = f" (from {source})" if source else ""
    if not isinstance(task_data, Mapping) or "name" not in task_data:
        raise ConfigError(f"missing required key task.name{from_source} (a registered task: see "
                          "d3s2.train.task.TASKS)")
    name = task_data["name"]
    name = name.value if isinstance(name, Override) else name  # an override of task.name arrives as raw text
    if not isinstance(name, str):
        raise ConfigError(f"task.name{from_source}: expected str, got {type(name).__name__} ({name!r})")
    task_cls = get_task(name)
    args = from_dict(task_cls.Config, task_data.get("args") or {}, path="task.args", source=source)
    # The task's own keys are checked too: a typo such as task.arg would otherwise drop the args silently.
    task = from_dict(TaskSpec, {**task_data, "name": name, "args": args}, path="task", source=source)
    cfg = from_dict(TrainConfig, {**data, "task": {"name": name}})
    cfg.task = task
    return cfg


def load_train_config(path: str | Path, overrides: Sequence[str | Override] = ()) -> TrainConfig:
    """Read a YAML run config strictly and apply overrides (``["--train.max_steps=10", ...]``)."""
    data = load_yaml(path)  # its errors name the file already
    try:
        return build_train_config(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch to ``device``: tensors, anything with a ``.to(device)`` method (SparseTensor, batch classes),
    and dicts, lists, tuples and dataclasses of them."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    if hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    to = getattr(batch, "to", None)
    if callable(to):  # SparseTensor, or a batch class that knows how to move itself
        return to(device, non_blocking=True) if _takes_non_blocking(to) else to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def _takes_non_blocking(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == "non_blocking" or p.kind == p.VAR_KEYWORD for p in params)


def weights_mismatch(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """How the tensors of ``state`` differ from ``model``'s (missing, unexpected, other shapes: a few of each
    and their counts), or None when they fit; torch's own error lists every key, hundreds of lines for a model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    reshaped = [f"{k} {list(given[k])} (the model's {list(expected[k])})"
                for k in sorted(expected.keys() & given.keys()) if given[k] != expected[k]]
    parts = [f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
             if keys]
    return "; ".join(parts) or None


def load_initial_weights(model: nn.Module, path: str | Path, *, use_ema: bool = True) -> None:
    """Load weights for a new run (fine-tuning, the next stage of progressive training) into ``model``.

    ``path``: a trainer checkpoint (``.pt``; its EMA weights when ``use_ema`` and present), a ``.safetensors``
    file, or a directory holding ``model.safetensors`` (a task export). Every parameter must match.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: no such file {path}")
    if path.suffix == ".safetensors":
        from ..models.registry import load_weights

        state = load_weights(path)
    else:
        ckpt = CheckpointDir.load(path)
        state = dict(ckpt["model"])
        if use_ema and ckpt.get("ema"):
            state.update(ckpt["ema"]["params"])
    mismatch = weights_mismatch(model, state)
    if mismatch:
        raise ValueError(f"train.init_from {path} does not fit the model ({mismatch})")
    model.load_state_dict(state)
    log.info("initialised the model from %s", path)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (validation) without changing the training RNG streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _each_done(batches: Iterable[Any], done: Callable[[], None]) -> Iterator[Any]:
    """``batches``, calling ``done`` as the work on each ends: when the next one is taken, or when they run out."""
    for i, batch in enumerate(batches):
        if i:
            done()
        yield batch
    done()


def _init_worker(worker_id: int) -> None:
    # torch seeds each worker (base_seed + id) and python's random; numpy's global RNG needs the same.
    np.random.seed(torch.initial_seed() % 2**32)
    # Ctrl-C reaches the whole process group: the trainer finishes its step and then shuts the workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key whose value differs between two config dicts."""
    old, new = _flatten(old), _flatten(new)
    missing = "<absent>"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def _listed(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def merged_sections(config: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """The sections inside ``model_args`` / ``conditioner_args`` of a run config's ``task.args`` (at any depth),
    by dotted path: where checkpoint versions 1 and 2 build different models (see :data:`CHECKPOINT_VERSION`)."""
    found = {}
    for key, value in config.items():
        here = f"{path}.{key}" if path else str(key)
        if not isinstance(value, Mapping):
            continue
        if key in ("model_args", "conditioner_args"):
            found.update({f"{here}.{k}": v for k, v in value.items() if isinstance(v, Mapping) and v})
        else:
            found.update(merged_sections(value, here))
    return found


# --------------------------------------------------------------------------- the trainer
def _in_own_rng(method: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`Trainer` method run with the trainer's RNG streams (:meth:`Trainer._own_rng`)."""
    @functools.wraps(method)
    def run_in_own_rng(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        with self._own_rng():
            return method(self, *args, **kwargs)
    return run_in_own_rng


class Trainer:
    """Builds the task, model, data and optimizer for this process; :meth:`run` trains.

    Args:
        cfg: the resolved run config (see :func:`load_train_config`).
        run_dir: output directory: ``config.yaml``, ``run.json``, ``checkpoints/``, ``tb/``,
            ``train_log.jsonl``, ``val/``, ``export/``.
        resume: ``None`` (fresh run; refuses a directory that has checkpoints), ``"latest"`` (the newest
            checkpoint in ``run_dir`` if any, else fresh) or a checkpoint path.
        command: recorded in ``run.json`` (default ``sys.argv``).
        allow_config_change: resume although ``cfg`` differs from the checkpoint's config in keys outside
            :data:`RESUMABLE_CHANGES` (warns, and keeps the earlier config as ``config.prev-<step>.yaml``);
            otherwise such a difference is a :class:`ConfigError`.

    The trainer's RNG streams (python, numpy, torch CPU and CUDA; seeded from ``cfg.seed`` and the rank, or
    restored from the checkpoint) are its own: they are in the global RNGs only while one of its methods runs
    (:meth:`run`, :meth:`save_checkpoint`, :meth:`validate`, :meth:`export`), and the caller's states are given
    back after. Several trainers in one process then train as each would alone.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: str | Path | None = None,
                 command: Sequence[str] | None = None, allow_config_change: bool = False) -> None:
        caller_rng = capture_rng_state()
        self._rng_in_use = False  # the trainer's streams are in the global RNGs (inside _own_rng)
        self._deterministic_before = (torch.are_deterministic_algorithms_enabled(),
                                      torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            self._setup(cfg, run_dir, resume=resume, command=command, allow_config_change=allow_config_change)
        except BaseException:
            # A failed startup leaves the process as it was: the next trainer of this process (or of a test) must
            # not find this one's process group, which its peers may have left already.
            self.close()
            raise
        finally:
            self._rng_state = capture_rng_state()  # seeded (or restored) by _setup
            restore_rng_state(caller_rng)

    def _setup(self, cfg: TrainConfig, run_dir: str | Path, *, resume: str | Path | None,
               command: Sequence[str] | None, allow_config_change: bool) -> None:
        self.started = time.monotonic()  # train.max_minutes counts from here (setup included)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tc = cfg.train
        self.info = D.init_distributed(tc.device)
        info = self.info
        if tc.deterministic:
            if info.device.type == "cuda":
                # PyTorch requires a fixed cuBLAS workspace for deterministic matmuls (before the first one).
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.interrupted: int | None = None  # the signal that stopped run() early
        self._signals: StopOnSignal | None = None  # run()'s, while it runs: validation and checkpoints time their units
        # Off a terminal (a log file), rank 0 logs a progress line at each log step instead of the bar.
        self.show_bar = info.is_main and bar_on_terminal(tc.progress)
        self.ckpts = CheckpointDir(self.run_dir / "checkpoints", keep_last=tc.keep_last)
        resume_path = self._resume_path(resume)

        task_cls = get_task(cfg.task.name)
        args = cfg.task.args
        if isinstance(args, Mapping):
            args = from_dict(task_cls.Config, args, path="task.args")
            cfg.task.args = args
        resume_state = self._read_checkpoint(resume_path) if resume_path is not None else None
        config_changed = resume_state is not None and self._check_resumed_config(resume_path, resume_state,
                                                                                 allow_config_change)
        self.task = task_cls(args)

        # Same seed on every rank for the model: FSDP shards whatever each rank initialised.
        seed_everything(cfg.seed)
        model = self.task.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"task {cfg.task.name}: build_model() must return an nn.Module, got {type(model)}")
        if tc.init_from and resume_path is None:
            load_initial_weights(model, tc.init_from, use_ema=tc.init_from_ema)
        if resume_state is not None and (mismatch := weights_mismatch(model, resume_state["model"])):
            raise ConfigError(f"{resume_path} holds another model than the config builds ({mismatch}): a run "
                              "resumes only with the model it was trained with (--allow-config-change included); "
                              "train this model in another --out")
        # Kept with the run's other records when it writes its first file (see _write_run_records).
        self._previous_config = ((int(resume_state["step"]), resume_state["config"]) if config_changed else None)
        model.to(info.device)
        self.use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and info.device.type == "cuda")
        if tc.activation_checkpointing:
            names = D.apply_activation_checkpointing(model, tc.activation_checkpointing)
            log.info("activation checkpointing on %d modules", len(names))
        self.model = D.parallelize(model, info, mode=tc.parallel, fsdp_units=tc.fsdp_units, bf16=self.use_bf16,
                                   find_unused_parameters=tc.find_unused_parameters, bucket_mb=tc.ddp_bucket_mb,
                                   rank_order_reduce=tc.deterministic)
        self.module = D.unwrap(self.model)
        # Fused AdamW skips a step with a non-finite gradient norm on the device (``found_inf``), so a step needs no
        # host sync; FSDP's sharded parameters keep the foreach AdamW and a host-side check.
        self.skip_on_device = tc.parallel != "fsdp"
        self.optimizer = self._build_optimizer()
        oc = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_lambda(
            s, warmup_steps=oc.warmup_steps, max_steps=tc.max_steps, schedule=oc.schedule,
            min_lr_ratio=oc.min_lr_ratio))
        self.ema = EMA(self.module, decay=cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.decay > 0 else None

        self.train_set, self.val_set = self.task.build_datasets()
        self.lengths = token_lengths(self.train_set)
        if not self.lengths:
            raise ValueError(f"task {cfg.task.name}: the training dataset is empty")
        self.costs = item_costs(self.train_set, self.lengths)  # what micro-batches are packed by
        self.groups = [batch_group(self.train_set, i) for i in range(len(self.train_set))]
        self.per_rank = cfg.data.micro_batches_per_step // info.world_size
        if cfg.data.micro_batches_per_step % info.world_size:
            raise ValueError(f"data.micro_batches_per_step ({cfg.data.micro_batches_per_step}) must be divisible "
                             f"by the number of processes ({info.world_size}) so every world size sees the same "
                             "global batch")

        self.step = 0
        self.data_pos = (0, 0)  # (epoch, optimizer step inside the epoch) of the next step
        self._new_log_window()
        self._skipped = 0  # steps skipped since the run began (non-finite gradient norm), logged as skipped_steps
        # Consecutive skipped steps now and at most, counted on the device (no host sync per step).
        self._bad_run = self._worst_run = torch.zeros((), dtype=torch.long, device=info.device)
        self._plans: dict[int, list[list[int]]] = {}  # epoch -> micro-batches (see _epoch_plan)
        rng_state = None
        if resume_state is not None:
            rng_state = self._load(resume_path, resume_state)
            del resume_state  # the weights now live in the model and optimizer
        # Rank-specific streams for data workers and any randomness in the loss (noise, dropout, t).
        seed_everything(cfg.seed + 1000 * info.rank)
        if rng_state is not None:
            restore_rng_state(rng_state)

        self.logger = RunLogger(self.run_dir, enabled=info.is_main,
                                resume_step=self.step if resume_path is not None else None)
        if info.is_main and tc.val_every and not (has_validate(self.task) and self.val_set is not None
                                                  and len(self.val_set)):
            reason = ("validation split is empty" if has_validate(self.task)
                      else f"task {cfg.task.name} has no validate()")
            log.warning("%s: train.val_every = %d ignored, no validation will run", reason, tc.val_every)
        self._command = list(command) if command is not None else list(sys.argv)
        self._record_extra = {"argv": sys.argv, "world_size": info.world_size, "torch": torch.__version__,
                              "device": str(info.device), "resumed_from": str(resume_path) if resume_path else None}
        self._records_written = False

    def _write_run_records(self) -> None:
        """Rank 0, once, before the run's first file: ``config.yaml`` and ``run.json``, and after a resume with
        another config the checkpoint's as ``config.prev-<step>.yaml``. Not at startup: a run that fails before it
        writes anything (a config or data error, a first step that raises) leaves ``run_dir`` as it was (not made,
        or an earlier run's records untouched)."""
        if self._records_written or not self.info.is_main:
            return
        self._records_written = True
        if self._previous_config is not None:
            step, config = self._previous_config
            previous = self.run_dir / f"config.prev-{step:08d}.yaml"
            atomic_write_text(previous, dump_yaml(config))
            log.info("the config it was trained with is kept as %s", previous)
        write_run_record(self.run_dir, self.cfg, command=self._command, seed=self.cfg.seed, extra=self._record_extra)

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """The trainer's RNG streams in the global RNGs for the block (already there when nested); the caller's
        states come back after."""
        if self._rng_in_use:
            yield
            return
        caller_rng = capture_rng_state()
        restore_rng_state(self._rng_state)
        self._rng_in_use = True
        try:
            yield
        finally:
            self._rng_in_use = False
            self._rng_state = capture_rng_state()
            restore_rng_state(caller_rng)

    # ------------------------------------------------------------------ setup helpers
    def _resume_path(self, resume: str | Path | None) -> Path | None:
        if resume is None:
            if self.ckpts.latest() is not None:
                raise RuntimeError(f"{self.run_dir} already has checkpoints; pass --resume to continue that run "
                                   "or choose another --out")
            return None
        if str(resume) == "latest":
            latest = self.ckpts.latest()
            if latest is None:
                log.info("no checkpoint in %s: starting a fresh run", self.ckpts.dir)
            return latest
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path

    def _check_resumed_config(self, path: Path, state: Mapping[str, Any], allow_change: bool) -> bool:
        """Compare the config with the one ``path`` was trained with; see ``allow_config_change``. True when it
        changed beyond :data:`RESUMABLE_CHANGES`, or builds another model config than in the checkpoint's version
        (allowed), so the checkpoint's config is to be kept."""
        try:
            # Through the current schema: keys added since the checkpoint was written read as their defaults.
            stored = to_dict(build_train_config(state["config"]))
        except ConfigError as err:
            if not allow_change:
                raise ConfigError(f"{path}: its config does not load with this version of d3s2 ({err}); pass "
                                  "--allow-config-change to resume with the new config") from None
            log.warning("%s: its config does not load with this version of d3s2 (%s); resuming with the new "
                        "config", path, err)
            stored = state["config"]
        trained_task = stored.get("task", {}).get("name", self.cfg.task.name)
        if trained_task != self.cfg.task.name:
            raise ConfigError(f"{path} trained task {trained_task!r}, not {self.cfg.task.name!r}: a run resumes only "
                              "its own task; choose another --out for this one")
        reread = state["version"] == 1 and bool(sections := merged_sections(stored.get("task", {})))
        if reread:  # the same config text builds another model config now: these sections merge into the YAML's
            given = "; ".join(f"task.{k} = {v}" for k, v in sections.items())
            what = (f"{path} is a version-1 checkpoint, in which {given} replaced the model YAML's whole section "
                    "(its other keys took the code's defaults); now only those keys change")
            if not allow_change:
                raise ConfigError(f"{what}: pass --allow-config-change to continue with the merged section, or "
                                  "train in another --out")
            log.warning("%s; resuming with the merged section (--allow-config-change)", what)
        changes = config_changes(stored, to_dict(self.cfg))
        refused = {k: change for k, change in changes.items() if k not in RESUMABLE_CHANGES}
        if not refused:
            if changes:
                log.info("resuming %s with %s", path, _listed(changes))
            return reread
        if not allow_change:
            raise ConfigError(f"{path} was trained with another config ({_listed(refused)}); resume with the same "
                              f"config (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or pass "
                              "--allow-config-change to continue with the new one")
        log.warning("resuming %s with a changed config (--allow-config-change): %s", path, _listed(changes))
        return True

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for p in self.module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"task {self.cfg.task.name}: the model has no trainable parameters")
        oc = self.cfg.optim
        return torch.optim.AdamW(groups, lr=oc.lr, betas=oc.betas, eps=oc.eps, fused=self.skip_on_device or None)

    def _optimizer_step(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Apply the update unless ``grad_norm`` is non-finite; returns that flag (bool tensor ``[]``)."""
        bad = ~torch.isfinite(grad_norm)
        if self.skip_on_device:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad:
            self.optimizer.step()
        return bad

    def _units(self, name: str, *, slowest_share: float = 1.0) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """run()'s :meth:`StopOnSignal.units` block (outside run(), nothing is timed)."""
        if self._signals is None:
            return contextlib.nullcontext(lambda: None)
        return self._signals.units(name, slowest_share=slowest_share)

    def _brief(self, name: str) -> contextlib.AbstractContextManager:
        """run()'s :meth:`StopOnSignal.brief` block (outside run(), nothing is timed)."""
        return contextlib.nullcontext() if self._signals is None else self._signals.brief(name)

    def _unwatched(self) -> contextlib.AbstractContextManager:
        """run()'s :meth:`StopOnSignal.unwatched` block (outside run(), nothing is timed)."""
        return contextlib.nullcontext() if self._signals is None else self._signals.unwatched()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ data
    def _plan(self, epoch: int) -> list[list[int]]:
        dc = self.cfg.data
        return pack_batches(self.costs, max_tokens=dc.max_tokens, max_batch_size=dc.max_batch_size,
                            groups=self.groups, shuffle=dc.shuffle, seed=self.cfg.seed, epoch=epoch,
                            sort_window=dc.sort_window,
                            step_size=dc.micro_batches_per_step if dc.balance_steps else 1)

    def _loader(self, dataset: Any, batch_sampler: Any, seed_key: Sequence[int], *,
                collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        workers = self.cfg.data.num_workers
        # Own generator: creating the iterator must not draw from the global RNG (resume would then differ).
        gen = torch.Generator().manual_seed(int(np.random.default_rng(list(seed_key)).integers(2**62)))
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate or self.task.collate,
                          num_workers=workers, generator=gen, worker_init_fn=_init_worker if workers else None,
                          pin_memory=self.info.device.type == "cuda")

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """One epoch's micro-batches, cached: the loader's sampler runs ahead of the step that counts tokens."""
        plan = self._plans.get(epoch)
        if plan is None:
            plan = self._plan(epoch)
            m = self.cfg.data.micro_batches_per_step
            if len(plan) < m:
                raise ValueError(f"the training set packs into {len(plan)} micro-batches per epoch, fewer than "
                                 f"data.micro_batches_per_step = {m}; lower it or data.max_tokens")
            if not self._plans and self.info.is_main:
                big = [b for b in plan if len(b) == 1 and self.costs[b[0]] > self.cfg.data.max_tokens]
                if big:
                    log.warning("%d items exceed data.max_tokens = %d and form batches of their own",
                                len(big), self.cfg.data.max_tokens)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # this epoch and the one before
            self._plans[epoch] = plan
        return plan

    def _steps(self) -> Iterator[tuple[int, int, list[Any], int]]:
        """Yield ``(epoch, step_in_epoch, this rank's micro-batches, global tokens)`` from ``self.data_pos`` on.

        One DataLoader streams every epoch (:class:`EpochStreamSampler`): its workers start once and keep
        loading across epoch ends, so no epoch begins with a stall.
        """
        epoch, start = self.data_pos
        m = self.cfg.data.micro_batches_per_step
        sampler = EpochStreamSampler(self._epoch_plan, micro_batches_per_step=m, rank=self.info.rank,
                                     world_size=self.info.world_size, epoch=epoch, start_step=start)
        # Items and batches are made with the global RNGs seeded by their keys: a task drawing from them in its
        # dataset or collate resumes to the same batches (the workers' own RNG streams restart on resume).
        items = EpochItems(self.train_set, seed=self.cfg.seed, collate=self.task.collate)
        it = iter(self._loader(items, sampler, (self.cfg.seed, self.info.rank, epoch, start),
                               collate=already_collated))
        while True:
            plan = self._epoch_plan(epoch)
            for s in range(start, len(plan) // m):
                micro = [next(it) for _ in range(self.per_rank)]
                tokens = sum(self.lengths[i] for b in plan[s * m: (s + 1) * m] for i in b)
                yield epoch, s, micro, tokens
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ checkpoints
    @_in_own_rng
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_NNNNNNNN.pt`` (collective: call on every rank; rank 0 writes)."""
        # The collectives come before any file is opened: timed, as a peer may die in them (see StopOnSignal.units).
        with self._units("checkpoint gather"):
            model_state, optim_state = D.full_state_dicts(self.model, self.optimizer)
            ema_state = self.ema.state_dict() if self.ema is not None else None
            rng = D.gather_objects(capture_rng_state(), self.info)
            log_state = D.gather_objects(self._log_state(), self.info)
        path = None
        # Untimed: an exit in the write would leave its temporary, and the other ranks wait as long at the barrier.
        with self._unwatched():
            if self.info.is_main:
                self._write_run_records()
                state = {
                    "version": CHECKPOINT_VERSION,
                    "step": self.step,
                    "data": {"epoch": self.data_pos[0], "step_in_epoch": self.data_pos[1]},
                    "model": model_state,
                    "optimizer": optim_state,
                    "scheduler": self.scheduler.state_dict(),
                    "ema": ema_state,
                    "rng": rng,
                    "log": log_state,
                    "world_size": self.info.world_size,
                    "config": to_dict(self.cfg),
                }
                path = self.ckpts.save(self.step, state)
            elif self.info.distributed:
                torch.distributed.barrier()
        if self.info.distributed and self.info.is_main:
            with self._brief("checkpoint barrier"):  # the others wait there since the write began
                torch.distributed.barrier()
        return path

    @staticmethod
    def _read_checkpoint(path: Path) -> dict[str, Any]:
        state = CheckpointDir.load(path)
        if state.get("version") not in READABLE_CHECKPOINT_VERSIONS:
            raise RuntimeError(f"{path}: checkpoint version {state.get('version')}, expected one of "
                               f"{READABLE_CHECKPOINT_VERSIONS}")
        return state

    def _load(self, path: Path, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """Restore the checkpoint ``state`` read from ``path``; returns this rank's RNG state."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        D.load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer settings and lr schedule of the config, not the checkpoint's: they differ only where the
        # config changed (max_steps, or optim.* with --allow-config-change), and then the config is what applies.
        self.scheduler.base_lrs = [g["initial_lr"] for g in configured]
        for group, settings, factor in zip(self.optimizer.param_groups, configured, self.scheduler.lr_lambdas):
            group.update(settings, lr=settings["initial_lr"] * factor(self.scheduler.last_epoch))
        if self.ema is not None:
            if state["ema"] is None:
                log.warning("%s has no EMA: starting the EMA from the loaded weights", path)
                self.ema = EMA(self.module, decay=self.cfg.ema.decay, warmup=self.cfg.ema.warmup)
            else:
                self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.data_pos = (int(state["data"]["epoch"]), int(state["data"]["step_in_epoch"]))
        log.info("resumed from %s at step %d", path, self.step)
        if len(state["rng"]) != self.info.world_size:
            log.warning("checkpoint written by %d processes, resuming with %d: RNG streams are re-seeded, so losses "
                        "will not match an uninterrupted run exactly", len(state["rng"]), self.info.world_size)
            seed_everything(self.cfg.seed + 1000 * self.info.rank + self.step)
            return None
        if state.get("log") is not None:  # checkpoints written before it was saved start a new window
            self._load_log_state(state["log"][self.info.rank])
        return state["rng"][self.info.rank]

    # ------------------------------------------------------------------ validation and export
    @_in_own_rng
    def validate(self) -> dict[str, float]:
        """Run ``task.validate`` on every rank (EMA weights when configured); returns rank-averaged metrics."""
        if not has_validate(self.task) or self.val_set is None or len(self.val_set) == 0:
            return {}
        dc = self.cfg.data
        lengths = token_lengths(self.val_set)
        groups = [batch_group(self.val_set, i) for i in range(len(self.val_set))]
        plan = pack_batches(lengths, max_tokens=dc.max_tokens, max_batch_size=dc.max_batch_size, groups=groups,
                            shuffle=False, sort_window=dc.sort_window)
        if dc.val_max_batches:
            plan = plan[: dc.val_max_batches]
        shares = [rank_share(plan, rank=r, world_size=self.info.world_size) for r in range(self.info.world_size)]
        tokens = [sum(lengths[i] for batch in share for i in batch) for share in shares]
        share = shares[self.info.rank]
        loader = self._loader(self.val_set, share, (self.cfg.seed, self.info.rank, 2**31, self.step))
        self._write_run_records()  # before the task's snapshots in run/val
        out = val_dir(self.run_dir, self.step) if self.info.is_main else None
        use_ema = self.ema is not None and self.cfg.ema.validate_with_ema
        was_training = self.module.training
        # Timed batch by batch: a rank whose peer died waits in the metrics' all-reduce (or an FSDP forward) for good;
        # one with a smaller share than another's waits there as long as the difference takes.
        with self._units("validation batch", slowest_share=max(tokens) / max(tokens[self.info.rank], 1)) as batch_done:
            with preserved_rng(), (self.ema.applied_to(self.module) if use_ema else contextlib.nullcontext()):
                self.module.eval()
                try:
                    with torch.no_grad(), self._autocast():
                        batches = (to_device(b, self.info.device) for b in _each_done(loader, batch_done))
                        metrics = self.task.validate(self.module, batches, step=self.step, out_dir=out)
                finally:
                    self.module.train(was_training)
            metrics = D.all_reduce_mean({k: float(v) for k, v in (metrics or {}).items()}, self.info)
            self.logger.log(self.step, metrics, split="val")
        return metrics

    @_in_own_rng
    def export(self) -> Path | None:
        """Call ``task.export`` on rank 0 with a fresh CPU model holding the final (EMA) weights."""
        export = getattr(self.task, "export", None)
        if not callable(export):
            return None
        with self._units("checkpoint gather"):  # a checkpoint's collectives (FSDP's all-gathers): timed alike
            model_state, _ = D.full_state_dicts(self.model, self.optimizer)
            ema_state = self.ema.state_dict() if self.ema is not None else None
        if not self.info.is_main:
            return None
        if ema_state is not None and self.cfg.ema.validate_with_ema:
            model_state = {**model_state, **ema_state["params"]}
        path = self.run_dir / "export"
        # Untimed, as a checkpoint's write; preserved: the fresh model's initialisation draws leave the training
        # streams as they were.
        with self._unwatched(), preserved_rng():
            self._write_run_records()
            fresh = self.task.build_model()
            fresh.load_state_dict(model_state)
            export(fresh.eval(), path)
        log.info("exported final weights to %s", path)
        return path

    # ------------------------------------------------------------------ the loop
    def _train_step(self, micro: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n = len(micro)
        for j, batch in enumerate(micro):
            batch = to_device(batch, self.info.device)
            with D.gradient_sync(self.model, enabled=j == n - 1):
                with self._autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                    raise TypeError(f"task {self.cfg.task.name}: loss() must return a scalar tensor first, got "
                                    f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
                (loss / n).backward()
            for k, v in {"loss": loss, **metrics}.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                sums[k] = sums.get(k, 0) + v.to(self.info.device) / n
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        return sums, grad_norm

    @_in_own_rng
    def run(self, *, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or until ``train.max_minutes`` have passed since the trainer was built);
        returns the last logged training metrics. A time-limited run ends like a finished one: final checkpoint,
        validation, export. The lr schedule still spans ``max_steps`` (``optim.schedule: constant`` suits
        time-limited runs).

        SIGINT or SIGTERM ends the run after the current step with a checkpoint but no validation or export, and
        sets :attr:`interrupted` to the signal. With several processes the ranks agree on it at the next log
        step (a collective, as for the deadline), so every rank stops after the same step. A step that does not
        end within ``train.stop_grace_s`` of the signal (or twice the previous step's time) is stuck: the process
        exits at once with 128 + signal, without a checkpoint (:class:`~d3s2.train.signals.StopOnSignal`); so is a
        validation batch, or a checkpoint's gathering of the ranks' states, that takes the grace and twice as long as
        earlier ones (the checkpoint's writing is never cut short).

        ``stop_after``: return right after that step without the final checkpoint, validation or export, as if
        the process had been killed (for tests of resuming).
        """
        tc = self.cfg.train
        is_main = self.info.is_main
        if self.step >= tc.max_steps:
            log.info("already at step %d of %d", self.step, tc.max_steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not self.show_bar, desc="train",
                   dynamic_ncols=True)
        # A window resumed from a checkpoint keeps the step time it had before.
        self._window_start = time.perf_counter() - self._window_seconds
        last: dict[str, float] = {}
        saved_at = start_step = self.step  # a resumed run starts right after its checkpoint
        deadline = self.started + 60.0 * tc.max_minutes if tc.max_minutes > 0 else None
        data = self._steps()
        try:
            # Only a rank can be stuck in a collective whose peer died: one process has no watchdog to cut short
            # a long step (a first step that compiles kernels, say) that a signal asked to end with a checkpoint.
            grace_s = tc.stop_grace_s if self.info.world_size > 1 else None
            with StopOnSignal(grace_s=grace_s) as signals:
                self._signals = signals
                if self.step >= tc.max_steps:
                    data.close()
                for epoch, s, micro, tokens in data:
                    lr = self.optimizer.param_groups[0]["lr"]
                    metrics, grad_norm = self._train_step(micro)
                    if self.info.distributed and tc.parallel == "fsdp" and self.step == start_step:
                        D.check_sharded(self.module)
                    bad = self._optimizer_step(grad_norm)
                    self._bad_run = (self._bad_run + 1) * bad
                    self._worst_run = torch.maximum(self._worst_run, self._bad_run)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    if self.ema is not None:
                        self.ema.update(self.module)
                    self.step += 1
                    signals.step_done()
                    self.data_pos = (epoch, s + 1)
                    metrics["grad_norm"] = grad_norm.detach().float()
                    metrics["skipped"] = bad.float()
                    for k, v in metrics.items():
                        self._window[k] = self._window.get(k, 0) + v
                    self._window_steps += 1
                    self._window_tokens += tokens
                    bar.update(1)

                    if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                        last = self._log_window(lr=lr, epoch=epoch, deadline=deadline)
                        bar.set_postfix(loss=f"{last['loss']:.4g}", lr=f"{lr:.2e}")
                        self._new_log_window()

                    paused = time.perf_counter()
                    if tc.ckpt_every and self.step % tc.ckpt_every == 0:
                        self.save_checkpoint()
                        saved_at = self.step
                    if tc.val_every and self.step % tc.val_every == 0:
                        self.validate()
                    self._window_start += time.perf_counter() - paused  # checkpoints and validation are not step time
                    if stop_after is not None and self.step >= stop_after:
                        return last
                    # Ranks agree on stopping through a collective (a host sync): only at log steps.
                    at_check = not self.info.distributed or self.step % tc.log_every == 0
                    past, self.interrupted = self._should_stop(deadline, signals.signum) if at_check else (False, None)
                    if self.interrupted is None and self.step >= tc.max_steps:
                        break
                    if past or self.interrupted is not None:
                        if self.interrupted is None:
                            log.info("train.max_minutes = %g reached at step %d", tc.max_minutes, self.step)
                        if self._window_steps:
                            # Logged now, and kept in the checkpoint: a resumed run logs the whole window again.
                            last = self._log_window(lr=lr, epoch=epoch, deadline=deadline)
                        break
                if saved_at != self.step:
                    self.save_checkpoint()
                if self.interrupted is not None:
                    if is_main:
                        log.warning("interrupted at step %d, checkpoint saved; resume with --resume", self.step)
                    return last
                if tc.val_every and self.step % tc.val_every:
                    self.validate()
                self.export()
        finally:
            self._signals = None
            data.close()  # shuts down the DataLoader workers
            bar.close()
            self.logger.close()
        return last

    def _new_log_window(self) -> None:
        """Start accumulating the metrics of the steps up to the next log (per rank)."""
        self._window: dict[str, torch.Tensor] = {}  # metric sums on the device
        self._window_steps = 0
        self._window_tokens = 0  # global tokens
        self._window_seconds = 0.0  # step time before this process started (a window resumed from a checkpoint)
        self._window_start = time.perf_counter()

    def _log_state(self) -> dict[str, Any]:
        """The open log window and the skipped-step counts of this rank, for a checkpoint: a run resumed in the
        middle of a window then logs the rows the uninterrupted run logs."""
        return {"window": {k: v.detach().cpu() for k, v in self._window.items()}, "steps": self._window_steps,
                "tokens": self._window_tokens, "seconds": time.perf_counter() - self._window_start,
                "skipped": self._skipped, "bad_run": int(self._bad_run), "worst_run": int(self._worst_run)}

    def _load_log_state(self, state: Mapping[str, Any]) -> None:
        device = self.info.device
        self._window = {k: v.to(device) for k, v in state["window"].items()}
        self._window_steps, self._window_tokens = int(state["steps"]), int(state["tokens"])
        self._window_seconds = float(state["seconds"])
        self._skipped = int(state["skipped"])
        self._bad_run = torch.tensor(int(state["bad_run"]), device=device)
        self._worst_run = torch.tensor(int(state["worst_run"]), device=device)

    def _log_window(self, *, lr: float, epoch: int, deadline: float | None) -> dict[str, float]:
        """Log the rank-averaged metrics of the steps since the last log."""
        self._skipped += self._check_skipped()
        steps, tokens = self._window_steps, self._window_tokens
        elapsed = time.perf_counter() - self._window_start
        metrics = D.all_reduce_mean({k: float(v) / steps for k, v in self._window.items()}, self.info)
        metrics.update(lr=lr, tokens_per_s=tokens / max(elapsed, 1e-9), tokens_per_step=tokens / steps,
                       step_time_s=elapsed / steps, epoch=float(epoch), skipped_steps=float(self._skipped))
        if self.info.device.type == "cuda":
            metrics["mem_peak_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.info.device)
        self._write_run_records()
        self.logger.log(self.step, metrics)
        if self.info.is_main and not self.show_bar:
            max_steps = self.cfg.train.max_steps
            steps_per_s = steps / max(elapsed, 1e-9)
            left = (max_steps - self.step) / steps_per_s
            if deadline is not None:
                left = min(left, max(deadline - time.monotonic(), 0.0))
            log.info("step %d/%d  loss %.4g  lr %.2e  %.2f steps/s  %s left", self.step, max_steps,
                     metrics["loss"], lr, steps_per_s, datetime.timedelta(seconds=round(left)))
        return metrics

    def _check_skipped(self) -> int:
        """Pop the window's count of skipped steps (non-finite gradient norm) and warn; raise after 10 in a row."""
        n = int(self._window.pop("skipped", 0))
        if n:
            log.warning("step %d: %d step(s) since the last log had a non-finite gradient norm; their updates "
                        "were skipped", self.step, n)
        if int(self._worst_run) >= 10:
            raise RuntimeError("10 consecutive steps with non-finite gradients: training diverged")
        return n

    def _should_stop(self, deadline: float | None, signum: int | None) -> tuple[bool, int | None]:
        """Whether any rank is past ``deadline``, and the signal (SIGINT first) any rank received; every rank gets
        the same answer, so all stop at the same step."""
        flags = {"past": float(deadline is not None and time.monotonic() >= deadline),
                 **{sig.name: float(signum == sig) for sig in StopOnSignal.SIGNALS}}
        agreed = D.all_reduce_mean(flags, self.info)
        received = [sig for sig in StopOnSignal.SIGNALS if agreed[sig.name] > 0]
        return agreed["past"] > 0, (int(received[0]) if received else None)

    def close(self) -> None:
        """Leave the process group (if this trainer joined one) and restore torch's deterministic-algorithms
        setting (``train.deterministic`` changes it for the process)."""
        torch.use_deterministic_algorithms(self._deterministic_before[0], warn_only=self._deterministic_before[1])
        D.shutdown_distributed()
