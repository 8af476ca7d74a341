"""Tiny toy-task run configs shared by the trainer tests."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

# Shapes at 8³ have about 60-200 active voxels: a micro-batch of ~3 shapes costs a few ms per step on CPU.
TINY: dict[str, Any] = {
    "task": {"name": "toy", "args": {"num_train": 12, "num_val": 2, "resolution": 8, "band": 1.5, "channels": 8,
                                     "latent_channels": 4, "flip": True, "seed": 0}},
    "seed": 0,
    "train": {"max_steps": 6, "log_every": 1, "val_every": 0, "ckpt_every": 0, "keep_last": 2,
              "progress": False, "device": "cpu"},
    "data": {"max_tokens": 400, "micro_batches_per_step": 2, "num_workers": 0, "sort_window": 8},
    "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01},
    "ema": {"decay": 0.9},
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(**sections)`` → a TrainConfig for the toy task with the given sections merged in."""
    from d3s2.train.trainer import build_train_config

    def make(**sections: dict) -> Any:
        return build_train_config(_merge(TINY, sections))
    return make


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (much worse on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
