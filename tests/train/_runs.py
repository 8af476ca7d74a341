"""Comparisons of two training runs: their checkpoints and their logged rows."""

from __future__ import annotations

import json

import numpy as np
import torch

from d3s2.train.checkpoint import CheckpointDir


def assert_same_state(path_a, path_b):
    """Two checkpoints hold bit-identical weights, EMA, AdamW state, schedule, data position and RNG states."""
    a, b = CheckpointDir.load(path_a), CheckpointDir.load(path_b)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        if key in a["ema"]["params"]:
            assert torch.equal(a["ema"]["params"][key], b["ema"]["params"][key]), key
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for slot_a, slot_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(slot_a[k], slot_b[k]) for k in slot_a), slot_a.keys()
    assert a["data"] == b["data"] and a["scheduler"] == b["scheduler"]
    for rank_a, rank_b in zip(a["rng"], b["rng"], strict=True):
        assert rank_a["python"] == rank_b["python"] and torch.equal(rank_a["torch"], rank_b["torch"])
        assert all(np.array_equal(x, y) for x, y in zip(rank_a["numpy"], rank_b["numpy"], strict=True))


def train_rows(run_dir):
    """Logged training rows by step, without the timings (tokens/s, step time)."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")}
            for r in rows if r["split"] == "train"}
