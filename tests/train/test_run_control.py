"""Run control around the loop: resuming with a changed config, logs after a resume, interruption by signals,
progress lines in batch jobs, deterministic mode and warnings about settings that do nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import d3s2
from d3s2.cli import main
from d3s2.config import ConfigError
from d3s2.train.checkpoint import CheckpointDir
from d3s2.train.task import TASKS
from d3s2.train.trainer import StopOnSignal, Trainer, lr_lambda

from .conftest import TINY, _merge


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _tb_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """Steps of ``tag`` as tensorboard shows them (events purged by a later file's purge_step left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _next_second() -> None:
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


# ------------------------------------------------------------------ resuming with another config
def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, tiny_cfg):
    Trainer(tiny_cfg(train={"max_steps": 2}), tmp_path).run()
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 -> 0\.001.*--allow-config-change"):
        Trainer(tiny_cfg(train={"max_steps": 4}, optim={"lr": 1e-3}), tmp_path, resume="latest")
    with pytest.raises(ConfigError, match=r"task\.args\.resolution: 8 -> 16"):
        Trainer(tiny_cfg(task={"args": {"resolution": 16}}), tmp_path, resume="latest")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.003  # left as it was

    # How long to train, how often to log, validate and save, and how a step computes may change without the opt-in.
    allowed = {"max_steps": 4, "log_every": 2, "val_every": 4, "keep_last": 3, "deterministic": True}
    resumed = Trainer(tiny_cfg(train=allowed, data={"num_workers": 1}), tmp_path, resume="latest")
    resumed.run()
    resumed.close()
    assert resumed.step == 4 and not list(tmp_path.glob("config.prev-*"))

    changed = Trainer(tiny_cfg(train={"max_steps": 5}, optim={"lr": 1e-3, "weight_decay": 0.05}), tmp_path,
                      resume="latest", allow_config_change=True)
    # The new optimizer settings apply from the next step (not the checkpoint's lr and weight decay).
    decay, no_decay = changed.optimizer.param_groups
    expected_lr = 1e-3 * lr_lambda(4, warmup_steps=2, max_steps=5, schedule="cosine", min_lr_ratio=0.1)
    assert decay["lr"] == no_decay["lr"] == pytest.approx(expected_lr) and changed.scheduler.base_lrs == [1e-3] * 2
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert not list(tmp_path.glob("config.prev-*"))  # kept when the run writes its first file, not at startup
    changed.run()
    changed.close()
    assert yaml.safe_load((tmp_path / "config.prev-00000004.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.001


def test_resume_with_another_model_or_task_is_refused_in_a_few_lines_and_changes_nothing(tmp_path, tiny_cfg,
                                                                                       monkeypatch):
    monkeypatch.setitem(TASKS, "other_toy", TASKS["toy"])
    Trainer(tiny_cfg(train={"max_steps": 2}), tmp_path).run()
    before = sorted(p.name for p in tmp_path.iterdir())
    # --allow-config-change covers settings, not the architecture: torch's error would list every parameter.
    with pytest.raises(ConfigError, match=r"holds another model than the config builds \(\d+ with another shape: "
                                          r".*another --out") as err:
        Trainer(tiny_cfg(train={"max_steps": 4}, task={"args": {"channels": 16}}), tmp_path, resume="latest",
                allow_config_change=True)
    assert len(str(err.value)) < 600
    with pytest.raises(ConfigError, match=r"trained task 'toy', not 'other_toy': .*another --out"):
        Trainer(tiny_cfg(task={"name": "other_toy"}), tmp_path, resume="latest", allow_config_change=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no config.prev-* of a resume that did not happen


def test_init_from_weights_of_other_shapes_names_them_in_a_few_lines(tmp_path, tiny_cfg):
    Trainer(tiny_cfg(train={"max_steps": 1}), tmp_path / "a").run()
    with pytest.raises(ValueError, match=r"does not fit the model \(\d+ with another shape: \S+ \[") as err:
        Trainer(tiny_cfg(train={"init_from": str(tmp_path / "a" / "export")}, task={"args": {"channels": 16}}),
                tmp_path / "b")
    assert len(str(err.value)) < 600


def test_cli_resume_with_another_config(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(_merge(TINY, {"train": {"max_steps": 2}})))
    args = ["train", "toy", "--config", str(cfg_path), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert main([*args, "--resume", "--optim.lr=1e-3", "--max-steps", "3"]) == 1
    assert "optim.lr: 0.003 -> 0.001" in capsys.readouterr().err
    assert main([*args, "--resume", "--optim.lr=1e-3", "--max-steps", "3", "--allow-config-change"]) == 0
    assert (tmp_path / "run" / "config.prev-00000002.yaml").is_file()


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_run_that_fails_before_its_first_step_leaves_out_as_it_was(tmp_path, tiny_cfg, monkeypatch):
    from d3s2.train.toy import ToyTask

    def unreadable(self, model, batch):
        raise OSError("an unreadable data item")

    Trainer(tiny_cfg(train={"max_steps": 2, "val_every": 2}), tmp_path / "run").run()
    before = _files(tmp_path / "run")
    assert {"config.yaml", "run.json", "train_log.jsonl"} <= set(before)
    monkeypatch.setattr(ToyTask, "loss", unreadable)
    _next_second()  # a tensorboard event file opened now would have another name
    for run, resume, changes in [("new", None, {}), ("run", "latest", {"max_steps": 4})]:
        trainer = Trainer(tiny_cfg(train={"val_every": 2, **changes}), tmp_path / run, resume=resume)
        with pytest.raises(OSError, match="an unreadable data item"):
            trainer.run()
        trainer.close()
    assert not (tmp_path / "new").exists()
    assert _files(tmp_path / "run") == before  # its config.yaml, run.json and logs as the finished run left them
    # after a resume with another config too (its config.prev-* only comes with the run's first file)
    trainer = Trainer(tiny_cfg(train={"max_steps": 4}, optim={"lr": 1e-3}), tmp_path / "run", resume="latest",
                      allow_config_change=True)
    with pytest.raises(OSError, match="an unreadable data item"):
        trainer.run()
    trainer.close()
    assert _files(tmp_path / "run") == before


def test_a_trainer_that_fails_to_start_leaves_the_process_as_it_was(tmp_path, tiny_cfg, monkeypatch):
    from d3s2.train import distributed as D

    left = []
    monkeypatch.setattr(D, "shutdown_distributed", lambda: left.append(True))
    with pytest.raises(FileNotFoundError, match="no such file"):  # after train.deterministic took effect
        Trainer(tiny_cfg(train={"deterministic": True, "init_from": str(tmp_path / "missing.pt")}), tmp_path / "run")
    assert not torch.are_deterministic_algorithms_enabled()
    assert left == [True]  # the process group it joined (under torchrun), which its next trainer must not find
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ logs
def test_resume_drops_the_logs_of_the_lost_steps(tmp_path, tiny_cfg):
    sections = {"train": {"max_steps": 7, "ckpt_every": 3}}
    Trainer(tiny_cfg(**sections), tmp_path).run(stop_after=5)  # dies after step 5; step 3 is the last checkpoint
    with (tmp_path / "train_log.jsonl").open("a") as f:
        f.write('{"step": 6, "split": "tr')  # torn by the kill
    # tensorboard orders event files by name, whose first key is the second they were opened in: a real resume
    # comes seconds later; within one second, names with counters 9 and 10 would sort in the wrong order.
    _next_second()
    Trainer(tiny_cfg(**sections), tmp_path, resume="latest").run()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]
    assert len(list((tmp_path / "tb").iterdir())) == 2 and _tb_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7]


def test_fresh_run_starts_fresh_logs(tmp_path, tiny_cfg):
    # An earlier run here died before its first checkpoint: a fresh run replaces its logs.
    Trainer(tiny_cfg(train={"max_steps": 9}), tmp_path).run(stop_after=4)
    assert CheckpointDir(tmp_path / "checkpoints").latest() is None
    _next_second()  # as above: the event files' names order them
    Trainer(tiny_cfg(train={"max_steps": 2}), tmp_path).run()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert _tb_steps(tmp_path) == [1, 2]


# ------------------------------------------------------------------ interruption
def _start_training(tmp_path: Path, *, processes: int = 1) -> tuple[subprocess.Popen, Path]:
    cfg = _merge(TINY, {"train": {"max_steps": 100_000, "log_every": 2, "ckpt_every": 0, "progress": False},
                        "data": {"num_workers": 1}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    src = str(Path(d3s2.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={processes}"]
    cmd = [*launch, "-m", "d3s2.cli", "train", "toy", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)]
    # Own process group: a Ctrl-C at a terminal signals the whole group, DataLoader workers included.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log_file = out / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log_file.exists() and len(log_file.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"training did not get to step 4: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return proc, out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, signum):
    proc, out = _start_training(tmp_path)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # as Ctrl-C does
    else:
        proc.send_signal(signum)  # as a scheduler's kill does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "no step ended" not in err, err[-3000:]  # the watchdog left with the loop
    steps = [r["step"] for r in _rows(out)]
    stopped = steps[-1]
    assert steps == [*range(2, stopped, 2), stopped]  # every log step, and the step it stopped after
    assert f"interrupted at step {stopped}, checkpoint saved; resume with --resume" in err
    assert CheckpointDir(out / "checkpoints").latest().name == f"step_{stopped:08d}.pt"
    assert not (out / "export").exists()  # an interrupted run is not finished

    assert main(["train", "toy", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out), "--resume",
                 "--max-steps", str(stopped + 2)]) == 0
    resumed = [stopped + 1, stopped + 2] if stopped % 2 else [stopped + 2]  # log steps, and the last one
    assert [r["step"] for r in _rows(out)] == [*steps, *resumed]


def test_torchrun_ranks_stop_together_on_a_signal(tmp_path):
    # torchrun forwards the signal to each rank; they agree at the next log step, rank 0 saves, none hangs.
    proc, out = _start_training(tmp_path, processes=2)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a rank hung after SIGTERM: {proc.communicate()[1][-3000:]}")
    stopped = _rows(out)[-1]["step"]
    assert stopped % 2 == 0 and f"interrupted at step {stopped}, checkpoint saved" in err, err[-3000:]
    assert CheckpointDir(out / "checkpoints").latest().name == f"step_{stopped:08d}.pt"


def test_a_signal_repeated_later_stops_at_once(monkeypatch):
    with StopOnSignal() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # at once: a copy (torchrun forwards the terminal's Ctrl-C)
        os.kill(os.getpid(), signal.SIGTERM)  # another signal: ignored
        assert signals.signum == signal.SIGINT
        monkeypatch.setattr(signals, "REPEAT_AFTER_S", 0.0)
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.code == 128 + signal.SIGINT


def test_a_signal_ignored_when_entered_stays_ignored():
    # As for a command started with `&` from a script: its shell ignores SIGINT so Ctrl-C leaves the command running.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.signum is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_signal_in_process_stops_after_the_step(tmp_path, tiny_cfg):
    trainer = Trainer(tiny_cfg(train={"max_steps": 20}), tmp_path)
    real = trainer._train_step

    def step_then_signal(micro):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of step 3
        return real(micro)
    trainer._train_step = step_then_signal

    def not_caught(signum, frame):
        raise AssertionError("the SIGTERM reached the handler that was installed before run()")
    previous = signal.signal(signal.SIGTERM, not_caught)  # what would otherwise end the test process
    try:
        trainer.run()
        assert signal.getsignal(signal.SIGTERM) is not_caught  # run() gave the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.interrupted == signal.SIGTERM and trainer.step == 3
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").list()] == ["step_00000003.pt"]



def test_one_process_waits_for_a_long_step_after_a_signal(tmp_path, tiny_cfg, monkeypatch):
    # The stop watchdog is for ranks stuck in a collective; one process has none, so a step far longer than
    # train.stop_grace_s (a first step compiling kernels, say) still ends and saves the checkpoint the signal asked for.
    trainer = Trainer(tiny_cfg(train={"max_steps": 20, "stop_grace_s": 0.05}), tmp_path)
    real = trainer._train_step

    def long_step_after_signal(micro):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # ten graces, and many times the steps before
        return real(micro)
    trainer._train_step = long_step_after_signal
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the watchdog's way out, which would end pytest
    trainer.run()
    assert exits == [] and trainer.interrupted == signal.SIGTERM and trainer.step == 3
    assert [p.name for p in CheckpointDir(tmp_path / "checkpoints").list()] == ["step_00000003.pt"]

# ------------------------------------------------------------------ progress
def test_progress_is_logged_when_stderr_is_not_a_terminal(tmp_path, tiny_cfg, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="d3s2.train.trainer"):
        Trainer(tiny_cfg(train={"max_steps": 4, "log_every": 2, "progress": True}), tmp_path).run()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2/4  loss ") and "steps/s" in lines[0], lines
    assert lines[1].endswith("0:00:00 left")
    assert "\r" not in capsys.readouterr().err  # no bar redraws


# ------------------------------------------------------------------ determinism
def test_deterministic_runs_give_identical_losses(tmp_path, tiny_cfg):
    torch.set_num_threads(2)  # two threads made reductions order-dependent (the fixture restores the count)
    losses, modes = [], []
    for name in ("a", "b"):
        trainer = Trainer(tiny_cfg(train={"max_steps": 5, "deterministic": True}), tmp_path / name)
        def loss(model, batch, real=trainer.task.loss):
            modes.append(torch.are_deterministic_algorithms_enabled())
            return real(model, batch)
        trainer.task.loss = loss
        trainer.run()
        trainer.close()
        losses.append([r["loss"] for r in _rows(tmp_path / name)])
    assert losses[0] == losses[1] and all(modes)
    assert not torch.are_deterministic_algorithms_enabled()  # close() gave the setting back


# ------------------------------------------------------------------ settings that do nothing
def test_val_every_with_an_empty_validation_split_warns(tmp_path, tiny_cfg, caplog):
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_cfg(task={"args": {"num_val": 0}}, train={"max_steps": 2, "val_every": 1}), tmp_path).run()
    warned = [r.getMessage() for r in caplog.records if "val_every" in r.getMessage()]
    assert warned == ["validation split is empty: train.val_every = 1 ignored, no validation will run"]


def test_cli_max_steps_conflicts_with_the_override(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    args = ["train", "toy", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--max-steps", "2"]
    assert main([*args, "--train.max_steps=ten"]) == 1
    assert "--max-steps 2 and --train.max_steps=ten both set train.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section_first", [False, True])
def test_cli_max_steps_with_the_train_section_given_whole_names_what_was_typed(tmp_path, capsys, section_first):
    # Not the --train.max_steps=2 the CLI makes of --max-steps 2: the user never typed that.
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    typed = [["--max-steps", "2"], ["--train={log_every: 1}"]]
    if section_first:
        typed.reverse()
    args = ["train", "toy", "--config", str(cfg_path), "--out", str(tmp_path / "run")]
    assert main([*args, *typed[0], *typed[1]]) == 1
    err = capsys.readouterr().err
    assert "--max-steps 2: --train={log_every: 1} already gives train whole; expected one of the two" in err, err
    assert "--train.max_steps" not in err
