"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: train the tiny toy config with DDP, then FSDP,
and save each rank's parameters. Usage: ``ddp_worker.py CONFIG_JSON OUT_DIR [ddp|fsdp ...]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from d3s2.train import distributed as D
from d3s2.train.trainer import Trainer, build_train_config


def main() -> None:
    torch.set_num_threads(1)
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    trainer = None
    for mode in sys.argv[3:] or ("ddp", "fsdp"):
        data["train"]["parallel"] = mode
        # DDP searching for unused parameters must see inside the SparseTensor output too.
        data["train"]["find_unused_parameters"] = mode == "ddp"
        # FSDP with nested units whose inputs and outputs are SparseTensors.
        data["train"]["fsdp_units"] = ["encoder", "decoder"] if mode == "fsdp" else []
        trainer = Trainer(build_train_config(data), out / mode)
        trainer.run()
        full, _ = D.full_state_dicts(trainer.model, trainer.optimizer)  # collective; empty on rank 1 under FSDP
        local = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
        torch.save({"full": full, "local": local}, out / f"{mode}_rank{trainer.info.rank}.pt")
    trainer.close()


if __name__ == "__main__":
    main()
