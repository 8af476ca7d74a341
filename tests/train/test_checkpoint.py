"""Atomic writes, checkpoint rotation and RNG state round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from d3s2.train import checkpoint as ck


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    ck.atomic_save({"x": torch.arange(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"x": torch.arange(5)}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write(tmp_path / "new.bin", lambda f: (f.write(b"ab"), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]


def test_checkpoint_dir_keeps_last(tmp_path):
    d = ck.CheckpointDir(tmp_path / "ckpt", keep_last=2)
    assert d.latest() is None and d.list() == []
    for step in (5, 10, 15):
        d.save(step, {"step": step})
    (tmp_path / "ckpt" / "notes.txt").write_text("ignored")
    assert [p.name for p in d.list()] == ["step_00000010.pt", "step_00000015.pt"]
    assert d.load(d.latest())["step"] == 15
    with pytest.raises(FileNotFoundError):
        d.load(tmp_path / "nope.pt")


def test_rng_state_round_trip():
    state = ck.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    ck.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_cuda_rng_states_of_more_gpus_than_this_machine_has_restore_those_it_has(monkeypatch):
    """A checkpoint written where 4 GPUs were visible resumes on a 2-GPU machine (a rank only uses its own)."""
    restored = []
    monkeypatch.setattr(ck.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ck.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ck.torch.cuda, "set_rng_state", lambda s, device: restored.append((device, int(s[0]))))
    state = ck.capture_rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    ck.restore_rng_state(state)
    assert restored == [(0, 0), (1, 1)]


@pytest.mark.parametrize("damage", ["half", "first_50k", "empty", "overwritten"])
def test_a_damaged_checkpoint_is_named_with_the_earlier_one_beside_it(tmp_path, damage):
    d = ck.CheckpointDir(tmp_path / "ckpt", keep_last=3)
    for step in (5, 10):
        d.save(step, {"step": step, "model": {"w": torch.zeros(40_000)}})
    newest = d.latest()
    data = newest.read_bytes()
    damaged = {"half": data[: len(data) // 2], "first_50k": data[:50_000], "empty": b"", "overwritten": b"garbage\n"}
    newest.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        d.load(newest)
    assert str(newest) in str(err.value) and f"earlier checkpoint there is {d.path(5)}" in str(err.value)
