"""The training loop on the toy task: it learns, resumes to identical losses, and the CLI drives it."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from d3s2.cli import main
from d3s2.config import PACKAGED_CONFIGS, ConfigError
from d3s2.train import task as task_registry
from d3s2.train.checkpoint import CheckpointDir
from d3s2.train.toy import ToyShapes, ToyTask
from d3s2.train.trainer import Trainer, lr_lambda

from ._runs import assert_same_state, train_rows


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_toy_overfits(tmp_path, tiny_cfg):
    cfg = tiny_cfg(task={"args": {"num_train": 2, "num_val": 2, "flip": False}},
                   train={"max_steps": 40, "log_every": 5, "val_every": 20},
                   data={"micro_batches_per_step": 1, "max_tokens": 4000}, optim={"lr": 1e-2})
    trainer = Trainer(cfg, tmp_path, command=["test"])
    trainer.run()
    losses = _losses(tmp_path)
    assert losses[40] < 0.1 * losses[5], losses
    val = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
           if '"val"' in line]
    assert [v["step"] for v in val] == [20, 40] and all(0 <= v["sign_acc"] <= 1 for v in val)
    assert (tmp_path / "val" / "step_00000040" / "snapshot.npz").is_file()
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").list()] == ["step_00000040.pt"]


def test_kill_and_resume_reproduces_losses(tmp_path, tiny_cfg):
    # Workers + key-derived flips, EMA, warmup, epochs ending mid-run: everything resume must restore.
    sections = {"train": {"max_steps": 7, "ckpt_every": 3}, "data": {"num_workers": 1}}
    full = tmp_path / "full"
    Trainer(tiny_cfg(**sections), full).run()
    ref = _losses(full)

    killed = tmp_path / "killed"
    Trainer(tiny_cfg(**sections), killed).run(stop_after=5)  # dies after step 5; step 3 is the last checkpoint
    with pytest.raises(RuntimeError, match="already has checkpoints"):
        Trainer(tiny_cfg(**sections), killed)
    resumed = Trainer(tiny_cfg(**sections), killed, resume="latest")
    assert resumed.step == 3
    resumed.run()
    rows = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))  # the lost steps 4, 5 were logged once, by the resume
    got = _losses(killed)
    assert [got[s] for s in range(4, 8)] == [ref[s] for s in range(4, 8)]
    assert_same_state(full / "checkpoints" / "step_00000007.pt", killed / "checkpoints" / "step_00000007.pt")


def _interrupt_during(trainer: Trainer, step: int) -> None:
    """SIGTERM arrives during the given (1-based) optimizer step, as from a job scheduler."""
    real = trainer._train_step

    def step_then_signal(micro):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(micro)
    trainer._train_step = step_then_signal


def test_resume_inside_a_log_window_logs_the_rows_of_the_full_run(tmp_path, tiny_cfg):
    # Logged every 2 steps; step 2 overflows (skipped). Checkpoint at step 3 (killed after 5), or a SIGTERM during
    # step 5: either resume starts inside a log window, and its rows (loss means, tokens per step, the count of
    # skipped steps) must be the uninterrupted run's.
    cfg = tiny_cfg(train={"max_steps": 8, "ckpt_every": 3, "log_every": 2})

    def trainer(name: str) -> Trainer:
        made = Trainer(cfg, tmp_path / name)
        _poison_steps(made, {2})
        return made
    trainer("full").run()
    trainer("killed").run(stop_after=5)
    signalled = trainer("signalled")
    _interrupt_during(signalled, 5)
    signalled.run()
    assert signalled.interrupted == signal.SIGTERM and signalled.step == 5
    want = train_rows(tmp_path / "full")
    assert want[8]["skipped_steps"] == 1.0
    for name, resumed_at in (("killed", 3), ("signalled", 5)):
        resumed = Trainer(cfg, tmp_path / name, resume="latest")
        assert resumed.step == resumed_at
        resumed.run()
        got = train_rows(tmp_path / name)
        assert [got[s] for s in (4, 6, 8) if s > resumed_at] == [want[s] for s in (4, 6, 8) if s > resumed_at], name
        assert_same_state(tmp_path / "full" / "checkpoints" / "step_00000008.pt",
                           tmp_path / name / "checkpoints" / "step_00000008.pt")


class _GlobalRNGShapes(ToyShapes):
    """Toy shapes jittered by draws from the global python, numpy and torch RNGs (not from an item_rng)."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        jitter = torch.rand(1) + float(np.random.random()) + random.random()
        return {**item, "feats": item["feats"] + 0.01 * jitter}


class _GlobalRNGTask(ToyTask):
    """The toy task with global-RNG draws in its dataset and its collate."""

    def build_datasets(self):
        c = self.cfg
        return _GlobalRNGShapes(c.num_train, resolution=c.resolution, band=c.band, seed=c.seed, split=0,
                                flip=c.flip), None

    def collate(self, items):
        batch = super().collate(items)
        return batch.replace(batch.feats * (1 + 0.01 * torch.rand(1)))


