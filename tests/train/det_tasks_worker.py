"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: ``scripts/gpu/det_tasks.py`` with a run that fails
on rank 1 alone (the toy task's loss raises there) while rank 0 waits in that run's collective, as under NCCL: rank 1
keeps its process group (leaving a gloo group would end rank 0's wait with an error, leaving an NCCL one does not).
Rank 0 ends at torchrun's SIGTERM: the trainer's own handler would wait for a step that never ends, until its
watchdog gives up train.stop_grace_s (10 s) later. Usage: ``det_tasks_worker.py ARGS`` (det_tasks.py's own)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from d3s2 import cli
from d3s2.train import distributed as D
from d3s2.train import trainer
from d3s2.train.toy import ToyTask

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu"))
import det_tasks  # noqa: E402  (a folder of scripts, not a package)


def failing_loss(self, model, batch):
    raise RuntimeError("injected failure of rank 1 alone")


if int(os.environ["RANK"]) == 1:
    ToyTask.loss = failing_loss
    D.shutdown_distributed = lambda: None
else:
    cli._sigterm_raises = contextlib.nullcontext
    trainer.StopOnSignal.__enter__ = lambda self: self

if __name__ == "__main__":
    sys.exit(det_tasks.main(sys.argv[1:]))
