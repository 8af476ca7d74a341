"""Atomic checkpoint files, RNG state capture, and a directory of ``step_NNNNNNNN.pt`` files keeping the last K.

A checkpoint is one ``torch.save`` dict (keys written by the trainer): ``model`` and ``ema`` (full state dicts
by parameter name), ``optimizer`` (full, keyed by parameter name), ``scheduler``, ``rng`` and ``log`` (one entry
per rank: RNG states; the open log window and skipped-step counts), ``data`` (epoch and step inside it),
``step``, ``world_size`` and ``config``. Files are written by
:mod:`d3s2.fileio` (a temporary name in the same directory, flushed to disk and renamed over the target), so a
crash leaves either the old file or the new one, never a partial one; its writers are re-exported here.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "capture_rng_state", "restore_rng_state",
           "CheckpointDir"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def capture_rng_state() -> dict[str, Any]:
    """States of python ``random``, numpy's global RNG, torch CPU and (when initialised) the CUDA device RNGs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the writer saw; a machine with fewer GPUs restores those it has (a rank uses its own).
        for device, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


class CheckpointDir:
    """``DIR/step_NNNNNNNN.pt`` files; :meth:`save` writes atomically and keeps the newest ``keep_last``."""

    PATTERN = re.compile(r"^step_(\d{8,})\.pt$")

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"expected keep_last >= 1, got {keep_last}")
        self.dir = Path(directory)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def list(self) -> list[Path]:
        """Existing checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := self.PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = atomic_save(state, self.path(step))
        for old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        log.info("saved checkpoint %s", path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # weights_only=False: the file holds RNG states (numpy arrays, python tuples) written by this trainer.
            return torch.load(path, map_location="cpu", weights_only=False)
        except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
            # What torch.load raises for an empty, truncated or overwritten file; its own text names no file.
            if isinstance(err, OSError) and err.errno != errno.EINVAL:
                raise  # not readable at all (permissions, I/O): that message names the file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "no data"
            beside = CheckpointDir(path.parent).list()
            earlier = beside[:beside.index(path)] if path in beside else []
            hint = f"; the newest earlier checkpoint there is {earlier[-1]}" if earlier else ""
            raise ValueError(f"{path}: expected a d3s2 checkpoint, but the file is truncated or corrupt "
                             f"({type(err).__name__}: {reason}){hint}") from err