def test_global_rng_draws_of_a_dataset_and_collate_resume_exactly(tmp_path, tiny_cfg, monkeypatch):
    # The worker processes start again on resume; their draws must still repeat the uninterrupted run's, and
    # not depend on the number of workers (nor take from the training stream when there are none).
    monkeypatch.setitem(task_registry._RUNTIME, "toy_global_rng", _GlobalRNGTask)
    sections = {"task": {"name": "toy_global_rng", "args": {"num_val": 0}}, "train": {"max_steps": 7, "ckpt_every": 3},
                "data": {"num_workers": 1}}
    Trainer(tiny_cfg(**sections), tmp_path / "full").run()
    Trainer(tiny_cfg(**sections), tmp_path / "killed").run(stop_after=5)
    Trainer(tiny_cfg(**sections), tmp_path / "killed", resume="latest").run()
    sections["data"]["num_workers"] = 0
    Trainer(tiny_cfg(**sections), tmp_path / "in_process").run()
    want = _losses(tmp_path / "full")
    got = _losses(tmp_path / "killed")
    assert [got[s] for s in range(4, 8)] == [want[s] for s in range(4, 8)]
    assert _losses(tmp_path / "in_process") == want
    assert_same_state(tmp_path / "full" / "checkpoints" / "step_00000007.pt",
                       tmp_path / "killed" / "checkpoints" / "step_00000007.pt")


class _NoisyLossTask(ToyTask):
    """The toy task with a loss that draws from the global python, numpy and torch RNGs (as noise and t do)."""

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        return loss + 0.01 * (torch.rand(()) + float(np.random.random()) + random.random()), metrics


def _global_rng_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_trainers_in_one_process_keep_their_own_rng_streams(tmp_path, tiny_cfg, monkeypatch):
    # Building, running and exporting a trainer leaves the caller's RNGs as they were, and two trainers built
    # before either runs train as each does alone.
    monkeypatch.setitem(task_registry._RUNTIME, "toy_noisy_loss", _NoisyLossTask)

    def cfg(seed):
        return tiny_cfg(task={"name": "toy_noisy_loss", "args": {"num_val": 0}}, seed=seed, train={"max_steps": 3})
    for name, seed in (("a", 0), ("b", 1)):
        Trainer(cfg(seed), tmp_path / name).run()
    caller = _global_rng_states()
    a, b = Trainer(cfg(0), tmp_path / "a_with_b"), Trainer(cfg(1), tmp_path / "b_with_a")
    assert _global_rng_states() == caller
    a.run()  # exports at its end
    assert _global_rng_states() == caller
    b.run()
    b.export()
    assert _global_rng_states() == caller
    assert _losses(tmp_path / "a_with_b") == _losses(tmp_path / "a")
    assert _losses(tmp_path / "b_with_a") == _losses(tmp_path / "b") != _losses(tmp_path / "a")


def test_workers_give_the_in_process_losses_across_epochs(tmp_path, tiny_cfg, monkeypatch):
    # One loader streams all epochs and its workers run ahead into the next epoch: with epoch-derived flips and
    # several short epochs, worker processes must still see each item with its own epoch's flips.
    opened = []
    real_loader = Trainer._loader
    monkeypatch.setattr(Trainer, "_loader", lambda self, *a, **kw: opened.append(a[2]) or real_loader(self, *a, **kw))
    losses = {}
    for workers in (0, 2):
        cfg = tiny_cfg(train={"max_steps": 9, "val_every": 0}, data={"num_workers": workers})
        trainer = Trainer(cfg, tmp_path / str(workers))
        trainer.run()
        assert trainer.data_pos[0] >= 2  # the run crossed at least two epoch ends
        losses[workers] = _losses(tmp_path / str(workers))
    assert losses[0] == losses[2]
    assert len(opened) == 2  # one training loader per run, not one per epoch (each would fork its workers)


