"""Run logs on rank 0: tensorboard scalars (``run/tb``) and one JSON line per logged step (``run/train_log.jsonl``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["RunLogger"]


class RunLogger:
    """Writes ``{split}/{name}`` scalars to tensorboard and ``{"step", "split", **metrics}`` lines to jsonl.

    A disabled logger (ranks other than 0) does nothing. Without the ``tensorboard`` package only the jsonl
    file is written (with one warning).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "train_log.jsonl").open("a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed (pip install 'd3s2[train]'): logging to jsonl only")
            else:
                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train") -> None:
        if not self.enabled:
            return
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
