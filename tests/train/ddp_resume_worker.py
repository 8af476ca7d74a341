"""Run by test_torchrun.py under ``torchrun --nproc_per_node 2``: train a toy task whose loss draws from every global
RNG, for each RUN in turn, and save what each rank drew. Usage: ``ddp_resume_worker.py CONFIG_JSON OUT_DIR RUN ...``
with RUN ``MODE/NAME`` (``ddp`` or ``fsdp``; train ``OUT_DIR/MODE/NAME`` to max_steps), ``MODE/NAME:stop=N``
(return after step N without a final checkpoint, as if killed) or ``MODE/NAME:resume`` (continue from its newest
checkpoint). Rank ``r`` writes ``draws_first_rank<r>.json`` (``draws_resumed_rank<r>.json`` for a resumed run) in
the run directory: one row per micro-batch it trained on."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from d3s2.train.task import register_task
from d3s2.train.toy import ToyTask
from d3s2.train.trainer import Trainer, build_train_config


@register_task("noisy_toy")
class NoisyToyTask(ToyTask):
    """The toy autoencoder denoising: its input noise comes from torch's global RNG, scaled by a numpy and a python
    draw, so each rank's three RNG streams change its gradients. Records every micro-batch it sees."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.draws: list[dict[str, float]] = []

    def loss(self, model, batch):
        scale = 0.1 * np.random.uniform(0.5, 1.5) * random.uniform(0.5, 1.5)
        noise = scale * torch.randn_like(batch.feats)
        pred = model(batch.replace(batch.feats + noise)).feats.float()
        mse = torch.nn.functional.mse_loss(pred, batch.feats.float())
        self.draws.append({"voxels": batch.feats.shape[0], "coord_sum": int(batch.coords.long().sum()),
                           "noise_sum": float(noise.double().sum()), "scale": scale})
        return mse, {"mse": mse.detach()}


def main() -> None:
    torch.set_num_threads(1)
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    for run in sys.argv[3:]:
        name, _, how = run.partition(":")
        mode = name.split("/")[0]
        data["train"]["parallel"] = mode
        data["train"]["fsdp_units"] = ["encoder", "decoder"] if mode == "fsdp" else []
        trainer = Trainer(build_train_config(data), out / name, resume="latest" if how == "resume" else None)
        try:
            trainer.run(stop_after=int(how.removeprefix("stop=")) if how.startswith("stop=") else None)
        finally:
            trainer.close()
        kind = "resumed" if how == "resume" else "first"
        (out / name / f"draws_{kind}_rank{trainer.info.rank}.json").write_text(json.dumps(trainer.task.draws))


if __name__ == "__main__":
    main()