def test_lr_schedule():
    kw = {"warmup_steps": 4, "max_steps": 14, "schedule": "cosine", "min_lr_ratio": 0.1}
    values = [lr_lambda(s, **kw) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[9] == pytest.approx(0.55) and values[-1] > 0.1
    assert lr_lambda(100, **kw) == pytest.approx(0.1)
    assert lr_lambda(7, **{**kw, "schedule": "constant"}) == 1.0


def test_cli_train_and_errors(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        "task: {name: toy, args: {num_train: 4, num_val: 0, resolution: 8, channels: 8}}\n"
        "train: {max_steps: 50, log_every: 1, progress: false, device: cpu}\n"
        "data: {max_tokens: 2000, num_workers: 0}\nema: {decay: 0.0}\n")
    out = tmp_path / "run"
    args = ["train", "toy", "--config", str(cfg_path), "--out", str(out), "--max-steps", "2", "--optim.lr=1e-3",
            "--seed=3"]
    assert main(args) == 0
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 2" in saved and "lr: 0.001" in saved and "seed: 3" in saved and "channels: 8" in saved
    assert json.loads((out / "run.json").read_text())["command"][:4] == ["d3s2", "train", "toy", "--config"]
    assert sorted(_losses(out)) == [1, 2]
    # Resuming a finished run is a no-op that keeps its checkpoint.
    assert main([*args, "--resume"]) == 0
    assert [p.name for p in CheckpointDir(out / "checkpoints").list()] == ["step_00000002.pt"]

    assert main(["train", "vae", "--config", str(cfg_path), "--out", str(tmp_path / "x")]) == 1
    assert "task 'toy' is a 'toy' task; run `d3s2 train toy`" in capsys.readouterr().err
    assert main(["train", "toy", "--stage", "sparse", "--config", str(cfg_path), "--out", str(tmp_path / "z")]) == 1
    assert "--stage applies to dit tasks only" in capsys.readouterr().err
    assert main(["train", "toy", "--config", str(cfg_path), "--out", str(tmp_path / "y"), "--optim.lrr=1"]) == 1
    assert "unknown key optim.lrr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"task.args.channels \(from --task.args.channels=x\): expected int"):
        main(["-v", "train", "toy", "--config", str(cfg_path), "--task.args.channels=x"])


def test_to_device_walks_batches():
    from collections import namedtuple
    from dataclasses import dataclass

    from d3s2.sparse import SparseTensor
    from d3s2.train.trainer import to_device

    @dataclass
    class B:
        t: torch.Tensor
        k: int

    P = namedtuple("P", "a b")
    st = SparseTensor.from_samples([torch.zeros(1, 3, dtype=torch.int32)], [torch.ones(1, 2)], resolution=4)
    batch = {"st": st, "dc": B(torch.ones(2), 3), "nt": P(torch.zeros(1), "s"), "l": [torch.ones(1)], "n": None}
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["st"], SparseTensor) and moved["dc"].k == 3 and moved["nt"].b == "s"
    assert isinstance(moved["nt"], P) and moved["n"] is None and torch.equal(moved["l"][0], torch.ones(1))


def test_committed_toy_config_loads():

    from d3s2.train.trainer import load_train_config

    path = PACKAGED_CONFIGS / "debug" / "tiny_toy.yaml"
    cfg = load_train_config(path, ["--train.max_steps=3"])
    assert cfg.task.name == "toy" and cfg.train.max_steps == 3 and cfg.task.args.resolution == 16


@pytest.mark.parametrize("task, section, model", [
    ("vae", "model_args", "sparse_sdf_vae"),
    ("dense_vae", "model_args", "dense_shape_vae"),
    ("dit_dense", "model_args", "dense_dit"),
    ("dit_sparse", "model_args", "sparse_dit"),
    ("dit_sparse", "conditioner_args", "small_image_encoder"),
])
def test_task_model_args_are_checked_against_the_tasks_model(task, section, model):
    from d3s2.models.registry import model_class
    from d3s2.train.trainer import build_train_config

    paths = {"vae": {"data": "d"}, "dense_vae": {"latents": "l"},
             "dit_dense": {"latents": "l", "data": "d", "dense_vae": "v"}, "dit_sparse": {"latents": "l", "data": "d"}}
    data = {"task": {"name": task, "args": paths[task]}, "train": {"max_steps": 1}}
    valid = [f.name for f in dataclasses.fields(model_class(model).Config)]
    cfg = build_train_config(data, [f"--task.args.{section}.{valid[0]}=7"])
    assert getattr(cfg.task.args, section) == {valid[0]: 7}
    with pytest.raises(ConfigError) as err:
        build_train_config(data, [f"--task.args.{section}.depht=4"])
    assert str(err.value) == (f"unknown key task.args.{section}.depht (from --task.args.{section}.depht=4); "
                              f"task.args.{section} accepts: {', '.join(valid)}")


def test_the_task_section_given_whole_and_its_own_keys():
    from d3s2.train.trainer import build_train_config

    toy = {"task": {"name": "toy"}, "train": {"max_steps": 1}}
    assert build_train_config(toy, ["--task.args={resolution: 8}"]).task.args.resolution == 8
    assert build_train_config(toy, ["--task={name: toy, args: {resolution: 8}}"]).task.args.resolution == 8
    for data, overrides, message in [
        (toy, ["--task.args={resolution: x}"], "task.args.resolution (from --task.args={resolution: x}): expected int"),
        (toy, ["--task={name: toy, args: {resolution: x}}"],
         "task.args.resolution (from --task={name: toy, args: {resolution: x}}): expected int"),
        (toy, ["--task={name: 3}"], "task.name (from --task={name: 3}): expected str, got int"),
        ({**toy, "task": {"name": "toy", "arg": {"resolution": 8}}}, [],  # the args would be lost silently
         "unknown key task.arg; task accepts: name, args"),
        (toy, ["--task.arg.resolution=8"], "unknown key task.arg (from --task.arg.resolution=8); task accepts"),
    ]:
        with pytest.raises(ConfigError) as err:
            build_train_config(data, overrides)
        assert str(err.value).startswith(message), overrides


