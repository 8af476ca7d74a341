"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: join the process group, all-reduce and leave it
ROUNDS times, as a process does that trains one run after another (``Trainer.close()`` leaves the group).
Usage: ``rejoin_worker.py ROUNDS``."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from d3s2.train import distributed as D


def main() -> None:
    rounds = int(sys.argv[1])
    for i in range(rounds):
        info = D.init_distributed("cpu")
        total = torch.tensor([info.rank + 1.0])
        dist.all_reduce(total)
        if total.item() != 3.0:
            raise SystemExit(f"round {i}: expected the ranks' sum 3, got {total.item()}")
        if info.rank == 1:
            time.sleep(0.02 * (i % 3))  # the ranks leave at different times, as after uneven work
        D.shutdown_distributed()
    # one write of the whole line: unbuffered (PYTHONUNBUFFERED), print() writes the text and its newline in two
    # writes, and the other rank's line can land between them in the pipe both share
    sys.stdout.write(f"rank {info.rank}: joined and left {rounds} times\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
