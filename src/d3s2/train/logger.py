"""Run logs on rank 0: tensorboard scalars (``run/tb``) and one JSON line per logged step (``run/train_log.jsonl``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..fileio import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["RunLogger"]


class RunLogger:
    """Writes ``{split}/{name}`` scalars to tensorboard and ``{"step", "split", **metrics}`` lines to jsonl.

    ``resume_step``: the step of the checkpoint a resumed run starts from. Lines and tensorboard events written
    after it (by the run that was interrupted) are dropped, so every step is logged once. ``None`` (a fresh run)
    starts both logs afresh, hiding whatever an earlier run that never saved a checkpoint left in ``run_dir``.

    The files are opened at the first :meth:`log`, not before: a run that fails before it logs anything leaves
    the logs in ``run_dir`` as they were.

    A disabled logger (ranks other than 0) does nothing. Without the ``tensorboard`` package only the jsonl
    file is written (with one warning).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tensorboard = tensorboard
        self.resume_step = resume_step
        self.writer = None
        self.jsonl = None

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "train_log.jsonl"
        if self.resume_step is not None and path.exists():
            _drop_lines_after(path, self.resume_step)
        self.jsonl = path.open("w" if self.resume_step is None else "a", buffering=1)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'd3s2[train]'): logging to jsonl only")
            else:
                # purge_step: tensorboard hides the events of earlier files in tb/ from this step on.
                purge_step = 0 if self.resume_step is None else self.resume_step + 1
                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train") -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _logged_step(line: str) -> int | None:
    """The step of one jsonl line; ``None`` for a torn line (a crash in the middle of writing it)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # ValueError includes json.JSONDecodeError
        return None


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrite the jsonl log atomically keeping the lines of steps up to ``step``."""
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        log.info("%s: dropped %d line(s) logged after step %d (the checkpoint resumed from)", path,
                 len(lines) - len(kept), step)