def test_init_from_checkpoint_or_export(tmp_path, tiny_cfg):
    from safetensors.torch import load_file

    Trainer(tiny_cfg(train={"max_steps": 2}), tmp_path / "a").run()
    ckpt = CheckpointDir.load(tmp_path / "a" / "checkpoints" / "step_00000002.pt")
    b = Trainer(tiny_cfg(train={"init_from": str(tmp_path / "a" / "checkpoints" / "step_00000002.pt")}),
                tmp_path / "b")
    for name, p in b.module.named_parameters():
        assert torch.equal(p, ckpt["ema"]["params"][name]), name
    assert not torch.equal(ckpt["ema"]["params"]["stem.weight"], ckpt["model"]["stem.weight"])
    c = Trainer(tiny_cfg(train={"init_from": str(tmp_path / "a" / "export")}), tmp_path / "c")
    exported = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    for name, p in c.module.named_parameters():
        assert torch.equal(p, exported[name]), name
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        Trainer(tiny_cfg(train={"init_from": str(tmp_path / "nope.pt")}), tmp_path / "d")


def test_max_minutes_stops_like_a_finished_run(tmp_path, tiny_cfg):
    # 0.0001 min = 6 ms from the trainer's start: setup alone takes longer, so the first step is the last one.
    cfg = tiny_cfg(train={"max_steps": 1000, "max_minutes": 0.0001, "log_every": 50, "val_every": 1000})
    trainer = Trainer(cfg, tmp_path)
    last = trainer.run()
    assert trainer.step == 1 and "loss" in last and last["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("train", 1), ("val", 1)]  # logged although 1 % 50 != 0
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").list()] == ["step_00000001.pt"]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="max_minutes"):
        tiny_cfg(train={"max_steps": 10, "max_minutes": -1.0})


def _poison_steps(trainer: Trainer, steps: set[int]) -> None:
    """Make the gradients of the given (1-based) optimizer steps NaN, as an overflow would."""
    real = trainer._train_step

    def step(micro):
        metrics, grad_norm = real(micro)
        if trainer.step + 1 in steps:
            for p in trainer.module.parameters():
                p.grad.fill_(float("nan"))
            grad_norm = torch.tensor(float("nan"))
        return metrics, grad_norm
    trainer._train_step = step


@pytest.mark.parametrize("on_device", [True, False])
def test_non_finite_gradient_steps_are_skipped_exactly(tmp_path, tiny_cfg, on_device):
    # Step 3 overflows: its update is skipped (parameters, AdamW moments and step count untouched), the log counts it.
    cfg = tiny_cfg(train={"max_steps": 4, "log_every": 2}, ema={"decay": 0.0})
    trainer = Trainer(cfg, tmp_path / "run", command=["test"])
    trainer.skip_on_device = on_device
    _poison_steps(trainer, {3})
    snapshots = {}
    real_step = trainer._optimizer_step

    def record(grad_norm):
        bad = real_step(grad_norm)
        snapshots[trainer.step + 1] = ([p.detach().clone() for p in trainer.module.parameters()],
                                       {k: v.clone() for k, v in trainer.optimizer.state[
                                           next(trainer.module.parameters())].items()})
        return bad
    trainer._optimizer_step = record
    trainer.run()
    (params2, state2), (params3, state3), (params4, _) = snapshots[2], snapshots[3], snapshots[4]
    assert all(torch.equal(a, b) for a, b in zip(params2, params3))
    assert all(torch.equal(state2[k], state3[k]) for k in state2) and int(state3["step"]) == 2
    assert not all(torch.equal(a, b) for a, b in zip(params3, params4))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows if r["split"] == "train"] == [(2, 0.0), (4, 1.0)]
    assert all("skipped" not in r for r in rows)


def test_ten_non_finite_steps_in_a_row_stop_training(tmp_path, tiny_cfg):
    trainer = Trainer(tiny_cfg(train={"max_steps": 14, "log_every": 4}), tmp_path / "run", command=["test"])
    _poison_steps(trainer, set(range(3, 13)))
    with pytest.raises(RuntimeError, match="10 consecutive steps with non-finite gradients"):
        trainer.run()
    assert trainer.step == 12  # noticed at the first log after the tenth, without a host sync per step
