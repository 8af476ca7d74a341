"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: ``d3s2 train`` (in-process ``d3s2.cli.main``) with
rank 1 changed by ``STOP_CASE``:

- ``dies``: rank 1 dies in its step ``DIE_AT_STEP`` while rank 0 waits in that step's gradient all-reduce. A child
  forked just before keeps rank 1's gloo sockets open, so the all-reduce does not end, as under NCCL (which does not
  notice a peer that is gone): rank 0 is blocked in C code, where its signal handler cannot run. The time of the
  death is written to ``$STOP_DIR/died``.
- ``dies_in_validation``: the same death in rank 1's first validation, while rank 0 waits in the all-reduce of the
  validation metrics.
- ``dies_in_checkpoint``: rank 1 dies at the barrier where it waits for rank 0's write of a checkpoint, which
  takes 2 s; rank 0 then waits at that barrier too.
- ``dies_in_export``: rank 1 dies as the final export begins, while rank 0 gathers the weights for it (FSDP:
  all-gathers).
- ``uneven_validation``: each rank's validation batches take ``SLOW_PER_TOKEN`` seconds per token, and rank 1, whose
  share is the smaller, sends SIGTERM to torchrun (which forwards it to both ranks) at the first batch of the
  validation after step 1; it then waits in the metrics' all-reduce for rank 0's longer share.
- ``slow``: each loss of rank 1 takes ``SLOW_S`` seconds more (a slow but healthy rank); rank 0 waits for it in the
  all-reduce of every step.

Usage: ``stop_worker.py ARGS`` (``d3s2``'s own, e.g. ``train toy --config CFG --out DIR``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed

from d3s2 import cli
from d3s2.train.checkpoint import CheckpointDir
from d3s2.train.toy import ToyTask
from d3s2.train.trainer import Trainer

real_loss = ToyTask.loss
real_validate = ToyTask.validate
real_save = CheckpointDir.save
losses = 0


def die_leaving_the_sockets_open() -> None:
    agent = os.getppid()  # torchrun, which stops rank 0 when it sees this rank die
    Path(os.environ["STOP_DIR"], "died").write_text(f"{time.time()}\n")
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # not torchrun's pipes: the test reads them to their end
            os.dup2(null, fd)
        while os.path.exists(f"/proc/{agent}"):
            time.sleep(0.2)
        os._exit(0)
    os._exit(1)


def changed_loss(self, model, batch):
    global losses
    losses += 1
    if os.environ["STOP_CASE"] == "dies" and losses == int(os.environ["DIE_AT_STEP"]):  # one micro-batch a step
        die_leaving_the_sockets_open()
    if os.environ["STOP_CASE"] == "slow":
        time.sleep(float(os.environ["SLOW_S"]))
    return real_loss(self, model, batch)


def dying_validate(self, model, loader, *, step, out_dir):
    die_leaving_the_sockets_open()


def uneven_validate(self, model, loader, *, step, out_dir):
    def paced(batches):
        for i, batch in enumerate(batches):
            if i == 0 and int(os.environ["RANK"]) == 1 and step == 1:
                os.kill(os.getppid(), signal.SIGTERM)  # torchrun, as a Ctrl-C there would
            time.sleep(float(os.environ["SLOW_PER_TOKEN"]) * batch.coords.shape[0])
            yield batch
    return real_validate(self, model, paced(loader), step=step, out_dir=out_dir)


def slow_save(self, step, state):
    time.sleep(2.0)
    return real_save(self, step, state)


if os.environ["STOP_CASE"] == "uneven_validation":
    ToyTask.validate = uneven_validate
if int(os.environ["RANK"]) == 1:
    ToyTask.loss = changed_loss
    if os.environ["STOP_CASE"] == "dies_in_validation":
        ToyTask.validate = dying_validate
    if os.environ["STOP_CASE"] == "dies_in_checkpoint":
        torch.distributed.barrier = lambda *args, **kwargs: die_leaving_the_sockets_open()
    if os.environ["STOP_CASE"] == "dies_in_export":
        Trainer.export = lambda self: die_leaving_the_sockets_open()
elif os.environ["STOP_CASE"] == "dies_in_checkpoint":
    CheckpointDir.save = slow_save

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
